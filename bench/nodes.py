"""
Nodes benchmark: webhooks delivered per second to a fast local receiver by
one Hookah on SQLite, one node on PostgreSQL and two nodes (two
``twistd -n hookah`` processes on two ports) on one PostgreSQL database,
back to back in one run.

    python bench/nodes.py                       # 10,000 webhooks per layout
    python bench/nodes.py --count 50000 --readme bench/README.md
    python bench/nodes.py --layouts postgresql:2 --storage postgresql://user@host/db

Per layout, fresh storage (a new SQLite file, or a new database), the
node(s) started, a warm-up of 200 dispatches per node, then ``--count``
dispatches split evenly over the nodes, each node getting its share from
its own load process(es) at once. Delivered/s is ``--count`` over the time
from the first dispatch sent to the ``--count``-th delivery at the sink;
afterwards the sink is watched until it is quiet and anything beyond
``--count`` is reported as duplicated (zero expected: nothing is killed).

Without ``--storage`` the PostgreSQL layouts use a throwaway cluster made
with the test suite's helper (``tests/pgsupport.py``: Debian's
``postgresql`` package, Unix socket only, ``fsync`` off, so the disk is not
what is measured; SQLite keeps its own durable commits). The sink and the
load processes are ``bench/dispatch.py``'s. Everything stays on loopback,
and ``--budget`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # benchlib and dispatch, beside this file
sys.path.insert(1, os.path.dirname(HERE))  # tests.pgsupport, for a throwaway cluster
import benchlib  # noqa: E402
from benchlib import TWISTD, Child, free_port, shares  # noqa: E402
from dispatch import run_count_load, sink_count, sink_time_of  # noqa: E402
from benchlib import postgres_cpu_seconds  # noqa: E402

LAYOUTS = "sqlite:1,postgresql:1,postgresql:2"
WARMUP = 200


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def check(self, what: str) -> None:
        if time.monotonic() > self.at:
            raise SystemExit(f"out of time (--budget) during {what}")


class Storage:
    """Fresh storage per layout: SQLite files in the work folder, PostgreSQL databases on one server."""

    def __init__(self, work: str, given: Optional[str]) -> None:
        self.work = work
        self.given = given
        self.cluster: Any = None
        self.layouts = 0
        self.databases: List[str] = []

    def fresh(self, kind: str) -> str:
        self.layouts += 1
        name = f"hookah_nodes_{os.getpid()}_{self.layouts}"
        if kind == "sqlite":
            return f"sqlite:{os.path.join(self.work, name + '.db')}"
        self.admin(f"CREATE DATABASE {name}")
        self.databases.append(name)
        return self.url(name)

    def url(self, database: str) -> str:
        if self.given is None:
            if self.cluster is None:
                from tests import pgsupport

                self.cluster = pgsupport.cluster()
            return str(self.cluster.url(database))
        base, _, query = self.given.partition("?")
        return base.rsplit("/", 1)[0] + "/" + database + ("?" + query if query else "")

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(sql)

    def drop_databases(self) -> None:
        for name in self.databases:
            try:
                self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except Exception as e:
                print(f"could not drop {name}: {e}", file=sys.stderr)


def wait_for(sink: Child, count: int, deadline: Deadline, what: str) -> None:
    while sink_count(sink) < count:
        deadline.check(what)
        time.sleep(0.02)


def wait_quiet(sink: Child, deadline: Deadline, seconds: float = 1.0) -> int:
    """Until no delivery has arrived for ``seconds``; the sink's count then."""
    count = -1
    while count != sink_count(sink):
        deadline.check("the sink to settle")
        count = sink_count(sink)
        time.sleep(seconds)
    return count


