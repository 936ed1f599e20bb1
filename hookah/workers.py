"""
``--workers N``: one master process and N worker processes.

A Python process uses one core; a server on several cores runs several
processes. The master opens the listening socket once and hands it to each
worker (``childFDs``), which adopts it (``adoptStreamPort``): the kernel
spreads new connections over the workers, and no port is ever bound twice.
The workers are whole Hookah servers, nodes of one shared store
(PostgreSQL), so a delivery, a stream or a claim works the same whichever
worker took the request.

The master does nothing but keep the workers running: ``SIGTERM`` to it
stops them all (each lets its attempts in flight finish), a worker that
dies is started again after a pause that doubles while restarts keep
failing, and what it had claimed goes to the others when the claims
lapse. It also owns the directory where the workers' metrics meet
(``PROMETHEUS_MULTIPROC_DIR``), so ``/metrics`` on any worker counts the
whole server.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hookah.config import Config, with_backlog

log = Logger()

# How a worker learns which descriptor is the listening socket, and which
# worker it is (for its log lines). Not settings: only the master sets them.
FD_VARIABLE = "HOOKAH_WORKER_FD"
INDEX_VARIABLE = "HOOKAH_WORKER_INDEX"
LISTEN_FD = 3

# Restart pauses: the first, the longest, and how long a worker must have
# run for its next death to count as a fresh one.
FIRST_PAUSE = 0.5
LONGEST_PAUSE = 30.0
STEADY = 60.0


def worker_fd(environ: Optional[Dict[str, str]] = None) -> Optional[int]:
    """The listening descriptor handed down by a master, in a worker."""
    value = (environ if environ is not None else os.environ).get(FD_VARIABLE)
    return int(value) if value else None


def worker_index(environ: Optional[Dict[str, str]] = None) -> Optional[int]:
    """Which worker this process is (0 .. N-1) under ``--workers``; None otherwise."""
    value = (environ if environ is not None else os.environ).get(INDEX_VARIABLE)
    return int(value) if value else None


def socket_family(fd: int) -> socket.AddressFamily:
    """The address family of the listening socket ``fd`` (not closed)."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return probe.family
    finally:
        probe.close()


def twistd_argv(hookah_args: Sequence[str]) -> List[str]:
    """A worker's command line: this Python running ``twistd -n hookah`` with the master's options."""
    boot = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    return [sys.executable, "-c", boot, "-n", "--pidfile=", "hookah", *hookah_args]


