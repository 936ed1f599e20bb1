"""
``SQLWorker``: the one thread that ever touches a SQLite connection.

SQLite allows one writer at a time, and a connection belongs to the thread
that uses it, so the store hands all its work to one thread and never waits
on SQLite from the reactor thread: ``submit`` queues an operation and
returns a Deferred that the worker fires through ``reactor.callFromThread``.

Group commit is the point. Whatever operations queued up while the worker
was busy (up to ``batch_limit``) run in one transaction with one commit,
hence one fsync, however many concurrent requests they came from. Each write
runs in its own SAVEPOINT so that one failing operation (a duplicate id,
say) errbacks its own Deferred and rolls back only its own work while the
rest of the batch commits.

When the server is busy (others are queued behind the operation the
worker just took, or the last commit ended less than ``commit_delay`` ago)
the worker waits ``commit_delay`` (a fifth of a millisecond) before it starts,
so that what arrives meanwhile shares the commit: under load a transaction
and its fsync cost more CPU (the kernel's journal, the hand-back to the
reactor thread) than that wait costs in latency (in the dispatch bench,
about a sixth less CPU per webhook, and more webhooks a second with 16
clients than with a 0.5 or 1 ms wait). On a quiet machine
the worker wakes for each operation as it comes, so the queue behind it is
mostly empty even under load: the time since the last commit is what tells.
An operation after a pause longer than the delay is never delayed.

This module knows nothing of Hookah's schema: an operation is any function
of the connection, and ``connect`` (run on the worker thread) opens and
prepares the connection.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

Work = Callable[[sqlite3.Connection], Any]
_Outcome = Tuple["Deferred[Any]", bool, Any]


class StoreClosed(Exception):
    """The store is not open: not yet, no longer, or it failed to open."""


class _Operation:
    """
    One unit of work for the worker thread. ``isolated`` writes run in a
    savepoint of their own, so their failure undoes only them; writes that
    cannot fail half-way skip it, which saves two statements per operation
    on the hottest paths. Such a write may fail alone only with a
    ``LookupError`` raised before it changed anything; any other error
    fails and rolls back its whole batch. An ``atomic`` write is a single
    statement, which SQLite applies whole or undoes by itself: it skips
    the savepoint and any error of it fails it alone.
    """

    __slots__ = ("deferred", "work", "write", "isolated", "atomic")

    def __init__(
        self, deferred: Deferred[Any], work: Work, write: bool, isolated: bool = True, atomic: bool = False
    ) -> None:
        self.deferred = deferred
        self.work = work
        self.write = write
        self.isolated = isolated and not atomic
        self.atomic = atomic


def _fire(outcomes: Sequence[_Outcome]) -> None:
    """Fire a batch's Deferreds; runs on the reactor thread."""
    for deferred, ok, value in outcomes:
        if ok:
            deferred.callback(value)
        else:
            deferred.errback(value)