def spread_load(ports: List[int], path: str, connections: int, count: int, processes: int) -> Dict[str, Any]:
    """``count`` dispatches split over ``ports`` at once, each port its share of connections and processes."""
    results: List[Dict[str, Any]] = [{} for _ in ports]

    def one(i: int, port: int, conns: int, n: int, procs: int) -> None:
        results[i] = run_count_load(port, path, conns, n, procs)

    threads = [
        threading.Thread(target=one, args=(i, port, c, n, max(1, p)))
        for i, (port, c, n, p) in enumerate(zip(ports, shares(connections, len(ports)), shares(count, len(ports)),
                                                 shares(processes, len(ports))))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses: Dict[str, int] = {}
    for result in results:
        for code, n in result["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    return {
        "requests": sum(r["requests"] for r in results),
        "started": min(r["started"] for r in results),
        "finished": max(r["finished"] for r in results),
        "statuses": statuses,
    }


def layout(work: str, args: argparse.Namespace, storage: Storage, sink: Child, kind: str, nodes: int,
           deadline: Deadline) -> Dict[str, Any]:
    url = storage.fresh(kind)
    servers: List[Child] = []
    try:
        ports = []
        for i in range(nodes):
            port = free_port()
            argv = [args.twistd, "-n", "--pidfile=", "hookah", "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                    "--storage", url, "--allow-private-targets", *args.hookah_option]
            servers.append(Child(f"hookah-{kind}-{nodes}-{i}", argv, work, port=port, ready=60))
            ports.append(port)
        path = "/dispatch?_url=" + quote(f"http://127.0.0.1:{sink.port}/hook", safe="")
        before = sink_count(sink)
        warm = spread_load(ports, path, args.connections, WARMUP * nodes, nodes)
        wait_for(sink, before + warm["requests"], deadline, "the warm-up")
        baseline = wait_quiet(sink, deadline, 0.5)
        cluster = storage.cluster if kind == "postgresql" else None
        cpu_before = [s.cpu_seconds() for s in servers]
        pg_before = postgres_cpu_seconds(cluster)
        load = spread_load(ports, path, args.connections, args.count, args.processes)
        if load["statuses"] != {"202": args.count}:
            raise SystemExit(f"{kind} x{nodes}: not every dispatch accepted: {load['statuses']}")
        wait_for(sink, baseline + args.count, deadline, f"{args.count:,} deliveries ({kind} x{nodes})")
        last = sink_time_of(sink, baseline + args.count)
        assert last is not None
        cpu = sum(s.cpu_seconds() - b for s, b in zip(servers, cpu_before))
        pg_after = postgres_cpu_seconds(cluster)
        seconds = last - load["started"]
        settled = wait_quiet(sink, deadline)
        return {
            "kind": kind,
            "nodes": nodes,
            "delivered_rate": args.count / seconds,
            "accepted_rate": args.count / (load["finished"] - load["started"]),
            "seconds": seconds,
            "cpu": cpu / seconds,
            "cpu_ms": cpu * 1000 / args.count,
            "pg_ms": (pg_after - pg_before) * 1000 / args.count if pg_before is not None and pg_after is not None else None,
            "duplicated": settled - baseline - args.count,
            "warmup": warm["statuses"],
        }
    finally:
        for server in servers:
            server.stop()


def table(rows: List[Dict[str, Any]]) -> List[str]:
    lines = ["| storage | nodes | delivered/s | vs SQLite | accepted/s | servers' CPU (cores) | CPU per webhook "
             "| PostgreSQL CPU per webhook | duplicated |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sqlite = next((r["delivered_rate"] for r in rows if r["kind"] == "sqlite"), None)
    for r in rows:
        ratio = f"{r['delivered_rate'] / sqlite:.2f}×" if sqlite else ""
        pg = f"{r['pg_ms']:.2f} ms" if r.get("pg_ms") is not None else "n/a"
        lines.append(f"| {'SQLite' if r['kind'] == 'sqlite' else 'PostgreSQL'} | {r['nodes']} | {r['delivered_rate']:,.0f} | "
                     f"{ratio} | {r['accepted_rate']:,.0f} | {r['cpu']:.2f} | {r['cpu_ms']:.2f} ms | {pg} | {r['duplicated']} |")
    return lines


def section(info: Dict[str, str], args: argparse.Namespace, rows: List[Dict[str, Any]], load_after: float) -> str:
    options = " ".join(args.hookah_option)
    pg = ("PostgreSQL at the `--storage` given" if args.storage else
          "PostgreSQL on the same machine (a throwaway cluster from `tests/pgsupport.py`, Unix socket, `fsync` off)")
    return "\n".join([
        "## Nodes: SQLite, and 1 or 2 nodes on one PostgreSQL",
        "",
        f"`python bench/nodes.py --count {args.count}` on {info['date']}: {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['python']}, {pg}; **1-minute load average {info['load']} when it started and {load_after:.1f} "
        "when it ended** (other sessions share the machine, which skews every figure). Each layout gets fresh storage and "
        f"`twistd -n hookah --storage <storage> --allow-private-targets{(' ' + options) if options else ''}` per node "
        f"(two nodes: two processes on one database, on two ports), a warm-up of {WARMUP} dispatches per node, then "
        f"{args.count:,} dispatches split evenly over the nodes from {args.connections} keep-alive connections in "
        f"{args.processes} load process(es); deliveries to `bench/dispatch.py`'s asyncio sink in its own process. "
        "Delivered/s: from the first dispatch sent to the last delivery at the sink.",
        "",
        *table(rows),
        "",
        "Servers' CPU: the nodes' CPU time (user and system) over the delivery time, in cores; CPU per webhook: "
        "the same over the count; PostgreSQL CPU per webhook: the throwaway cluster's server processes (backends "
        "included) over the count (n/a: SQLite, or a server given with `--storage`). Duplicated: deliveries beyond the count once the sink was quiet (nothing is killed "
        "here, so 0 is expected). Two nodes share the durable queue through `FOR UPDATE SKIP LOCKED` claims; here "
        "the database, the sink and the load share the nodes' cores, so run it where they have cores of their own "
        "to see how far more nodes go. Worker processes of one node (`--workers N`) are measured by `bench/drain.py`.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="webhooks per layout [10000]")
    parser.add_argument("--layouts", default=LAYOUTS, help=f"storage:nodes, comma-separated [{LAYOUTS}]")
    parser.add_argument("--storage", help="an existing PostgreSQL database URL (its server gets fresh databases) [a throwaway cluster]")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections, split over the nodes [64]")
    parser.add_argument("--processes", type=int, default=2, help="load processes, split over the nodes (at least one each) [2]")
    parser.add_argument("--twistd", default=TWISTD, help="the twistd to run Hookah with [next to this Python]")
    parser.add_argument("--hookah-option", action="append", default=[], help="extra hookah option for every node (repeatable)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds before giving up altogether [600]")
    parser.add_argument("--readme", help="write the figures into this Markdown file's Nodes section")
    args = parser.parse_args()
    layouts: List[Tuple[str, int]] = []
    for item in args.layouts.split(","):
        kind, _, nodes = item.strip().partition(":")
        if kind not in ("sqlite", "postgresql") or not nodes.isdigit() or int(nodes) < 1:
            parser.error(f"--layouts: {item!r} is not sqlite:1 or postgresql:N")
        if kind == "sqlite" and int(nodes) != 1:
            parser.error("--layouts: SQLite has one node (one writer)")
        layouts.append((kind, int(nodes)))
    deadline = Deadline(args.budget)
    benchlib.raise_open_files_limit()
    info = benchlib.machine()
    work = tempfile.mkdtemp(prefix="hookah-bench-nodes-")
    print(f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['python']}, load average {info['load']}; "
          f"logs in {work}", flush=True)
    storage = Storage(work, args.storage)
    sink_port = free_port()
    sink = Child("sink", [sys.executable, os.path.join(HERE, "dispatch.py"), "--serve-sink", str(sink_port)], work, port=sink_port)
    rows: List[Dict[str, Any]] = []
    try:
        for kind, nodes in layouts:
            figures = layout(work, args, storage, sink, kind, nodes, deadline)
            rows.append(figures)
            print(f"{kind} x{nodes}: {args.count:,} delivered in {figures['seconds']:.2f} s = "
                  f"{figures['delivered_rate']:,.0f}/s (accepted {figures['accepted_rate']:,.0f}/s, servers' CPU "
                  f"{figures['cpu']:.2f} cores, {figures['cpu_ms']:.2f} ms per webhook"
                  + (f", PostgreSQL {figures['pg_ms']:.2f} ms" if figures["pg_ms"] is not None else "")
                  + f", {figures['duplicated']} duplicated); "
                  f"load average now {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        sink.stop()
        storage.drop_databases()
    load_after = os.getloadavg()[0]
    print()
    print("\n".join(table(rows)))
    if args.readme:
        benchlib.write_section(args.readme, "Nodes: SQLite, and 1 or 2 nodes on one PostgreSQL", section(info, args, rows, load_after))
        print(f"wrote the Nodes section of {args.readme}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
