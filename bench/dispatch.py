"""
Dispatch benchmark: how many ``POST /dispatch?_url=`` a Hookah on durable
SQLite storage accepts per second, and how many webhooks per second it
delivers to a fast local sink, next to the "bare Twisted ceiling" (a bare
twisted.web Resource answering ``202``) measured the same way on the same
machine.

    python bench/dispatch.py                          # figures on stdout
    python bench/dispatch.py --readme bench/README.md # also record them
    python bench/dispatch.py --profile /tmp/hookah.txt  # py-spy the server

Four processes, so none measures itself:
- Hookah: ``twistd -n hookah --storage sqlite:<tmp>/hookah.db
  --allow-private-targets`` (the default storage, in a temporary directory);
- the sink: a minimal asyncio HTTP/1.1 server (``--serve-sink``) that
  answers ``200 ok``, counts the POSTs and notes when each arrived;
- the bare ceiling: a twisted.web ``Resource`` answering ``202`` in a
  ``Site(..., parsePOSTFormSubmission=False)`` (``--serve-bare``);
- the load: ``wrk`` (Debian package ``wrk``) with keep-alive connections
  POSTing a small JSON body, stopped after N responses; without ``wrk``, a
  multi-process asyncio generator (``--load-worker``) does the same.
  Each load run lasts a fixed time; N is the number of ``202``s it got.

Figures:
- accepted/s: N divided by the load's duration, all responses ``202``;
- delivered/s: N divided by the time from the first dispatch until the
  sink has received the N-th delivery (deliveries run while dispatches are
  still being accepted);
- ratio: Hookah's accepted/s to the bare ceiling's, against the design
  target of at least 65 %.

Every load run lasts ``--seconds``, the whole run is bounded by ``--budget``,
and every process started here is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, beside this file
from benchlib import TWISTD, Child, HttpServerProtocol, free_port, shares, write_section
import benchlib

BODY = b'{"event":"bench","data":{"user":42,"action":"signup"}}'
TARGET = 0.65  # design target: /dispatch accepted/s >= 65 % of the bare ceiling
CELERY = 460.0  # for comparison: Celery + Redis + requests delivers ~460 webhooks/s


# -- the sink: a fast HTTP server that counts what arrives ---------------------


class _SinkProtocol(HttpServerProtocol):
    """Answers every POST with ``200 ok`` and notes when it came; the driver asks for the counts."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

    def __init__(self, times: List[float], connections: List[int]) -> None:
        super().__init__()
        self.times = times
        self.connections = connections

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.posted = False

    def request(self, method: str, target: str, headers: Dict[str, str], body: bytes) -> None:
        self.transport.write(self.answer(method, target))

    def answer(self, method: str, path: str) -> bytes:
        if method == "POST":
            self.times.append(time.monotonic())
            if not self.posted:
                self.posted = True
                self.connections[0] += 1  # connections that carried deliveries
            return self.OK
        if path == "/_count":
            body = str(len(self.times)).encode()
        elif path == "/_connections":
            body = str(self.connections[0]).encode()
        elif path.startswith("/_at?n="):
            # When the n-th POST arrived (time.monotonic(), system-wide).
            n = int(path.split("=", 1)[1])
            body = repr(self.times[n - 1]).encode() if 0 < n <= len(self.times) else b"null"
        else:
            body = b"ok"
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def serve_sink(port: int) -> None:
    async def main() -> None:
        times: List[float] = []
        connections = [0]
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _SinkProtocol(times, connections), "127.0.0.1", port, backlog=4096)
        print("sink listening", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the bare Twisted ceiling --------------------------------------------------


def serve_bare(port: int) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Accept(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            request.content.read()
            request.setResponseCode(202)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"id":"01J00000000000000000000000","status":"scheduled"}\n'

    site = Site(Accept(), parsePOSTFormSubmission=False)
    site.noisy = False
    reactor.listenTCP(port, site, backlog=4096, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    print("bare listening", flush=True)
    reactor.run()  # type: ignore[attr-defined]


# -- the fallback load generator -----------------------------------------------


def load_worker(port: int, path: str, connections: int, seconds: float) -> None:
    """
    ``connections`` keep-alive connections POSTing one request at a time
    each for ``seconds``; prints JSON figures.
    """
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    statuses: Dict[int, int] = {}
    state = {"done": 0}
    latencies: List[float] = []

    async def one_connection(deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                sent = time.monotonic()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length, chunked = 0, False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                if chunked:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                else:
                    await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
                state["done"] += 1
                latencies.append(time.monotonic() - sent)
        finally:
            writer.close()

    async def main() -> float:
        started = time.monotonic()
        await asyncio.gather(*(one_connection(started + seconds) for _ in range(connections)))
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    latencies.sort()
    sample = latencies[:: max(1, len(latencies) // 2000)]
    print(json.dumps({"done": state["done"], "seconds": elapsed, "statuses": statuses, "latencies": sample}), flush=True)


def count_worker(port: int, path: str, connections: int, count: int) -> None:
    """
    ``count`` requests over ``connections`` keep-alive connections, one at a
    time each (a fixed number, not a fixed time: the webhooks mode); prints
    JSON figures with the monotonic times of the first send and last answer.
    """
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    statuses: Dict[int, int] = {}
    left = [count]

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left[0] > 0:
                left[0] -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length, chunked = 0, False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                if chunked:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                else:
                    await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    async def main() -> Tuple[float, float]:
        started = time.monotonic()
        await asyncio.gather(*(one_connection() for _ in range(connections)))
        return started, time.monotonic()

    started, finished = asyncio.run(main())
    print(json.dumps({"done": sum(statuses.values()), "started": started, "finished": finished, "statuses": statuses}), flush=True)


def run_count_load(port: int, path: str, connections: int, count: int, processes: int) -> Dict[str, Any]:
    """``count_worker`` in ``processes`` processes sharing ``connections`` and ``count``."""
    conns = [c for c in shares(connections, processes) if c]
    counts = shares(count, len(conns))
    children = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--count-worker", str(port), path, str(c), str(n)],
            stdout=subprocess.PIPE,
        )
        for c, n in zip(conns, counts)
    ]
    started, finished = float("inf"), 0.0
    statuses: Dict[str, int] = {}
    for child in children:
        out, _ = child.communicate(timeout=3600)
        figures = json.loads(out)
        started = min(started, figures["started"])
        finished = max(finished, figures["finished"])
        for code, n in figures["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    return {"requests": sum(statuses.values()), "started": started, "finished": finished, "statuses": statuses}


def run_fallback_load(port: int, path: str, connections: int, seconds: float, processes: int) -> Dict[str, Any]:
    """``load_worker`` in ``processes`` processes sharing ``connections``."""
    conns = shares(connections, processes)
    children = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--load-worker", str(port), path, str(c), str(seconds)],
            stdout=subprocess.PIPE,
        )
        for c in conns if c
    ]
    done, elapsed = 0, 0.0
    statuses: Dict[str, int] = {}
    latencies: List[float] = []
    for child in children:
        out, _ = child.communicate(timeout=seconds + 60)
        figures = json.loads(out)
        done += figures["done"]
        elapsed = max(elapsed, figures["seconds"])
        latencies.extend(figures["latencies"])
        for code, count in figures["statuses"].items():
            statuses[code] = statuses.get(code, 0) + count
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else None  # noqa: E731
    return {
        "requests": done, "seconds": elapsed, "rate": done / elapsed if elapsed else 0.0, "statuses": statuses,
        "p50_ms": pick(0.5), "p99_ms": pick(0.99), "tool": f"asyncio generator, {processes} processes, {connections} connections",
    }


# -- wrk -----------------------------------------------------------------------


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""


def _duration(text: str) -> float:
    value = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if value is None:
        raise ValueError(text)
    return float(value.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[value.group(2)]


def run_wrk(port: int, path: str, connections: int, seconds: float, threads: int) -> Dict[str, Any]:
    """``wrk`` for ``seconds``; its own count and rate, latency percentiles."""
    threads = max(1, min(threads, connections))
    directory = tempfile.mkdtemp(prefix="hookah-bench-wrk-")
    try:
        script = os.path.join(directory, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT % BODY.decode())
        result = subprocess.run(
            ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "30s",
             "--latency", "-s", script, f"http://127.0.0.1:{port}{path}"],
            capture_output=True, timeout=seconds + 60,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    out = result.stdout.decode()
    if result.returncode != 0:
        raise SystemExit(f"wrk failed: {out}{result.stderr.decode()}")
    total = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    if total is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    done, elapsed = int(total.group(1)), _duration(total.group(2))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p50 = re.search(r"^\s+50%\s+([\d.]+\w+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+\w+)", out, re.M)
    return {
        "requests": done,
        "seconds": elapsed,
        "rate": done / elapsed if elapsed else 0.0,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
        "p50_ms": _duration(p50.group(1)) * 1000 if p50 else None,
        "p99_ms": _duration(p99.group(1)) * 1000 if p99 else None,
        "tool": f"wrk -t{threads} -c{connections}",
        "raw": out,
    }


# -- the sink's figures ------------------------------------------------------


def http_get(sink: Child, path: str) -> bytes:
    assert sink.port is not None
    with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1]


def sink_count(sink: Child) -> int:
    return int(http_get(sink, "/_count"))


def sink_time_of(sink: Child, n: int) -> Optional[float]:
    value = json.loads(http_get(sink, f"/_at?n={n}"))
    return float(value) if value is not None else None


# -- the measurements ----------------------------------------------------------


class Profiler:
    """
    py-spy recording a process's stacks (collapsed format) until ``stop``,
    with ``--gil``: only the thread holding the GIL is sampled, so the
    shares are of the Python work that one core runs (a thread waiting on a
    commit or a socket outside the GIL is left out), as bench/README.md's
    profiles were taken.
    """

    def __init__(self, pid: int, output: str) -> None:
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(
            [py_spy if os.path.exists(py_spy) else "py-spy", "record", "--pid", str(pid), "--format", "raw",
             "--gil", "--rate", "250", "--output", output, "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # let py-spy attach before the load starts

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
            if proc.returncode not in (0, -signal.SIGINT):
                print(f"py-spy: {err.decode().strip()}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.budget
        self.use_wrk = shutil.which("wrk") is not None and not args.no_wrk

    def remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise SystemExit(f"out of time (--budget {self.args.budget:g}s) before {what}")
        return left

    def load(self, port: int, path: str, seconds: float) -> Dict[str, Any]:
        seconds = min(seconds, self.remaining("a load run") - 1)
        if self.use_wrk:
            return run_wrk(port, path, self.args.connections, seconds, self.args.threads)
        return run_fallback_load(port, path, self.args.connections, seconds, self.args.processes)

    def ceiling(self, work: str) -> Dict[str, Any]:
        port = free_port()
        bare = Child("bare", [sys.executable, os.path.abspath(__file__), "--serve-bare", str(port)], work, port=port)
        try:
            self.load(port, "/dispatch", self.args.warmup)
            before = bare.cpu_seconds()
            figures = self.load(port, "/dispatch", self.args.seconds)
            figures["cpu"] = (bare.cpu_seconds() - before) / figures["seconds"]
            return figures
        finally:
            bare.stop()

    def hookah(self, work: str, sink: Child) -> Dict[str, Any]:
        port = free_port()
        database = os.path.join(work, "hookah.db")
        argv = [self.args.twistd or TWISTD, "-n", "--pidfile=", "hookah", "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                "--storage", f"sqlite:{database}", "--allow-private-targets", *self.args.hookah_option]
        server = Child("hookah", argv, work, port=port)
        profiler: Optional[Profiler] = None
        try:
            path = "/dispatch?_url=" + quote(f"http://127.0.0.1:{sink.port}/hook", safe="")
            warmup = self.load(port, path, self.args.warmup)
            self.wait_for_sink(sink, warmup["requests"], "the warm-up deliveries")
            self.wait_for_quiet(sink)
            baseline = sink_count(sink)
            if self.args.profile:
                profiler = Profiler(server.proc.pid, self.args.profile)
            cpu_before = server.cpu_seconds()
            started = time.monotonic()
            figures = self.load(port, path, self.args.seconds)
            figures["cpu"] = (server.cpu_seconds() - cpu_before) / figures["seconds"]
            at_end = sink_count(sink) - baseline
            target = baseline + figures["requests"]
            self.wait_for_sink(sink, target, "every delivery")
            last = sink_time_of(sink, target)
            assert last is not None
            figures["delivered_seconds"] = last - started
            figures["delivered_rate"] = figures["requests"] / (last - started)
            figures["delivered_during_load"] = at_end
            figures["cpu_total"] = (server.cpu_seconds() - cpu_before) / (last - started)
            figures["connections"] = int(http_get(sink, "/_connections"))
            if profiler is not None:
                profiler.stop()
            # The same load with every delivery held back (_delay), so the
            # server only accepts: the cost of /dispatch alone.
            held = self.load(port, path + "&_delay=3600", self.args.seconds)
            figures["accept_only_rate"] = held["rate"]
            figures["accept_only_non_2xx"] = held.get("non_2xx", 0)
            figures["rss"] = server.rss()
            figures["db_bytes"] = sum(
                os.path.getsize(p) for p in (database, database + "-wal") if os.path.exists(p)
            )
            return figures
        finally:
            if profiler is not None:
                profiler.stop()
            server.stop()

    def webhooks(self, work: str, sink: Child, twistd: str, count: int) -> Dict[str, Any]:
        """
        A fresh Hookah (empty database) gets ``count`` dispatches from
        ``--connections`` connections, as fast as it answers: delivered/s is
        ``count`` over the time from the first dispatch sent to the
        ``count``-th delivery at the sink; accepted/s over the last ``202``.
        """
        port = free_port()
        database = os.path.join(work, f"webhooks-{count}-{os.getpid()}-{time.monotonic_ns()}.db")
        argv = [twistd, "-n", "--pidfile=", "hookah", "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                "--storage", f"sqlite:{database}", "--allow-private-targets", *self.args.hookah_option]
        server = Child("hookah-webhooks", argv, work, port=port)
        try:
            path = "/dispatch?_url=" + quote(f"http://127.0.0.1:{sink.port}/hook", safe="")
            # A short warm-up opens the connections to the sink.
            before = sink_count(sink)
            warm = run_count_load(port, path, self.args.connections, 200, 1)
            self.wait_for_sink(sink, before + warm["requests"], "the warm-up")
            self.wait_for_quiet(sink)
            baseline = sink_count(sink)
            cpu_before = server.cpu_seconds()
            figures = run_count_load(port, path, self.args.connections, count, self.args.processes)
            self.wait_for_sink(sink, baseline + figures["requests"], f"{count:,} deliveries")
            last = sink_time_of(sink, baseline + figures["requests"])
            assert last is not None
            seconds = last - figures["started"]
            figures.update(
                count=count,
                warmup_statuses=warm["statuses"],
                accepted_rate=figures["requests"] / (figures["finished"] - figures["started"]),
                delivered_seconds=seconds,
                delivered_rate=figures["requests"] / seconds,
                cpu=(server.cpu_seconds() - cpu_before) / seconds,
                # CPU time per webhook moves less than rates on a busy machine.
                cpu_ms=(server.cpu_seconds() - cpu_before) * 1000 / figures["requests"],
                rss=server.rss(),
            )
            return figures
        finally:
            server.stop()

    def wait_for_sink(self, sink: Child, count: int, what: str) -> None:
        while sink_count(sink) < count:
            self.remaining(what)
            time.sleep(0.02)

    def wait_for_quiet(self, sink: Child) -> None:
        """Until no delivery has arrived for half a second (the warm-up's stragglers)."""
        count = -1
        while count != sink_count(sink):
            self.remaining("the warm-up to settle")
            count = sink_count(sink)
            time.sleep(0.5)


def machine() -> Dict[str, str]:
    """``benchlib.machine()``, with the memory and Twisted's version."""
    memory = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        from twisted import version as twisted_version

        twisted = twisted_version.public()
    except Exception:
        twisted = "?"
    return {**benchlib.machine(), "memory": memory, "twisted": twisted}


def hotspots(path: str, top: int = 15) -> List[str]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: Dict[str, int] = {}
    inclusive: Dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"{total} samples; top functions by own time:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    lines.append("top functions by inclusive time:")
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top * 2]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return lines


def section(info: Dict[str, str], args: argparse.Namespace, bare: Dict[str, Any], hookah: Dict[str, Any]) -> str:
    ratio = hookah["rate"] / bare["rate"]
    lines = [
        "## Dispatch",
        "",
        f"`python bench/dispatch.py` on {info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} memory, "
        f"{info['python']}, Twisted {info['twisted']}; 1-minute load average {info['load']} when it started "
        f"(other work on the machine skews figures). Hookah as `twistd -n hookah --storage sqlite:<tmp>/hookah.db "
        f"--allow-private-targets` (default settings otherwise, text log to a file) in its own process; load from "
        f"`{hookah['tool']}` (keep-alive, {len(BODY)}-byte JSON body, {args.seconds:g} s after a "
        f"{args.warmup:g} s warm-up, {hookah['requests']:,} dispatches); deliveries to a minimal asyncio HTTP sink in a third process.",
        "",
        "| figure | result | design target |",
        "|---|---:|---|",
        f"| bare Twisted ceiling (`Resource` → `202`, `parsePOSTFormSubmission=False`) | {bare['rate']:,.0f} req/s | |",
        f"| `/dispatch` accepted/s (SQLite, durable before `202`) | {hookah['rate']:,.0f} req/s | |",
        f"| accepted / ceiling | **{ratio:.0%}** | ≥ 65 % |",
        f"| `/dispatch` accepted/s with deliveries held back (`_delay=3600`): accepting alone | "
        f"{hookah['accept_only_rate']:,.0f} req/s ({hookah['accept_only_rate'] / bare['rate']:.0%}) | |",
        f"| delivered/s to the sink (first dispatch → N-th delivery) | **{hookah['delivered_rate']:,.0f}**/s | "
        f"≥ {10 * CELERY:,.0f}/s (10× Celery's ~460) |",
        "",
        verdict(ratio, hookah["delivered_rate"]),
        "",
        f"Dispatch latency under load: p50 {fmt_ms(hookah.get('p50_ms'))}, p99 {fmt_ms(hookah.get('p99_ms'))} "
        f"(ceiling: p50 {fmt_ms(bare.get('p50_ms'))}, p99 {fmt_ms(bare.get('p99_ms'))}). Server CPU while accepting: "
        f"{hookah['cpu']:.0%} of one core (ceiling {bare['cpu']:.0%}); "
        f"{hookah['delivered_during_load']:,} of {hookah['requests']:,} were already delivered when the last "
        f"`202` came back; {hookah['connections']} connections to the sink carried all the deliveries (warm-up included); "
        f"server RSS afterwards {hookah['rss'] / 2**20:.0f} MiB. Hookah accepts and delivers in one process, so "
        "the accepted/s figure is the steady state in which what comes in also goes out.",
        "",
        "Run it: `apt-get install wrk` (optional: without it a multi-process asyncio generator is used, "
        "`--no-wrk`, which measured the same ceiling within a few per cent here), then `python bench/dispatch.py` (about a minute; "
        "`--seconds`, `--connections`, `--budget`, `--hookah-option=--concurrency=512` and others: `--help`). "
        "`--readme bench/README.md` rewrites this section; `--profile out.txt` records the server with py-spy "
        "(`pip install py-spy`) during the measured run and prints its hotspots.",
        "",
    ]
    return "\n".join(lines)


def verdict(ratio: float, delivered: float) -> str:
    met = [ratio >= TARGET, delivered >= 10 * CELERY]
    if all(met):
        return "Both targets are met."
    parts = []
    if not met[0]:
        parts.append(f"accepted/s is {ratio / TARGET:.0%} of its target")
    if not met[1]:
        parts.append(f"delivered/s is {delivered / (10 * CELERY):.0%} of its target")
    return "**Below target**: " + " and ".join(parts) + "."


def fmt_ms(value: Optional[float]) -> str:
    return f"{value:.1f} ms" if value is not None else "n/a"


def webhooks_mode(args: argparse.Namespace) -> None:
    """``--webhooks 5000,50000``: delivered/s per count and per ``--twistd``, back to back in one run."""
    counts = [int(c.replace("_", "")) for c in args.webhooks.split(",") if c.strip()]
    twistds = args.twistd or [TWISTD]
    info = machine()
    bench = Bench(args)
    work = tempfile.mkdtemp(prefix="hookah-bench-webhooks-")
    print(f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['memory']}, {info['python']}, "
          f"load average {info['load']}; {args.connections} client connections in {args.processes} processes; logs in {work}",
          flush=True)
    sink_port = free_port()
    sink = Child("sink", [sys.executable, os.path.abspath(__file__), "--serve-sink", str(sink_port)], work, port=sink_port)
    rows = []
    try:
        for count in counts:
            for twistd in twistds:
                f = bench.webhooks(work, sink, twistd, count)
                if set(f["statuses"]) != {"202"}:
                    print(f"WARNING: statuses {f['statuses']}")
                rows.append((count, twistd, f))
                print(f"{count:,} webhooks, {twistd}: delivered {f['delivered_rate']:,.0f}/s "
                      f"({f['requests']:,} in {f['delivered_seconds']:.2f} s from the first dispatch), accepted "
                      f"{f['accepted_rate']:,.0f}/s, server CPU {f['cpu']:.0%} ({f['cpu_ms']:.2f} ms per webhook), RSS {f['rss'] / 2**20:.0f} MiB; "
                      f"load average now {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        sink.stop()
    print()
    print("| webhooks | twistd | delivered/s | accepted/s | server CPU | server CPU per webhook |")
    print("|---:|---|---:|---:|---:|---:|")
    for count, twistd, f in rows:
        print(f"| {count:,} | `{twistd}` | {f['delivered_rate']:,.0f} | {f['accepted_rate']:,.0f} | {f['cpu']:.0%} | {f['cpu_ms']:.2f} ms |")
    shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-sink"]:
        return serve_sink(int(argv[1]))
    if argv[:1] == ["--serve-bare"]:
        return serve_bare(int(argv[1]))
    if argv[:1] == ["--load-worker"]:
        return load_worker(int(argv[1]), argv[2], int(argv[3]), float(argv[4]))
    if argv[:1] == ["--count-worker"]:
        return count_worker(int(argv[1]), argv[2], int(argv[3]), int(argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured load run [10]")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring [2]")
    parser.add_argument("--connections", type=int, default=64, help="concurrent keep-alive connections [64]")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads [1: leaves the other core to the servers]")
    parser.add_argument("--processes", type=int, default=2, help="generator processes without wrk [2]")
    parser.add_argument("--no-wrk", action="store_true", help="use the asyncio generator even if wrk is installed")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds before giving up altogether [300]")
    parser.add_argument("--hookah-option", action="append", default=[], help="extra hookah option (repeatable), e.g. --hookah-option=--concurrency=512")
    parser.add_argument("--twistd", action="append", default=[],
                        help="the twistd to run Hookah with, e.g. one in a PyPy virtualenv or in a virtualenv of older code "
                             "(repeatable in the --webhooks mode: each in turn, back to back) [next to this Python]")
    parser.add_argument("--webhooks", help="instead of the timed runs: deliver this many webhooks (comma-separated counts, "
                                           "e.g. 5000,50000) with each --twistd, a fresh server each, and report delivered/s")
    parser.add_argument("--profile", help="record the server with py-spy (--gil --rate 250) during the measured run into this file (collapsed stacks)")
    parser.add_argument("--readme", help="write the figures into this Markdown file's Dispatch section")
    args = parser.parse_args(argv)
    if args.webhooks:
        return webhooks_mode(args)
    if len(args.twistd) > 1:
        parser.error("several --twistd only with --webhooks")
    args.twistd = args.twistd[0] if args.twistd else None

    info = machine()
    bench = Bench(args)
    work = tempfile.mkdtemp(prefix="hookah-bench-dispatch-")
    print(f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['memory']}, {info['python']}, "
          f"Twisted {info['twisted']}, load average {info['load']}; load from {'wrk' if bench.use_wrk else 'asyncio'}; logs in {work}", flush=True)
    sink: Optional[Child] = None
    try:
        bare = bench.ceiling(work)
        print(f"bare Twisted ceiling: {bare['rate']:,.0f} req/s ({bare['requests']:,} in {bare['seconds']:.1f}s, "
              f"CPU {bare['cpu']:.0%}, p50 {fmt_ms(bare.get('p50_ms'))}, p99 {fmt_ms(bare.get('p99_ms'))})", flush=True)
        sink_port = free_port()
        sink = Child("sink", [sys.executable, os.path.abspath(__file__), "--serve-sink", str(sink_port)], work, port=sink_port)
        hookah = bench.hookah(work, sink)
    finally:
        if sink is not None:
            sink.stop()
    for name, figures in (("ceiling", bare), ("hookah", hookah)):
        if figures.get("non_2xx") or figures.get("socket_errors") or figures.get("accept_only_non_2xx"):
            print(f"WARNING {name}: {figures.get('non_2xx')} non-2xx responses; socket errors: {figures.get('socket_errors')}")
        statuses = figures.get("statuses")
        if statuses and set(statuses) != {"202"}:
            print(f"WARNING {name}: statuses {statuses}")
    ratio = hookah["rate"] / bare["rate"]
    print(f"/dispatch accepted: {hookah['rate']:,.0f} req/s ({hookah['requests']:,} in {hookah['seconds']:.1f}s, "
          f"server CPU {hookah['cpu']:.0%}, p50 {fmt_ms(hookah.get('p50_ms'))}, p99 {fmt_ms(hookah.get('p99_ms'))}) "
          f"= {ratio:.0%} of the ceiling (target >= {TARGET:.0%})")
    print(f"delivered: {hookah['delivered_rate']:,.0f}/s ({hookah['requests']:,} in {hookah['delivered_seconds']:.1f}s "
          f"from the first dispatch; {hookah['delivered_during_load']:,} already delivered when the load ended; "
          f"target >= {10 * CELERY:,.0f}/s)")
    print(f"accepting alone (deliveries held back with _delay): {hookah['accept_only_rate']:,.0f} req/s "
          f"= {hookah['accept_only_rate'] / bare['rate']:.0%} of the ceiling")
    print(f"server RSS {hookah['rss'] / 2**20:.0f} MiB; SQLite file {hookah['db_bytes'] / 2**20:.1f} MiB; "
          f"{hookah['connections']} connections to the sink", flush=True)
    if args.profile:
        try:
            print("\n".join(hotspots(args.profile)))
        except (OSError, ValueError) as e:
            print(f"no profile: {e}")
    if args.readme:
        write_section(args.readme, "Dispatch", section(info, args, bare, hookah))
        print(f"wrote the Dispatch section of {args.readme}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
