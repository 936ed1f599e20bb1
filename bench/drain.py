"""
Backlog drain benchmark: how fast Hookah delivers a stored backlog of
webhooks (say, queued while the receiver was down) with 1, 2... worker
processes (``--workers``) on one PostgreSQL database.

    python bench/drain.py                        # 20,000 deliveries, 1 and 2 workers
    python bench/drain.py --workers 1,2,4 --count 50000
    python bench/drain.py --storage postgresql://user@host/db   # an existing, empty database

The backlog is made once: a Hookah accepts ``--count`` dispatches to the
sink, each held back a day (``_delay``), and stops; the rows are then made
due (``next_attempt_at = 0``, as after an outage), and that database is the
template of one fresh copy per run (``CREATE DATABASE ... TEMPLATE``). Each
run starts ``twistd -n hookah --workers N`` on its copy and measures until
the sink has every delivery: drained/s from the server's start (start-up
included) and from its first delivery, and the CPU time per delivery of
Hookah's processes (the master and its workers) and, on a throwaway
cluster, of PostgreSQL's (its backends included).

Without ``--storage`` a throwaway PostgreSQL cluster is made with the test
suite's helper (``tests/pgsupport.py``: Debian's ``postgresql`` package,
``fsync`` off, so the disk is not what is measured). The sink is
``bench/dispatch.py``'s asyncio HTTP server in its own process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # benchlib and dispatch, beside this file
sys.path.insert(1, os.path.dirname(HERE))  # tests.pgsupport, for a throwaway cluster
import benchlib  # noqa: E402
from benchlib import TWISTD, Child, free_port, postgres_cpu_seconds, tree_cpu_seconds  # noqa: E402
from dispatch import run_count_load, sink_count, sink_time_of  # noqa: E402


class Databases:
    """A throwaway cluster (tests/pgsupport.py), or databases next to the one given."""

    def __init__(self, storage: Optional[str]) -> None:
        self.given = storage
        self.made: List[str] = []
        self.cluster: Any = None
        if storage is None:
            from tests import pgsupport

            self.cluster = pgsupport.cluster()

    def admin(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as connection:
            connection.execute(sql)

    def url(self, database: str) -> str:
        if self.given is None:
            return str(self.cluster.url(database))
        base, _, query = self.given.partition("?")
        return base.rsplit("/", 1)[0] + "/" + database + ("?" + query if query else "")

    def create(self, name: str, template: Optional[str] = None) -> str:
        self.admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        self.made.append(name)
        return self.url(name)

    def drop_all(self) -> None:
        for name in reversed(self.made):
            try:
                self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except Exception as e:
                print(f"could not drop {name}: {e}", file=sys.stderr)


def hookah(work: str, twistd: str, url: str, workers: int, extra: List[str]) -> Tuple[Child, int]:
    port = free_port()
    argv = [twistd, "-n", "--pidfile=", "hookah", "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
            "--storage", url, "--allow-private-targets", "--workers", str(workers), *extra]
    return Child(f"hookah-{workers}w-{time.monotonic_ns()}", argv, work, port=port), port


def wait_for(sink: Child, count: int, deadline: float, what: str) -> None:
    while sink_count(sink) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"out of time waiting for {what} ({sink_count(sink)} of {count})")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="deliveries in the backlog [20000]")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated [1,2]")
    parser.add_argument("--storage", help="an existing PostgreSQL database URL (its server gets the copies) [a throwaway cluster]")
    parser.add_argument("--twistd", default=TWISTD, help="the twistd to run Hookah with [next to this Python]")
    parser.add_argument("--hookah-option", action="append", default=[], help="extra hookah option (repeatable)")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds before giving up [900]")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    info = benchlib.machine()
    work = tempfile.mkdtemp(prefix="hookah-bench-drain-")
    print(f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['python']}, load average {info['load']}; "
          f"logs in {work}", flush=True)
    databases = Databases(args.storage)
    sink_port = free_port()
    sink = Child("sink", [sys.executable, os.path.join(HERE, "dispatch.py"), "--serve-sink", str(sink_port)], work, port=sink_port)
    results: List[Tuple[int, Dict[str, float]]] = []
    try:
        template = f"hookah_drain_{os.getpid()}"
        url = databases.create(template)
        server, port = hookah(work, args.twistd, url, 1, args.hookah_option)
        try:
            path = "/dispatch?_delay=86400&_url=" + quote(f"http://127.0.0.1:{sink_port}/hook", safe="")
            started = time.monotonic()
            load = run_count_load(port, path, 16, args.count, 2)
            if set(load["statuses"]) != {"202"}:
                raise SystemExit(f"the backlog was not accepted: {load['statuses']}")
            print(f"backlog: {args.count:,} dispatches stored in {time.monotonic() - started:.1f} s", flush=True)
        finally:
            server.stop()
        # As after an outage: every row due, none claimed.
        databases.admin("UPDATE deliveries SET next_attempt_at = 0", template)
        for n in counts:
            copy = databases.create(f"{template}_{n}", template=template)
            baseline = sink_count(sink)
            pg_before = postgres_cpu_seconds(databases.cluster)
            t0 = time.monotonic()
            server, _ = hookah(work, args.twistd, copy, n, args.hookah_option)
            try:
                wait_for(sink, baseline + args.count, deadline, f"{args.count:,} deliveries with {n} workers")
                first = sink_time_of(sink, baseline + 1)
                last = sink_time_of(sink, baseline + args.count)
                assert first is not None and last is not None
                cpu = tree_cpu_seconds(server.proc.pid)
                pg_after = postgres_cpu_seconds(databases.cluster)
            finally:
                server.stop()
            figures = {
                "from_start": args.count / (last - t0),
                "from_first": args.count / (last - first),
                "seconds": last - t0,
                "extra": sink_count(sink) - baseline - args.count,
                "cpu_ms": cpu * 1000 / args.count,
                "pg_ms": (pg_after - pg_before) * 1000 / args.count if pg_before is not None and pg_after is not None else None,
            }
            results.append((n, figures))
            pg = f", PostgreSQL {figures['pg_ms']:.2f} ms" if figures["pg_ms"] is not None else ""
            print(f"{n} worker(s): {args.count:,} drained in {figures['seconds']:.2f} s = {figures['from_start']:,.0f}/s "
                  f"from start-up, {figures['from_first']:,.0f}/s from the first delivery; "
                  f"{figures['extra']} more than the backlog arrived; CPU per delivery: Hookah {figures['cpu_ms']:.2f} ms"
                  f"{pg}; load average now {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        sink.stop()
        databases.drop_all()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("| workers | drained/s (from start-up) | drained/s (from the first delivery) | vs 1 worker "
          "| Hookah CPU per delivery | PostgreSQL CPU per delivery |")
    print("|---:|---:|---:|---:|---:|---:|")
    one = next((f["from_first"] for n, f in results if n == 1), None)
    for n, f in results:
        ratio = f"{f['from_first'] / one:.2f}×" if one else ""
        pg = f"{f['pg_ms']:.2f} ms" if f["pg_ms"] is not None else "n/a"
        print(f"| {n} | {f['from_start']:,.0f} | {f['from_first']:,.0f} | {ratio} | {f['cpu_ms']:.2f} ms | {pg} |")


if __name__ == "__main__":
    main()
