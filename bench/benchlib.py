"""
What the benchmark scripts in this folder share: their child processes
(started, watched, stopped), the CPU and memory readings taken from
``/proc``, a minimal HTTP/1.1 server protocol, percentiles, the machine's
description for the report and the rewriting of one ``## Section`` of a
Markdown file.

Not a package: each script runs as ``python bench/<name>.py`` and imports
this file as a sibling module (``import benchlib``).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import re
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")  # the one next to this Python


# -- processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> List[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_delay_seconds(pid: int) -> float:
    """
    Seconds the main thread of ``pid`` has spent runnable but not running
    (``/proc/<pid>/schedstat``, second field: waiting for a CPU, and held
    back by a cgroup quota).
    """
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def descendants(pid: int) -> List[int]:
    """``pid`` and its live descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            continue  # it ended meanwhile
    return found


def tree_cpu_seconds(pid: int, ended: bool = False) -> float:
    """
    User and system CPU time of ``pid`` and its live descendants; with
    ``ended``, also of the descendants that ended and were waited for (a
    postmaster's backends of closed connections).
    """
    ticks = 0
    for member in descendants(pid):
        try:
            fields = _stat(member)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
        if ended and member == pid:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(cluster: Any) -> Optional[float]:
    """The CPU time a throwaway cluster's server has used so far (None: another server)."""
    if cluster is None:
        return None
    with open(os.path.join(cluster.data, "postmaster.pid")) as f:
        return tree_cpu_seconds(int(f.readline()), ended=True)


def machine_cpu_seconds() -> Tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, summed over its cores (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    tick = os.sysconf("SC_CLK_TCK")
    return (total - idle) / tick, total / tick


def rss(pid: int) -> Optional[int]:
    """A process's resident set size in bytes; None if ``/proc`` does not tell."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def wait_for_port(port: int, proc: subprocess.Popen, deadline: float) -> bool:
    """Until ``port`` accepts a connection (True), or ``proc`` exits or ``deadline`` passes (False)."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen, timeout: float, kill_timeout: Optional[float]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=kill_timeout)


class Child:
    """
    A server process, stopped by ``stop`` whatever its state. Ready once
    ``port`` accepts connections or, with ``announce``, once it has printed
    one JSON line (then in ``announced``). ``started`` is called with the
    process id as soon as the process exists, before it is ready (to put it
    in a cgroup, say); if it raises, the process is stopped.
    """

    def __init__(self, name: str, argv: List[str], log_dir: str, port: Optional[int] = None,
                 ready: float = 30.0, announce: bool = False,
                 started: Optional[Callable[[int], None]] = None) -> None:
        self.name = name
        self.port = port
        self.announced: Any = None
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=log_dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if announce else self.log, stderr=self.log if announce else subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("HOOKAH_")},
        )
        if started is not None:
            try:
                started(self.proc.pid)
            except BaseException:
                self.stop()
                raise
        deadline = time.monotonic() + ready
        if announce:
            # The process prints one JSON line once it listens.
            assert self.proc.stdout is not None
            while True:
                readable, _, _ = select.select([self.proc.stdout], [], [], 0.2)
                if readable:
                    line = self.proc.stdout.readline()
                    if line:
                        self.announced = json.loads(line)
                        return
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"{name} did not start; see {self.log_path}")
        assert port is not None
        if not wait_for_port(port, self.proc, deadline):
            self.stop()
            raise SystemExit(f"{name} did not start; see {self.log_path}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return rss(self.proc.pid) or 0

    def stop(self) -> None:
        stop_process(self.proc, 15, 15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def raise_open_files_limit() -> None:
    """Soft limit on open files up to the hard one (children inherit it): many sockets ahead."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- a minimal HTTP/1.1 server ---------------------------------------------------


class HttpServerProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; Content-Length or chunked bodies."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            start = end + 4
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body, position = b"", start
                while True:
                    line_end = self.buffer.find(b"\r\n", position)
                    if line_end < 0:
                        return
                    size = int(self.buffer[position:line_end].split(b";")[0], 16)
                    if size == 0:
                        trailer_end = self.buffer.find(b"\r\n\r\n", line_end)
                        if trailer_end < 0:
                            return
                        rest = trailer_end + 4
                        break
                    if line_end + 2 + size + 2 > len(self.buffer):
                        return
                    body += self.buffer[line_end + 2 : line_end + 2 + size]
                    position = line_end + 2 + size + 2
            else:
                rest = start + int(headers.get("content-length", "0") or 0)
                if len(self.buffer) < rest:
                    return
                body = self.buffer[start:rest]
            self.buffer = self.buffer[rest:]
            method, _, target = lines[0].partition(" ")
            self.request(method, target.rpartition(" ")[0], headers, body)
            if headers.get("connection", "").lower() == "close":
                self.transport.close()
                return

    def request(self, method: str, target: str, headers: Dict[str, str], body: bytes) -> None:
        """One complete request (``target``: path and query); answer it on ``self.transport``."""
        raise NotImplementedError


# -- figures ---------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def shares(total: int, parts: int) -> List[int]:
    """``total`` split into ``parts`` near-equal whole shares, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- the report ------------------------------------------------------------------


def machine() -> Dict[str, str]:
    """CPU count and model, Python, date and 1-minute load average, for the report."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "load": f"{os.getloadavg()[0]:.1f}",
    }


def write_section(path: str, title: str, text: str) -> None:
    """Replace (or append) the ``## <title>`` section of a Markdown file, leaving the others alone."""
    try:
        with open(path) as f:
            existing = f.read()
    except FileNotFoundError:
        existing = "# Benchmarks\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(existing):
        existing = pattern.sub(lambda _: text + "\n", existing, count=1)
    else:
        existing = existing.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(existing)
