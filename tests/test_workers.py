"""
``--workers``: refused where the workers could not share the store, and
the master's bookkeeping (the socket handed down, restarts and their
pauses, stopping) on a Clock. The real processes on PostgreSQL are in
``tests/test_workers_e2e.py``.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Dict, List, Tuple

from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from hookah.config import Config, ConfigError, build_config
from hookah.workers import FD_VARIABLE, INDEX_VARIABLE, LISTEN_FD, WorkerPool
from tests.support import clean_environment, temp_dir
from tests.test_e2e_durability import TWISTD, WAIT



class WorkersOptionTests(TestCase):
    def test_more_than_one_worker_on_sqlite_or_memory_is_refused_in_one_line(self) -> None:
        directory = temp_dir(self)
        for storage in ("sqlite:hookah.db", "memory:"):
            result = subprocess.run(
                [TWISTD, "-n", "--pidfile=", "hookah", "--workers", "2", "--storage", storage,
                 "--listen", "tcp:0:interface=127.0.0.1"],
                cwd=directory, env=clean_environment(), capture_output=True, timeout=WAIT,
            )
            self.assertEqual(result.returncode, 2, result.stderr)
            lines = result.stderr.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertIn("--workers 2", lines[0])
            self.assertIn("PostgreSQL", lines[0])
        self.assertFalse(os.path.exists(os.path.join(directory, "hookah.db")))

    def test_workers_counts_auto_and_bad_values(self) -> None:
        self.assertEqual(build_config({"workers": "1", "storage": "memory:"}, {}).workers, 1)
        for bad in ("0", "-1", "lots", "1.5"):
            with self.assertRaises(ConfigError) as caught:
                build_config({"workers": bad, "storage": "memory:"}, {})
            self.assertIn("--workers", str(caught.exception))
        cores = os.cpu_count() or 1
        if cores == 1:
            self.assertEqual(build_config({"workers": "auto", "storage": "memory:"}, {}).workers, 1)
        else:
            with self.assertRaises(ConfigError) as caught:
                build_config({"workers": "auto", "storage": "memory:"}, {})
            self.assertIn(f"--workers {cores} ", str(caught.exception))


class FakeListeningPort:
    def __init__(self) -> None:
        self.reading = True
        self.listening = True

    def fileno(self) -> int:
        return 42

    def stopReading(self) -> None:
        self.reading = False

    def stopListening(self) -> None:
        self.listening = False


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: List[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class PoolReactor(MemoryReactorClock):
    """Listening and processes on paper, time on a Clock."""

    def __init__(self) -> None:
        super().__init__()
        self.port = FakeListeningPort()
        self.spawned: List[Tuple[Any, Dict[str, str], Dict[int, Any], FakeProcess]] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:  # type: ignore[override]
        return self.port

    def spawnProcess(self, protocol: Any, executable: Any, args: Any = (), env: Any = None, path: Any = None,  # type: ignore[override]
                     uid: Any = None, gid: Any = None, usePTY: Any = False, childFDs: Any = None) -> Any:
        process = FakeProcess(1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append((protocol, dict(env or {}), dict(childFDs or {}), process))
        return process


def died(protocol: Any) -> None:
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))


class WorkerPoolTests(TestCase):
    """The master's bookkeeping, on a Clock: restarts and their pauses, stopping."""

    def pool(self, count: int = 2) -> Tuple[WorkerPool, PoolReactor]:
        reactor = PoolReactor()
        pool = WorkerPool(Config(listen="tcp:0:interface=127.0.0.1", workers=count), ["python", "-c", "pass"], reactor, count)
        pool.startService()

        def stop() -> None:
            if pool.running:
                stopped = pool.stopService()
                for protocol, _, _, _ in reactor.spawned:
                    if not protocol.ended.called:
                        died(protocol)
                self.successResultOf(stopped)

        self.addCleanup(stop)
        return pool, reactor

    def test_workers_get_the_socket_and_the_master_never_accepts_on_it(self) -> None:
        pool, reactor = self.pool()
        self.assertEqual(len(reactor.spawned), 2)
        self.assertFalse(reactor.port.reading)
        for index, (_, env, fds, _) in enumerate(reactor.spawned):
            self.assertEqual(fds[LISTEN_FD], reactor.port.fileno())
            self.assertEqual((env[FD_VARIABLE], env[INDEX_VARIABLE]), (str(LISTEN_FD), str(index)))
            self.assertTrue(os.path.isdir(env["PROMETHEUS_MULTIPROC_DIR"]))
        self.assertEqual(sorted(pool.pids()), [1000, 1001])

    def test_a_dead_worker_is_started_again_after_a_pause_that_doubles_while_it_keeps_dying(self) -> None:
        pool, reactor = self.pool()
        pauses = []
        for _ in range(8):
            protocol = next(p for p, env, _, _ in reversed(reactor.spawned) if env[INDEX_VARIABLE] == "0")
            spawned = len(reactor.spawned)
            reactor.advance(1.0)
            died(protocol)
            waited = 0.0
            while len(reactor.spawned) == spawned:
                reactor.advance(0.25)
                waited += 0.25
            pauses.append(waited)
            self.assertEqual(reactor.spawned[-1][1][INDEX_VARIABLE], "0")
        self.assertEqual(pauses, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        # One that ran a while before it died starts again soon.
        protocol = reactor.spawned[-1][0]
        reactor.advance(120.0)
        spawned = len(reactor.spawned)
        died(protocol)
        reactor.advance(0.5)
        self.assertEqual(len(reactor.spawned), spawned + 1)

    def test_stopping_ends_every_worker_and_starts_none_again(self) -> None:
        pool, reactor = self.pool()
        stopped = pool.stopService()
        processes = [process for _, _, _, process in reactor.spawned]
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM"]])
        died(reactor.spawned[0][0])
        reactor.advance(60.0)  # the other one hangs: killed once the stop timeout is over
        self.assertEqual(processes[1].signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        died(reactor.spawned[1][0])
        self.successResultOf(stopped)
        self.assertEqual(len(reactor.spawned), 2)
        self.assertFalse(reactor.port.listening)


