"""
Backlog drain benchmark: how fast Hookah delivers a stored backlog of
webhooks (say, queued while the receiver was down) with 1, 2... worker
processes (``--workers``) on one PostgreSQL database.

    python bench/drain.py                        # 20,000 deliveries, 1 and 2 workers
    python bench/drain.py --workers 1,2,4 --count 50000
    python bench/drain.py --storage postgresql://user@host/db   # an existing, empty database

    python bench/drain.py --workers 1,2 --repeat 3 --cpu-cap 0.35   # each worker held to 0.35 of a core

The backlog is made once: a Hookah accepts ``--count`` dispatches to the
sink, each held back a day (``_delay``), and stops; the rows are then made
due (``next_attempt_at = 0``, as after an outage), and that database is the
template of one fresh copy per run (``CREATE DATABASE ... TEMPLATE``). Each
run starts ``twistd -n hookah --workers N`` on its copy and measures until
the sink has every delivery: drained/s from the server's start (start-up
included), from its first delivery, and over the middle 80 % (no start-up,
no tail); from the first delivery to the last, the CPU time per delivery of
Hookah's processes (the master and its workers), of the sink and, on a
throwaway cluster, of PostgreSQL's (its backends included), and the
machine's busy cores (everyone's work: on a shared machine, how much room
there was); PostgreSQL's transactions and ``deliveries`` row updates per
delivery (2 per delivery is the least: its claim and its outcome; more are
hand-backs to a busy host and claims again). ``--repeat`` measures every
worker count in turn, round after round, so slow moments of a shared
machine fall on all of them; the medians close the report.

``--cpu-cap C`` (Linux, root: cgroup v1's ``cpu`` controller, or v2's
``cpu.max``; ``bench/cpucap.py``) puts each worker process, as soon as it
exists, in a cgroup of its own held to C cores (with ``--workers 1``, the
one serving process): a stand-in for "a free core per worker" on a machine
without spare cores. Per run it shows that each worker was held (the cores
it used, its throttled periods, its threads' cgroup) and how long its
reactor thread waited for a CPU another process held. The cgroups are
removed at the end, also on an error, Ctrl-C or ``SIGTERM``; those of a
killed run are removed by the next.

Without ``--storage`` a throwaway PostgreSQL cluster is made with the test
suite's helper (``tests/pgsupport.py``: Debian's ``postgresql`` package,
``fsync`` off, so the disk is not what is measured). The sink is
``bench/dispatch.py``'s asyncio HTTP server in its own process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # benchlib and dispatch, beside this file
sys.path.insert(1, os.path.dirname(HERE))  # tests.pgsupport, for a throwaway cluster
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    TWISTD,
    Child,
    cpu_seconds,
    free_port,
    machine_cpu_seconds,
    postgres_cpu_seconds,
    run_delay_seconds,
    tree_cpu_seconds,
)
from cpucap import CappedTree, CpuCaps  # noqa: E402
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

    def counts(self, database: str) -> Tuple[float, float]:
        """
        Transactions ended in ``database`` so far (committed or rolled back,
        ``pg_stat_database``), and rows of its ``deliveries`` table updated
        (``pg_stat_user_tables``; 0 before the schema exists). Read once no
        backend is connected to it but this one: each reports its counts as
        it exits.
        """
        import psycopg

        deadline = time.monotonic() + 10
        with psycopg.connect(self.url(database), autocommit=True) as connection:
            while time.monotonic() < deadline:
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
                if not row or not row[0]:
                    break
                time.sleep(0.05)
            connection.execute("SELECT pg_stat_clear_snapshot()")
            row = connection.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            updated = connection.execute(
                "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'deliveries'"
            ).fetchone()
        return (float(row[0]) if row and row[0] is not None else 0.0,
                float(updated[0]) if updated and updated[0] is not None else 0.0)

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


def hookah(work: str, twistd: str, url: str, workers: int, extra: List[str],
           tree: Optional[CappedTree] = None) -> Tuple[Child, int]:
    port = free_port()
    argv = [twistd, "-n", "--pidfile=", "hookah", "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
            "--storage", url, "--allow-private-targets", "--workers", str(workers), *extra]
    started = tree.cap_root if tree is not None else None
    return Child(f"hookah-{workers}w-{time.monotonic_ns()}", argv, work, port=port, started=started), port


def wait_for(sink: Child, count: int, deadline: float, what: str, tree: Optional[CappedTree] = None) -> None:
    while sink_count(sink) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"out of time waiting for {what} ({sink_count(sink)} of {count})")
        if tree is not None:
            tree.poll()  # a worker started again by the master is capped too
        time.sleep(0.05)


def cap_workers(tree: CappedTree, n: int, sink: Child, baseline: int, deadline: float) -> int:
    """Until each of the ``n`` serving processes has a group of its own; returns the deliveries made by then."""
    while tree.poll() < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"the {n} workers did not all start (capped alone: {tree.poll()})")
        time.sleep(0.005)
    return sink_count(sink) - baseline


def worker_readings(tree: CappedTree) -> Dict[int, Tuple[float, float, float]]:
    """Per capped worker: (CPU seconds, its main thread's seconds runnable but not running, its group's throttled seconds)."""
    found = {}
    for pid, group in tree.serving():
        try:
            found[pid] = (cpu_seconds(pid), run_delay_seconds(pid), group.stat()["throttled_s"])
        except OSError:
            continue  # it ended
    return found


def check_caps(tree: CappedTree, cores: float, at_first: Dict[int, Tuple[float, float, float]],
               since: float) -> Tuple[List[str], List[float], List[float]]:
    """
    One line per capped worker, from the first delivery to now: the cores it
    used (``/proc``); the share of the time its main thread (the reactor's)
    waited for a CPU that another process held: runnable but not running
    (``schedstat``) less the time the quota held it back (``cpu.stat``;
    summed over the CPUs, so the share is close, not exact); its
    throttled periods; and whether every one of its threads is in its
    group. Then the cores each worker used, and each one's waiting share.
    """
    lines, cores_used, waits = [], [], []
    elapsed = time.monotonic() - since
    now = worker_readings(tree)
    for pid, group in tree.serving():
        if pid not in now or pid not in at_first:
            lines.append(f"  worker {pid}: started or ended during the drain")
            continue
        (cpu0, delay0, throttled0), (cpu1, delay1, throttled1) = at_first[pid], now[pid]
        used = (cpu1 - cpu0) / elapsed
        waited = max(0.0, (delay1 - delay0) - (throttled1 - throttled0)) / elapsed
        cores_used.append(used)
        waits.append(waited)
        stat = group.stat()
        inside, threads = group.holds(pid)
        lines.append(
            f"  worker {pid}: {used:.2f} cores (cap {cores:g}); its reactor thread waited for a CPU held by another "
            f"process {waited:.0%} of the time and was throttled {(throttled1 - throttled0) / elapsed:.0%} of it "
            f"({stat['throttled']:.0f} of {stat['periods']:.0f} periods since capped); "
            f"{inside} of {threads} threads in {group.name}"
        )
    return lines, cores_used, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="deliveries in the backlog [20000]")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated [1,2]")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds: each measures every worker count in turn, on a fresh copy [1]")
    parser.add_argument("--cpu-cap", type=float, metavar="C",
                        help="put each worker process (with --workers 1, the one process) in a cgroup of its own "
                             "limited to C cores, e.g. 0.35 [no cap]")
    parser.add_argument("--cpu-period-ms", type=float, default=100.0,
                        help="the cgroup's scheduling period: the quota is C times it [100, the kernel's default]")
    parser.add_argument("--storage", help="an existing PostgreSQL database URL (its server gets the copies) [a throwaway cluster]")
    parser.add_argument("--twistd", default=TWISTD, help="the twistd to run Hookah with [next to this Python]")
    parser.add_argument("--hookah-option", action="append", default=[], help="extra hookah option (repeatable)")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds before giving up [900]")
    parser.add_argument("--keep-logs", metavar="DIR", help="write the servers' logs in DIR and keep them [a temporary directory, removed]")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    # SIGTERM ends the benchmark through its cleanup (cgroups, servers, databases), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    caps = CpuCaps(args.cpu_cap, round(args.cpu_period_ms * 1000)) if args.cpu_cap is not None else None
    info = benchlib.machine()
    if args.keep_logs:
        os.makedirs(args.keep_logs, exist_ok=True)
    work = os.path.abspath(args.keep_logs) if args.keep_logs else tempfile.mkdtemp(prefix="hookah-bench-drain-")
    print(f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['python']}, load average {info['load']}; "
          f"logs in {work}", flush=True)
    if caps is not None:
        print(f"workers {caps.describe()}", flush=True)
    results: List[Tuple[int, Dict[str, Any]]] = []
    databases: Optional[Databases] = None
    sink: Optional[Child] = None
    try:
        databases = Databases(args.storage)
        sink_port = free_port()
        sink = Child("sink", [sys.executable, os.path.join(HERE, "dispatch.py"), "--serve-sink", str(sink_port)],
                     work, port=sink_port)
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
        for round_ in range(1, args.repeat + 1):
            for n in counts:
                figures = drain_once(args, databases, sink, work, template, n, round_, caps, deadline)
                results.append((n, figures))
    finally:
        failures = caps.remove_all() if caps is not None else []
        if sink is not None:
            sink.stop()
        if databases is not None:
            databases.drop_all()
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        for line in failures:
            print(line, file=sys.stderr)
    report(results, args.cpu_cap)


def drain_once(args: argparse.Namespace, databases: Databases, sink: Child, work: str, template: str, n: int,
               round_: int, caps: Optional[CpuCaps], deadline: float) -> Dict[str, Any]:
    """One drain of a fresh copy of the backlog by ``n`` workers; prints and returns its figures."""
    name = f"{template}_{n}_{round_}_{time.monotonic_ns()}"
    copy = databases.create(name, template=template)
    transactions_before, updates_before = databases.counts(name)
    baseline = sink_count(sink)
    load_before = os.getloadavg()[0]

    def readings() -> Dict[str, float]:
        busy, total = machine_cpu_seconds()
        pg = postgres_cpu_seconds(databases.cluster)
        return {"delivered": sink_count(sink) - baseline, "hookah": tree_cpu_seconds(server.proc.pid),
                "pg": pg if pg is not None else -1.0, "sink": sink.cpu_seconds(), "busy": busy, "total": total}

    tree = CappedTree(caps, f"{n}w{round_}", children_serve=n > 1) if caps is not None else None
    t0 = time.monotonic()
    server, _ = hookah(work, args.twistd, copy, n, args.hookah_option, tree)
    caps_lines: List[str] = []
    try:
        early = None
        if tree is not None:
            early = cap_workers(tree, n, sink, baseline, deadline)
        wait_for(sink, baseline + 1, deadline, f"the first delivery with {n} workers", tree)
        # From here to the last delivery: the drain itself, without the start-up.
        before = readings()
        since = time.monotonic()
        at_first = worker_readings(tree) if tree is not None else {}
        wait_for(sink, baseline + args.count, deadline, f"{args.count:,} deliveries with {n} workers", tree)
        after = readings()
        first = sink_time_of(sink, baseline + 1)
        last = sink_time_of(sink, baseline + args.count)
        # The middle 80 %: no start-up (a worker still starting while another delivers) and no tail.
        tenth = sink_time_of(sink, baseline + args.count // 10)
        ninth = sink_time_of(sink, baseline + args.count - args.count // 10)
        assert first is not None and last is not None and tenth is not None and ninth is not None
        cpu = tree_cpu_seconds(server.proc.pid)
        used = waits = None
        if tree is not None:
            caps_lines, used, waits = check_caps(tree, caps.cores if caps is not None else 0.0, at_first, since)
    finally:
        server.stop()
        # Counted once its connections have closed (each backend reports its counts as it exits).
        transactions, updates = databases.counts(name)
        transactions -= transactions_before + 1  # less this reading's own
        updates -= updates_before
        databases.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    drained = max(1, after["delivered"] - before["delivered"])
    figures: Dict[str, Any] = {
        "round": round_,
        "from_start": args.count / (last - t0),
        "from_first": args.count / (last - first),
        "middle": (args.count - 2 * (args.count // 10)) / (ninth - tenth) if ninth > tenth else float("nan"),
        "seconds": last - t0,
        "extra": sink_count(sink) - baseline - args.count,
        # CPU per delivery from the start (start-up included), and during the drain only.
        "cpu_ms": cpu * 1000 / args.count,
        "drain_ms": (after["hookah"] - before["hookah"]) * 1000 / drained,
        "pg_ms": (after["pg"] - before["pg"]) * 1000 / drained if before["pg"] >= 0 else None,
        "sink_ms": (after["sink"] - before["sink"]) * 1000 / drained,
        # Hookah's transactions per delivery, start-up included: how well each worker's writes are grouped.
        "transactions": transactions / args.count,
        # Each delivery's row is updated twice at least (its claim, its outcome): more are hand-backs and claims again.
        "updates": updates / args.count,
        # The whole machine's busy cores during the drain (everyone's work, not only this benchmark's).
        "busy": (after["busy"] - before["busy"]) / (after["total"] - before["total"]) * (os.cpu_count() or 1),
        "load": (load_before, os.getloadavg()[0]),
        "used": used,
        "waits": waits,
        "early": early,
    }
    pg = f", PostgreSQL {figures['pg_ms']:.2f} ms" if figures["pg_ms"] is not None else ""
    print(f"round {round_}, {n} worker(s): {args.count:,} drained in {figures['seconds']:.2f} s = "
          f"{figures['from_start']:,.0f}/s from start-up, {figures['from_first']:,.0f}/s from the first delivery, "
          f"{figures['middle']:,.0f}/s over the middle 80 %; "
          f"{figures['extra']} more than the backlog arrived; CPU per delivery during the drain: Hookah "
          f"{figures['drain_ms']:.2f} ms{pg}, sink {figures['sink_ms']:.2f} ms (Hookah's from start-up: "
          f"{figures['cpu_ms']:.2f} ms); {figures['transactions']:.2f} PostgreSQL transactions and "
          f"{figures['updates']:.2f} row updates per delivery; "
          f"machine busy {figures['busy']:.2f} of {os.cpu_count()} cores; load average {load_before:.1f} -> {figures['load'][1]:.1f}", flush=True)
    if tree is not None:
        if n == 1:
            print("  the worker was capped from its start")
        else:
            print(f"  {n} workers each capped alone after {early} deliveries (until then, held together to the "
                  "master's capped group, which they were forked into)")
        for line in caps_lines:
            print(line, flush=True)
    return figures


def report(results: List[Tuple[int, Dict[str, Any]]], cap: Optional[float]) -> None:
    """Every run, then the median of each worker count and its ratio to one worker's."""
    cap_column = "" if cap is None else " cores used by each worker | most a worker waited for a CPU |"
    print()
    print(f"| round | workers | drained/s (from start-up) | drained/s (from the first delivery) | vs 1 worker (same round) "
          f"| Hookah CPU per delivery | PostgreSQL CPU per delivery | PostgreSQL transactions, row updates per delivery "
          f"| machine busy (cores) |{cap_column} load average |")
    # CPU and busy cores: from the first delivery to the last.
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cap is not None else "") + "---|")
    for n, f in results:
        one = next((g["from_first"] for m, g in results if m == 1 and g["round"] == f["round"]), None)
        ratio = f"{f['from_first'] / one:.2f}×" if one else ""
        pg = f"{f['pg_ms']:.2f} ms" if f["pg_ms"] is not None else "n/a"
        busy = f"{f['busy']:.2f}"
        used = ""
        if cap is not None:
            used = (f" {min(f['used']):.2f}–{max(f['used']):.2f} | {max(f['waits']):.0%} |" if f["used"] else " n/a | n/a |")
        print(f"| {f['round']} | {n} | {f['from_start']:,.0f} | {f['from_first']:,.0f} | {ratio} | {f['drain_ms']:.2f} ms "
              f"| {pg} | {f['transactions']:.2f}, {f['updates']:.2f} | {busy} |{used} {f['load'][0]:.1f} → {f['load'][1]:.1f} |")
    medians = {n: statistics.median(f["from_first"] for m, f in results if m == n) for n in dict(results)}
    middles = {n: statistics.median(f["middle"] for m, f in results if m == n) for n in dict(results)}
    print()
    print("| workers | median drained/s (from the first delivery) | vs 1 worker | median drained/s (middle 80 %) "
          "| vs 1 worker | runs |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, median in medians.items():
        ratio = f"{median / medians[1]:.2f}×" if 1 in medians else ""
        middle_ratio = f"{middles[n] / middles[1]:.2f}×" if 1 in middles else ""
        print(f"| {n} | {median:,.0f} | {ratio} | {middles[n]:,.0f} | {middle_ratio} | "
              f"{sum(1 for m, _ in results if m == n)} |")


if __name__ == "__main__":
    main()