class _Worker(ProcessProtocol):
    """One worker process: tells the pool when it has ended."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.started = pool.reactor.seconds()
        self.ended: Deferred = Deferred()
        self.process: Any = None
        self.pid = 0

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self, reason)
        self.ended.callback(None)


class _NoConnections(Protocol):
    """The master never accepts on the socket it holds for its workers."""


class WorkerPool(Service):
    """
    The master: binds ``config.listen``, starts ``count`` workers running
    ``argv`` (``twistd_argv`` of the master's own options) with the socket
    as descriptor 3, restarts those that die, and stops them all on stop.
    """

    name = "workers"

    def __init__(self, config: Config, argv: Sequence[str], reactor: Any, count: int, stop_timeout: float = 0.0) -> None:
        self.config = config
        self.argv = list(argv)
        self.reactor = reactor
        self.count = count
        # Workers finish their attempts in flight before they exit: allow
        # one attempt's timeout, then kill what is left.
        self.stop_timeout = stop_timeout or config.timeout + 10.0
        self.port: Any = None
        self.workers: Dict[int, _Worker] = {}
        self.pauses: Dict[int, float] = {}
        self.restarts: Dict[int, IDelayedCall] = {}
        self.metrics_dir = ""
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self.metrics_dir = tempfile.mkdtemp(prefix="hookah-metrics-")
        endpoint = serverFromString(self.reactor, with_backlog(self.config.listen, self.config.backlog))
        d = endpoint.listen(Factory.forProtocol(_NoConnections))
        d.addCallback(self._listening)
        d.addErrback(self._cannot_listen)

    def _listening(self, port: Any) -> None:
        # The socket stays open here, but only the workers accept on it.
        port.stopReading()
        self.port = port
        log.info(
            "hookah master listening on {listen}, starting {count} workers", listen=self.config.listen, count=self.count
        )
        for index in range(self.count):
            self._spawn(index)

    def _cannot_listen(self, failure: Failure) -> None:
        # As a single server does: one line, then exit status 1.
        log.critical("hookah: cannot start: {reason}", reason=failure.getErrorMessage())
        self.reactor.addSystemEventTrigger("after", "shutdown", exit_with_failure)
        self.reactor.stop()

    def _spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        if self._stopping:
            return
        env = dict(os.environ)
        env[FD_VARIABLE] = str(LISTEN_FD)
        env[INDEX_VARIABLE] = str(index)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        worker = _Worker(self, index)
        worker.process = self.reactor.spawnProcess(
            worker, self.argv[0], self.argv, env=env,
            childFDs={0: "w", 1: 1, 2: 2, LISTEN_FD: self.port.fileno()},
        )
        worker.pid = worker.process.pid
        self.workers[index] = worker
        log.info("hookah worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        _forget_process(self.metrics_dir, worker.pid)
        if self._stopping:
            return
        lived = self.reactor.seconds() - worker.started
        pause = FIRST_PAUSE if lived >= STEADY else min(LONGEST_PAUSE, self.pauses.get(worker.index, FIRST_PAUSE / 2) * 2)
        self.pauses[worker.index] = pause
        log.error(
            "hookah worker {index} ended ({reason}); starting it again in {pause}s",
            index=worker.index, reason=reason.getErrorMessage(), pause=pause,
        )
        self.restarts[worker.index] = self.reactor.callLater(pause, self._spawn, worker.index)

    def pids(self) -> List[int]:
        """The running workers' process ids."""
        return [w.pid for w in self.workers.values()]

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        workers = list(self.workers.values())
        for worker in workers:
            _signal(worker, "TERM")
        killer = self.reactor.callLater(self.stop_timeout, _signal_all, workers, "KILL")
        d = DeferredList([w.ended for w in workers]) if workers else succeed(None)

        def done(_: object) -> Optional[Deferred]:
            if killer.active():
                killer.cancel()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            if self.port is not None:
                return self.port.stopListening()
            return None

        return d.addCallback(done)


def exit_with_failure() -> None:
    """
    Leave with exit status 1 once the reactor has shut down and the log is
    flushed: twistd has no exit status of its own to set (a server that
    could not start, a master whose workers cannot run).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _signal(worker: _Worker, name: str) -> None:
    try:
        worker.process.signalProcess(name)
    except Exception:
        pass  # it has ended already


def _signal_all(workers: Sequence[_Worker], name: str) -> None:
    for worker in workers:
        _signal(worker, name)


def _forget_process(directory: str, pid: Optional[int]) -> None:
    """A dead worker's live gauges stop counting (its counters stay: they are totals)."""
    if not directory or not pid:
        return
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)
    except Exception:
        log.failure("forgetting the metrics of worker process {pid} failed", pid=pid)


def watch_master(reactor: Any, interval: float = 1.0) -> Any:
    """
    In a worker: stop when the master is gone (killed with ``-9``, it
    cannot stop its workers), rather than serve on alone.
    """
    from twisted.internet.task import LoopingCall

    master = os.getppid()

    def check() -> None:
        if os.getppid() != master:
            log.warn("hookah master {pid} is gone; this worker stops", pid=master)
            loop.stop()
            reactor.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(interval, now=False)
    return loop


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    In a worker: an endpoint whose ``listen`` serves on the listening
    socket the master handed down as ``fd``, instead of binding a port.
    Each ``listen`` adopts a duplicate; stopping it closes only that, so
    the master and the other workers go on accepting from the socket.
    """

    def __init__(self, fd: int, reactor: Any) -> None:
        self.fd = fd
        self.reactor = reactor

    def listen(self, factory: Any) -> Deferred:
        try:
            return succeed(self.reactor.adoptStreamPort(self.fd, socket_family(self.fd), factory))
        except Exception:
            return fail()