class SQLWorker:
    """
    A queue of operations and the thread that runs them in batches.

    ``reactor`` must provide ``IReactorFromThreads``. ``path`` names the
    database in errors and in the thread's name.
    """

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], reactor: Any, *, path: str, batch_limit: int,
        commit_delay: float = 0.0, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._reactor = reactor
        self._path = path
        self._batch_limit = batch_limit
        self._commit_delay = commit_delay
        self._sleep = sleep
        self._clock = clock
        # Operations for the thread, in order; ``None`` tells it to stop.
        # A SimpleQueue (C, one lock) rather than a Condition over a deque:
        # each write submitted costs a put instead of a Python-level lock
        # dance and notify, twice per webhook. Only the reactor thread puts;
        # only it reads ``_accepting`` (the worker clears it when it dies,
        # and ``_exit``, on the reactor thread, fails what came in since).
        self._pending: queue.SimpleQueue[Optional[_Operation]] = queue.SimpleQueue()
        self._accepting = False
        self.thread: Optional[threading.Thread] = None
        self._opened: Optional[Deferred[None]] = None
        self._exited = False
        self._exitFailure: Optional[Failure] = None
        self._closeWaiters: List[Deferred[None]] = []
        self.transactions = 0
        """How many transactions have committed."""

    # -- lifecycle (reactor thread) --------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the thread; fires once ``connect`` has returned."""
        if self.thread is not None:
            return fail(StoreClosed("open() may be called only once"))
        self._opened = Deferred()
        self._accepting = True
        self.thread = threading.Thread(
            target=self._work,
            name=f"hookah-sqlite {self._path}",
            # A reactor stopped without close() must not hang the exit; what
            # was committed is safe either way.
            daemon=True,
        )
        self.thread.start()
        return self._opened

    def stop(self) -> Deferred[None]:
        """Refuse new operations, run the queued ones, then stop the thread."""
        if self.thread is None or self._exited:
            self._accepting = False
            return fail(self._exitFailure) if self._exitFailure else succeed(None)
        if self._accepting:
            self._accepting = False
            self._pending.put(None)
        waiter: Deferred[None] = Deferred()
        self._closeWaiters.append(waiter)
        return waiter

    def submit(self, work: Work, write: bool, isolated: bool = True, atomic: bool = False) -> Deferred[Any]:
        """Queue ``work`` (``_Operation`` says what ``isolated`` and ``atomic`` mean); the Deferred fires with its result once committed."""
        if not self._accepting:
            return fail(StoreClosed(self._path))
        d: Deferred[Any] = Deferred()
        self._pending.put(_Operation(d, work, write, isolated, atomic))
        return d

    def _take_pending(self) -> List[_Operation]:
        """Whatever is queued now, without waiting."""
        taken: List[_Operation] = []
        while not self._pending.empty():
            op = self._pending.get_nowait()
            if op is not None:
                taken.append(op)
        return taken

    def _exit(self, failure: Optional[Failure]) -> None:
        """The worker has returned; runs on the reactor thread."""
        assert self.thread is not None
        self.thread.join()
        self._exited = True
        self._accepting = False
        # Operations submitted after the thread's last look at its queue.
        stranded = self._take_pending()
        if stranded:
            lost = Failure(StoreClosed(f"{self._path}: the worker stopped"))
            _fire([(op.deferred, False, lost) for op in stranded])
        self._exitFailure = failure
        waiters, self._closeWaiters = self._closeWaiters, []
        for waiter in waiters:
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)

    # -- the worker thread -----------------------------------------------------

    def _work(self) -> None:
        """The worker thread's whole life: connect, run batches, drain, close."""
        callFromThread = self._reactor.callFromThread
        assert self._opened is not None
        try:
            connection = self._connect()
        except Exception:
            failure = Failure()
            self._accepting = False
            stranded = [(op.deferred, False, failure) for op in self._take_pending()]
            # No log here: the failure goes to open()'s caller, which says
            # it once (twistd: one line, then exit 1).
            callFromThread(self._opened.errback, failure)
            callFromThread(_fire, stranded)
            callFromThread(self._exit, None)
            return
        callFromThread(self._opened.callback, None)
        exitFailure: Optional[Failure] = None
        pending = self._pending
        limit = self._batch_limit
        delay, sleep, clock = self._commit_delay, self._sleep, self._clock
        committed = float("-inf")  # when the last transaction ended
        try:
            stopping = False
            while not stopping:
                op = pending.get()
                if op is None:
                    break
                batch = [op]
                if delay and (not pending.empty() or clock() - committed < delay):
                    # Busy: let more join this commit (module docstring).
                    sleep(delay)
                while len(batch) < limit and not pending.empty():
                    op = pending.get_nowait()
                    if op is None:
                        # Run what came before the stop, then leave.
                        stopping = True
                        break
                    batch.append(op)
                outcomes = self._transact(connection, batch)
                if delay:
                    committed = clock()
                callFromThread(_fire, outcomes)
        except BaseException:
            # A bug in this loop, not in an operation: report it from close()
            # rather than leave the store silently deaf.
            exitFailure = Failure()
        finally:
            self._accepting = False
            leftover = self._take_pending()
            if leftover:
                lost = Failure(StoreClosed(f"{self._path}: the worker stopped"))
                callFromThread(_fire, [(op.deferred, False, lost) for op in leftover])
            try:
                connection.close()
            except Exception:
                exitFailure = exitFailure or Failure()
            callFromThread(self._exit, exitFailure)

    def _transact(
        self, connection: sqlite3.Connection, batch: List[_Operation]
    ) -> List[_Outcome]:
        """Run ``batch`` in one transaction; each write in its own savepoint."""
        outcomes: List[_Outcome] = []
        execute = connection.execute
        try:
            writes = any(op.write for op in batch)
            execute("BEGIN IMMEDIATE" if writes else "BEGIN")
            for op in batch:
                if not (op.write and op.isolated):
                    try:
                        outcomes.append((op.deferred, True, op.work(connection)))
                    except LookupError:
                        # The one failure a non-isolated write may report
                        # alone: "no such row", raised before any change.
                        outcomes.append((op.deferred, False, Failure()))
                    except Exception:
                        if op.write and not (op.atomic and connection.in_transaction):
                            # Anything else may have left part of it done,
                            # with no savepoint to undo just that part (or
                            # SQLite rolled the whole transaction back): the
                            # whole batch fails and rolls back.
                            raise
                        outcomes.append((op.deferred, False, Failure()))
                    continue
                execute("SAVEPOINT op")
                try:
                    result = op.work(connection)
                except Exception:
                    if not connection.in_transaction:
                        # SQLite rolled the whole transaction back (disk
                        # full, I/O error): the batch fails below.
                        raise
                    outcomes.append((op.deferred, False, Failure()))
                    execute("ROLLBACK TO op")
                else:
                    outcomes.append((op.deferred, True, result))
                execute("RELEASE op")
            execute("COMMIT")
        except Exception:
            # Nothing of this batch is durable, even what already succeeded.
            failure = Failure()
            try:
                if connection.in_transaction:
                    execute("ROLLBACK")
            except Exception:
                pass  # the original failure is the one worth reporting
            self._reactor.callFromThread(
                log.failure,
                "SQLite transaction of {count} operations failed",
                failure,
                count=len(batch),
            )
            return [(op.deferred, False, failure) for op in batch]
        self.transactions += 1
        return outcomes
