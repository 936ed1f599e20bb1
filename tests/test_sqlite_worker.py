"""
``SQLWorker``'s commit delay: a write with others queued behind it, or one
that comes less than the delay after the last commit, waits a moment so
that what arrives meanwhile shares its commit; a write after a pause never
waits. Real thread, real reactor; the delay and the worker's clock are
functions the test controls, so nothing here depends on how long anything
takes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Generator, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from hookah.storage.sqlite.worker import SQLWorker
from tests.support import temp_dir

_Gen = Generator[Deferred[Any], Any, None]


def insert(value: str) -> Any:
    def work(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO t VALUES (?)", (value,))

    return work


class CommitDelayTests(TestCase):
    def setUp(self) -> None:
        self.sleeps: List[float] = []
        self.sleeping = threading.Event()
        self.resume = threading.Event()
        self.addCleanup(self.resume.set)
        # The worker's clock: it moves only when a test moves it.
        self.now = 1000.0

    def sleep(self, seconds: float) -> None:
        """The worker's delay: noted, and held until the test says go."""
        self.sleeps.append(seconds)
        self.sleeping.set()
        self.resume.wait(10)

    @inlineCallbacks
    def start(self, delay: float) -> Generator[Deferred[Any], Any, SQLWorker]:
        path = os.path.join(temp_dir(self, prefix="hookah-worker-"), "w.db")

        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            connection.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
            return connection

        worker = SQLWorker(
            connect, reactor, path=path, batch_limit=100, commit_delay=delay, sleep=self.sleep, clock=lambda: self.now
        )
        yield worker.start()
        self.addCleanup(worker.stop)
        return worker

    def rows(self, worker: SQLWorker) -> Deferred:
        return worker.submit(lambda c: sorted(v for (v,) in c.execute("SELECT v FROM t")), write=False)

    def block(self, worker: SQLWorker) -> threading.Event:
        """Hold the worker in a transaction; what is submitted meanwhile queues behind it."""
        running, release = threading.Event(), threading.Event()

        def blocker(connection: sqlite3.Connection) -> None:
            running.set()
            release.wait(10)

        worker.submit(blocker, write=False)
        self.assertTrue(running.wait(10), "the worker never started the blocker")
        self.addCleanup(release.set)
        return release

    @inlineCallbacks
    def test_a_lone_write_is_not_delayed(self) -> _Gen:
        worker = yield self.start(delay=0.001)
        before = worker.transactions
        yield worker.submit(insert("a"), write=True)
        self.assertEqual(self.sleeps, [])
        self.assertEqual(worker.transactions - before, 1)
        # Long after that commit: still alone, still not delayed.
        self.now += 1.0
        yield worker.submit(insert("b"), write=True)
        self.assertEqual(self.sleeps, [])

    @inlineCallbacks
    def test_a_write_soon_after_a_commit_waits(self) -> _Gen:
        worker = yield self.start(delay=0.001)
        yield worker.submit(insert("a"), write=True)
        self.now += 0.0005  # within the delay of that commit: the server is busy
        self.resume.set()  # the delay passes at once
        yield worker.submit(insert("b"), write=True)
        self.assertEqual(self.sleeps, [0.001])

    @inlineCallbacks
    def test_writes_queued_behind_one_wait_and_what_comes_meanwhile_joins_them(self) -> _Gen:
        worker = yield self.start(delay=0.001)
        release = self.block(worker)
        first = [worker.submit(insert(v), write=True) for v in ("a", "b")]
        before = worker.transactions
        release.set()
        # The worker took "a", saw "b" behind it, and waits.
        self.assertTrue(self.sleeping.wait(10), "the worker did not wait with writes queued")
        late = worker.submit(insert("c"), write=True)
        self.resume.set()
        yield gatherResults(first + [late])
        self.assertEqual(self.sleeps, [0.001])
        # The blocker's transaction, then one for a, b and c.
        self.assertEqual(worker.transactions - before, 2)
        self.assertEqual((yield self.rows(worker)), ["a", "b", "c"])

    @inlineCallbacks
    def test_no_delay_configured_never_waits(self) -> _Gen:
        worker = yield self.start(delay=0.0)
        release = self.block(worker)
        writes = [worker.submit(insert(v), write=True) for v in ("a", "b", "c")]
        release.set()
        yield gatherResults(writes)
        self.assertEqual(self.sleeps, [])
        self.assertEqual((yield self.rows(worker)), ["a", "b", "c"])
