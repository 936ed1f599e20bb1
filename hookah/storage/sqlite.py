"""
The embedded store: one SQLite file in WAL mode behind one writer thread.

This module owns the SQLite schema, the connection and the thread that is
the only one ever to touch that connection. The reactor thread never waits
on SQLite: every method queues an operation and returns a Deferred that the
worker fires through ``reactor.callFromThread``.

Group commit is the point of the design. Whatever operations queued up while
the worker was busy (up to ``batch_limit``) run in one transaction with one
commit, hence one fsync, however many concurrent ``/dispatch`` requests they
came from. Each write runs in its own SAVEPOINT so that one failing operation
(a duplicate id, say) errbacks its own Deferred and rolls back only its own
work while the rest of the batch commits.

Decisions where ``IStore`` leaves room:

- ``finish_attempt`` on an unknown id errbacks with ``KeyError``: only
  finished deliveries are ever deleted (``purge_finished``), never a claimed
  one, so it is a caller's bug, and an orphan attempt row would hide it.
- A delivery's last activity (for ``purge_finished``) is kept in a column of
  its own, ``finished_at``, set when it reaches ``delivered``/``failed`` and
  cleared when it is requeued, so the purge is an index range, not a scan.
- ``cancel_deliveries``, ``purge_finished``, ``trim_events`` and
  ``purge_expired`` (which cancels the expired pairs' notifications) take
  the cancellation attempt's time from ``reactor.seconds()``.
- ``reschedule`` only touches a ``delivering`` delivery; on any other it does
  nothing, so that a late reschedule cannot resurrect a delivery that another
  deliverer (after the lease ran out) already finished.
- ``find_idempotency_key`` looks at events before deliveries (a topic
  dispatch answers with its event id) and returns the earliest match within
  the window ("the first delivery's id", as the API promises). ``since=None``
  means no window.
- A ``scheduled`` delivery whose ``next_attempt_at`` is ``None`` is due at
  once (as if at time 0), as the dispatcher and ``MemoryStore`` treat it;
  ``next_due`` then answers ``0.0``.
- ``add_event`` takes ``keep_count=None`` / ``keep_after=None`` as "no limit".
- ``count_deliveries`` reports every status, with zeros.
- ``list_topics`` measures leases against ``reactor.seconds()`` since the
  interface gives it no ``now``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import sqlite3
import threading
from collections import deque
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
)

import attr

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hookah.model import (
    CANCELLED_EXPIRED,
    DELIVERED,
    DELIVERING,
    FAILED,
    KIND_WEBSUB,
    SCHEDULED,
    STATUSES,
    Attempt,
    Delivery,
    Event,
    Headers,
    Subscription,
)
from hookah.storage.interface import IStore

log = Logger()

SCHEMA_VERSION = 2

# Schema migrations by the version they upgrade from. A fresh file runs them
# all; a file written by a newer Hookah is refused rather than misread.
_MIGRATIONS: Dict[int, str] = {
    0: """
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    content_type TEXT,
    headers TEXT NOT NULL,          -- JSON [[name, value], ...], order kept
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_attempt_at REAL,
    retries INTEGER,
    timeout REAL,
    errback TEXT,
    callback TEXT,
    kind TEXT NOT NULL,
    topic TEXT,
    event_id TEXT,
    parent_id TEXT,
    idempotency_key TEXT,
    retry_from INTEGER NOT NULL DEFAULT 0,
    claimed_until REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (status, next_attempt_at, id);
CREATE INDEX IF NOT EXISTS deliveries_claims
    ON deliveries (status, claimed_until);
CREATE INDEX IF NOT EXISTS deliveries_status_id
    ON deliveries (status, id);
CREATE INDEX IF NOT EXISTS deliveries_idempotency
    ON deliveries (idempotency_key, created_at)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS attempts (
    delivery_id TEXT NOT NULL REFERENCES deliveries (id),
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    body BLOB NOT NULL,
    content_type TEXT,
    headers TEXT NOT NULL,
    created_at REAL NOT NULL,
    idempotency_key TEXT
);
CREATE INDEX IF NOT EXISTS events_topic_id ON events (topic, id);
CREATE INDEX IF NOT EXISTS events_topic_created ON events (topic, created_at);
CREATE INDEX IF NOT EXISTS events_idempotency
    ON events (idempotency_key, created_at)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS subscriptions (
    topic TEXT NOT NULL,
    callback TEXT NOT NULL,
    secret TEXT,
    lease_seconds INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (topic, callback)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS subscriptions_expiry ON subscriptions (expires_at);
""",
    # Retention, WebSub cancellation and each subscriber's own hub URL.
    1: f"""
ALTER TABLE subscriptions ADD COLUMN hub_url TEXT;
ALTER TABLE deliveries ADD COLUMN finished_at REAL;
UPDATE deliveries SET finished_at = COALESCE(
    (SELECT at FROM attempts WHERE delivery_id = deliveries.id
     ORDER BY seq DESC LIMIT 1),
    created_at)
  WHERE status IN ('{DELIVERED}', '{FAILED}');
CREATE INDEX IF NOT EXISTS deliveries_finished
    ON deliveries (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_queued_notifications
    ON deliveries (topic, url)
    WHERE kind = '{KIND_WEBSUB}' AND status = '{SCHEDULED}';
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
""",
}

_DELIVERY_COLUMNS = (
    "id, url, body, content_type, headers, status, created_at, next_attempt_at,"
    " retries, timeout, errback, callback, kind, topic, event_id, parent_id,"
    " idempotency_key, retry_from, claimed_until"
)
_EVENT_COLUMNS = "id, topic, body, content_type, headers, created_at, idempotency_key"
_SUBSCRIPTION_COLUMNS = "topic, callback, secret, lease_seconds, created_at, expires_at, hub_url"

# The statements the dispatcher runs per delivery; each must be an index
# search, never a scan (tests/test_store_sqlite.py checks their plans).
# A scheduled delivery without next_attempt_at is due at once (as if at 0),
# as the dispatcher treats it. It gets its own query: folding "IS NULL OR
# <= ?" into one would make SQLite walk every scheduled row when fewer than
# ``limit`` are due.
CLAIM_SCHEDULED = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"
    " WHERE status = ? AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at, id LIMIT ?"
)
CLAIM_UNTIMED = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"
    " WHERE status = ? AND next_attempt_at IS NULL"
    " ORDER BY id LIMIT ?"
)
CLAIM_EXPIRED = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"
    " WHERE status = ? AND claimed_until <= ?"
    " ORDER BY claimed_until, id LIMIT ?"
)
# NULLs sort first: a scheduled delivery without a time comes out as due.
NEXT_SCHEDULED = (
    "SELECT next_attempt_at FROM deliveries"
    " WHERE status = ? ORDER BY next_attempt_at LIMIT 1"
)
NEXT_EXPIRY = (
    "SELECT claimed_until FROM deliveries"
    " WHERE status = ? AND claimed_until IS NOT NULL"
    " ORDER BY claimed_until LIMIT 1"
)
APPEND_ATTEMPT = (
    "INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
    " VALUES (?, (SELECT COALESCE(MAX(seq), -1) + 1 FROM attempts"
    " WHERE delivery_id = ?), ?, ?, ?, ?)"
)
IDEMPOTENT_EVENT = (
    "SELECT id FROM events WHERE idempotency_key = ? AND created_at >= ?"
    " ORDER BY created_at, id LIMIT 1"
)
IDEMPOTENT_DELIVERY = (
    "SELECT id FROM deliveries WHERE idempotency_key = ? AND created_at >= ?"
    " ORDER BY created_at, id LIMIT 1"
)
RELEASE_CLAIMS = (
    "UPDATE deliveries SET status = ?, claimed_until = NULL WHERE status = ?"
)
TRIM_BY_COUNT = (
    "DELETE FROM events WHERE topic = ? AND id <= (SELECT id FROM events"
    " WHERE topic = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"
)
TRIM_BY_AGE = "DELETE FROM events WHERE topic = ? AND created_at <= ?"
# Retention and WebSub cancellation: index ranges, batched by the caller.
# INDEXED BY, because without ANALYZE statistics the planner prefers the
# status indexes, which would walk every scheduled or finished delivery
# (and SQLite refuses the statement if the index ever stops fitting it).
QUEUED_NOTIFICATIONS = (
    "SELECT id FROM deliveries INDEXED BY deliveries_queued_notifications"
    " WHERE topic = ? AND url = ?"
    f" AND kind = '{KIND_WEBSUB}' AND status = '{SCHEDULED}' ORDER BY id"
)
CANCEL_DELIVERY = (
    "UPDATE deliveries SET status = ?, next_attempt_at = NULL,"
    " claimed_until = NULL, finished_at = ? WHERE id = ?"
)
FINISHED_BEFORE = (
    "SELECT id FROM deliveries INDEXED BY deliveries_finished WHERE finished_at < ?"
    f" AND status IN ('{DELIVERED}', '{FAILED}') ORDER BY finished_at LIMIT ?"
)
DELETE_ATTEMPTS = "DELETE FROM attempts WHERE delivery_id = ?"
DELETE_DELIVERY = "DELETE FROM deliveries WHERE id = ?"
TRIM_EVENTS = (
    "DELETE FROM events WHERE id IN (SELECT id FROM events"
    " WHERE created_at < ? ORDER BY created_at LIMIT ?)"
)
EXPIRED_SUBSCRIPTIONS = "SELECT topic, callback FROM subscriptions WHERE expires_at <= ?"
ACTIVE_SUBSCRIPTIONS = (
    f"SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions"
    " WHERE topic = ? AND expires_at > ? ORDER BY callback"
)

# When a scheduled delivery without next_attempt_at is due.
_UNTIMED = 0.0

# SQLite's historical limit on bound variables is 999.
_IN_CHUNK = 500

_Work = Callable[[sqlite3.Connection], Any]
_Outcome = Tuple["Deferred[Any]", bool, Any]


class StoreClosed(Exception):
    """The store is not open: not yet, no longer, or it failed to open."""


class _Operation:
    """
    One unit of work for the worker thread. ``isolated`` writes run in a
    savepoint of their own, so their failure undoes only them; writes that
    cannot fail half-way (one statement, or checks before any change) skip
    it, which saves two statements per operation on the hottest paths.
    """

    __slots__ = ("deferred", "work", "write", "isolated")

    def __init__(self, deferred: Deferred[Any], work: _Work, write: bool, isolated: bool = True) -> None:
        self.deferred = deferred
        self.work = work
        self.write = write
        self.isolated = isolated


def _fire(outcomes: Sequence[_Outcome]) -> None:
    """Fire a batch's Deferreds; runs on the reactor thread."""
    for deferred, ok, value in outcomes:
        if ok:
            deferred.callback(value)
        else:
            deferred.errback(value)


@implementer(IStore)
class SQLiteStore:
    """
    ``IStore`` on one SQLite file; see the module docstring.

    ``reactor`` must provide ``IReactorFromThreads`` (the worker reports
    through ``callFromThread``) and ``IReactorTime`` (``list_topics``'s now).

    ``synchronous`` defaults to ``FULL``: with WAL, ``NORMAL`` already
    survives ``kill -9`` (a commit is in the WAL file, in the OS page cache,
    before the Deferred fires), but not an OS crash or power loss, which
    would silently lose deliveries we answered ``202`` for. Group commit
    makes the fsync per commit affordable, so we pay for the stronger
    promise; ``NORMAL`` remains available for benchmarks and for operators
    who accept that trade.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        *,
        synchronous: str = "FULL",
        batch_limit: int = 500,
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"unsupported synchronous mode {synchronous!r}")
        self._path = path
        self._reactor = reactor
        self._synchronous = synchronous.upper()
        self._batch_limit = batch_limit
        self._pending: Deque[_Operation] = deque()
        self._wakeup = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._opened: Optional[Deferred[None]] = None
        self._exited = False
        self._exitFailure: Optional[Failure] = None
        self._closeWaiters: List[Deferred[None]] = []
        self._transactions = 0

    @property
    def transactions(self) -> int:
        """How many transactions have committed: operations / this = batching."""
        return self._transactions

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> Deferred[None]:
        if self._thread is not None:
            return fail(StoreClosed("open() may be called only once"))
        self._opened = Deferred()
        self._accepting = True
        self._thread = threading.Thread(
            target=self._work,
            name=f"hookah-sqlite {self._path}",
            # A reactor stopped without close() must not hang the exit; what
            # was committed is safe either way.
            daemon=True,
        )
        self._thread.start()
        return self._opened

    def close(self) -> Deferred[None]:
        """Refuse new operations, run the queued ones, then stop the worker."""
        if self._thread is None or self._exited:
            self._accepting = False
            return fail(self._exitFailure) if self._exitFailure else succeed(None)
        with self._wakeup:
            self._accepting = False
            self._stopping = True
            self._wakeup.notify()
        waiter: Deferred[None] = Deferred()
        self._closeWaiters.append(waiter)
        return waiter

    def _exit(self, failure: Optional[Failure]) -> None:
        """The worker has returned; runs on the reactor thread."""
        assert self._thread is not None
        self._thread.join()
        self._exited = True
        self._exitFailure = failure
        waiters, self._closeWaiters = self._closeWaiters, []
        for waiter in waiters:
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)

    # -- the worker thread -----------------------------------------------------

    def _submit(self, work: _Work, write: bool, isolated: bool = True) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        with self._wakeup:
            if not self._accepting:
                return fail(StoreClosed(self._path))
            self._pending.append(_Operation(d, work, write, isolated))
            if len(self._pending) == 1:
                self._wakeup.notify()
        return d

    def _read(self, work: _Work) -> Deferred[Any]:
        return self._submit(work, write=False)

    def _write(self, work: _Work) -> Deferred[Any]:
        return self._submit(work, write=True)

    def _work(self) -> None:
        """The worker thread's whole life: connect, run batches, drain, close."""
        callFromThread = self._reactor.callFromThread
        assert self._opened is not None
        try:
            connection = self._connect()
        except Exception:
            failure = Failure()
            with self._wakeup:
                self._accepting = False
                stranded = [(op.deferred, False, failure) for op in self._pending]
                self._pending.clear()
            # No log here: the failure goes to open()'s caller, which says
            # it once (twistd: one line, then exit 1).
            callFromThread(self._opened.errback, failure)
            callFromThread(_fire, stranded)
            callFromThread(self._exit, None)
            return
        callFromThread(
            log.info,
            "opened SQLite store {path} (WAL, synchronous={synchronous})",
            path=self._path,
            synchronous=self._synchronous,
        )
        callFromThread(self._opened.callback, None)
        exitFailure: Optional[Failure] = None
        try:
            while True:
                with self._wakeup:
                    while not self._pending and not self._stopping:
                        self._wakeup.wait()
                    if not self._pending:
                        break
                    count = min(len(self._pending), self._batch_limit)
                    batch = [self._pending.popleft() for _ in range(count)]
                callFromThread(_fire, self._transact(connection, batch))
        except BaseException:
            # A bug in this loop, not in an operation: report it from close()
            # rather than leave the store silently deaf.
            exitFailure = Failure()
        finally:
            with self._wakeup:
                self._accepting = False
                leftover = list(self._pending)
                self._pending.clear()
            if leftover:
                lost = Failure(StoreClosed(f"{self._path}: the worker stopped"))
                callFromThread(_fire, [(op.deferred, False, lost) for op in leftover])
            try:
                connection.close()
            except Exception:
                exitFailure = exitFailure or Failure()
            callFromThread(self._exit, exitFailure)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, the module's
        # implicit transactions would break batching and savepoints.
        connection = sqlite3.connect(
            self._path, isolation_level=None, cached_statements=256
        )
        try:
            (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode.lower() != "wal" and self._path != ":memory:":
                raise RuntimeError(f"{self._path}: cannot use WAL (journal mode {mode})")
            connection.execute(f"PRAGMA synchronous={self._synchronous}")
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self._path}: schema version {version} is newer than"
                    f" this Hookah's {SCHEMA_VERSION}"
                )
            for step in range(version, SCHEMA_VERSION):
                connection.executescript(
                    f"BEGIN IMMEDIATE; {_MIGRATIONS[step]};"
                    f" PRAGMA user_version = {step + 1}; COMMIT;"
                )
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            connection.close()
            raise
        return connection

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
                    except Exception:
                        if op.write and not connection.in_transaction:
                            raise  # SQLite rolled the whole batch back
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
        self._transactions += 1
        return outcomes

    # -- health ----------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        def work(c: sqlite3.Connection) -> None:
            c.execute("SELECT 1").fetchone()

        return self._read(work)

    # -- deliveries ------------------------------------------------------------

    def add_deliveries(self, deliveries: Iterable[Delivery]) -> Deferred[None]:
        deliveries = list(deliveries)
        return self._write(lambda c: _insert_deliveries(c, deliveries))

    def get_delivery(self, delivery_id: str) -> Deferred[Optional[Delivery]]:
        return self._read(lambda c: _get_delivery(c, delivery_id))

    def list_deliveries(
        self, status: Optional[str], limit: int, after: Optional[str]
    ) -> Deferred[List[Delivery]]:
        where, args = ["id > ?"], [after or ""]
        if status is not None:
            where.append("status = ?")
            args.append(status)
        sql = (
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"
            f" WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        )
        return self._read(
            # SQLite reads a negative LIMIT as "no limit".
            lambda c: _load_deliveries(
                c, c.execute(sql, (*args, max(limit, 0))).fetchall()
            )
        )

    def claim_due(
        self, now: float, limit: int, lease_until: float
    ) -> Deferred[List[Delivery]]:
        # A select and one update: nothing to undo half-way.
        return self._submit(lambda c: _claim_due(c, now, limit, lease_until), write=True, isolated=False)

    def finish_attempt(
        self,
        delivery_id: str,
        attempt: Attempt,
        status: str,
        next_attempt_at: Optional[float],
        follow_ups: Sequence[Delivery] = (),
    ) -> Deferred[None]:
        finished_at = attempt.at if status in (DELIVERED, FAILED) else None

        def work(c: sqlite3.Connection) -> None:
            updated = c.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = ?,"
                " claimed_until = NULL, finished_at = ? WHERE id = ?",
                (status, next_attempt_at, finished_at, delivery_id),
            ).rowcount
            if not updated:
                raise KeyError(delivery_id)
            c.execute(APPEND_ATTEMPT, (delivery_id, delivery_id, *_attempt_row(attempt)))
            if follow_ups:
                _insert_deliveries(c, list(follow_ups))

        # Without follow-ups nothing here can fail after a change (the
        # KeyError comes first), so it needs no savepoint of its own.
        return self._submit(work, write=True, isolated=bool(follow_ups))

    def release_claims(self) -> Deferred[int]:
        return self._write(
            lambda c: c.execute(RELEASE_CLAIMS, (SCHEDULED, DELIVERING)).rowcount
        )

    def reschedule(self, delivery_id: str, next_attempt_at: float) -> Deferred[None]:
        def work(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = ?,"
                " claimed_until = NULL WHERE id = ? AND status = ?",
                (SCHEDULED, next_attempt_at, delivery_id, DELIVERING),
            )

        return self._submit(work, write=True, isolated=False)

    def requeue(self, delivery_id: str, now: float) -> Deferred[Optional[Delivery]]:
        def work(c: sqlite3.Connection) -> Optional[Delivery]:
            row = c.execute(
                "SELECT status FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
            if row is None or row[0] not in (DELIVERED, FAILED):
                return None
            (attempts,) = c.execute(
                "SELECT COUNT(*) FROM attempts WHERE delivery_id = ?", (delivery_id,)
            ).fetchone()
            c.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = ?,"
                " retry_from = ?, claimed_until = NULL, finished_at = NULL"
                " WHERE id = ?",
                (SCHEDULED, now, attempts, delivery_id),
            )
            return _get_delivery(c, delivery_id)

        return self._write(work)

    def next_due(self) -> Deferred[Optional[float]]:
        def work(c: sqlite3.Connection) -> Optional[float]:
            times = []
            scheduled = c.execute(NEXT_SCHEDULED, (SCHEDULED,)).fetchone()
            if scheduled is not None:
                times.append(_UNTIMED if scheduled[0] is None else scheduled[0])
            expiry = c.execute(NEXT_EXPIRY, (DELIVERING,)).fetchone()
            if expiry is not None:
                times.append(expiry[0])
            return min(times) if times else None

        return self._read(work)

    def cancel_deliveries(self, topic: str, callback: str, reason: str) -> Deferred[int]:
        now = self._reactor.seconds()
        return self._write(lambda c: _cancel_deliveries(c, topic, callback, reason, now))

    def purge_finished(self, before: float, limit: int = 10_000) -> Deferred[int]:
        def work(c: sqlite3.Connection) -> int:
            ids = [(row[0],) for row in c.execute(FINISHED_BEFORE, (before, max(limit, 0)))]
            c.executemany(DELETE_ATTEMPTS, ids)
            c.executemany(DELETE_DELIVERY, ids)
            return len(ids)

        return self._write(work)

    def count_deliveries(self) -> Deferred[Dict[str, int]]:
        def work(c: sqlite3.Connection) -> Dict[str, int]:
            counts = dict.fromkeys(STATUSES, 0)
            counts.update(
                c.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status")
            )
            return counts

        return self._read(work)

    def find_idempotency_key(
        self, key: str, since: Optional[float]
    ) -> Deferred[Optional[str]]:
        window = float("-inf") if since is None else since

        def work(c: sqlite3.Connection) -> Optional[str]:
            for sql in (IDEMPOTENT_EVENT, IDEMPOTENT_DELIVERY):
                row = c.execute(sql, (key, window)).fetchone()
                if row is not None:
                    return str(row[0])
            return None

        return self._read(work)

    # -- events ------------------------------------------------------------------

    def add_event(
        self,
        event: Event,
        deliveries: Iterable[Delivery],
        keep_count: Optional[int],
        keep_after: Optional[float],
    ) -> Deferred[None]:
        deliveries = list(deliveries)

        def work(c: sqlite3.Connection) -> None:
            c.execute(
                f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    event.id, event.topic, event.body, event.content_type,
                    _dump_headers(event.headers), event.created_at,
                    event.idempotency_key,
                ),
            )
            _insert_deliveries(c, deliveries)
            if keep_count is not None:
                c.execute(TRIM_BY_COUNT, (event.topic, event.topic, keep_count))
            if keep_after is not None:
                c.execute(TRIM_BY_AGE, (event.topic, keep_after))

        return self._write(work)

    def trim_events(self, before: float, limit: int = 10_000) -> Deferred[int]:
        return self._write(
            lambda c: c.execute(TRIM_EVENTS, (before, max(limit, 0))).rowcount
        )

    def get_event(self, event_id: str) -> Deferred[Optional[Event]]:
        def work(c: sqlite3.Connection) -> Optional[Event]:
            row = c.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?", (event_id,)
            ).fetchone()
            return None if row is None else _event(row)

        return self._read(work)

    def events_after(
        self, topics: Iterable[str], after: Optional[str], limit: int
    ) -> Deferred[List[Event]]:
        # One indexed range per topic merged here, rather than one IN query
        # that would read and sort every matching event before the LIMIT.
        topics = list(dict.fromkeys(topics))
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events"
            " WHERE topic = ? AND id > ? ORDER BY id LIMIT ?"
        )

        def work(c: sqlite3.Connection) -> List[Event]:
            ranges = [
                c.execute(sql, (topic, after or "", max(limit, 0))) for topic in topics
            ]
            merged = heapq.merge(*ranges, key=lambda row: row[0])
            return [_event(row) for row in itertools.islice(merged, max(limit, 0))]

        return self._read(work)

    def last_events(self, topics: Iterable[str], count: int) -> Deferred[List[Event]]:
        topics = list(dict.fromkeys(topics))
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events"
            " WHERE topic = ? ORDER BY id DESC LIMIT ?"
        )

        def work(c: sqlite3.Connection) -> List[Event]:
            ranges = [c.execute(sql, (topic, max(count, 0))) for topic in topics]
            merged = heapq.merge(*ranges, key=lambda row: row[0], reverse=True)
            newest = [_event(row) for row in itertools.islice(merged, max(count, 0))]
            newest.reverse()
            return newest

        return self._read(work)

    def list_topics(self) -> Deferred[List[Tuple[str, int, int]]]:
        now = self._reactor.seconds()
        sql = (
            "SELECT topic, SUM(events), SUM(subscribers) FROM ("
            " SELECT topic, COUNT(*) AS events, 0 AS subscribers"
            "  FROM events GROUP BY topic"
            " UNION ALL"
            " SELECT topic, 0, COUNT(*) FROM subscriptions"
            "  WHERE expires_at > ? GROUP BY topic"
            ") GROUP BY topic ORDER BY topic"
        )
        return self._read(
            lambda c: [(t, int(e), int(s)) for t, e, s in c.execute(sql, (now,))]
        )

    # -- subscriptions -----------------------------------------------------------

    def put_subscription(self, subscription: Subscription) -> Deferred[None]:
        s = subscription
        row = (
            s.topic, s.callback, s.secret, s.lease_seconds, s.created_at,
            s.expires_at, s.hub_url,
        )

        def work(c: sqlite3.Connection) -> None:
            # REPLACE deletes the old row of the (topic, callback) key first.
            c.execute(
                f"INSERT OR REPLACE INTO subscriptions ({_SUBSCRIPTION_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        return self._write(work)

    def remove_subscription(self, topic: str, callback: str) -> Deferred[bool]:
        return self._write(
            lambda c: c.execute(
                "DELETE FROM subscriptions WHERE topic = ? AND callback = ?",
                (topic, callback),
            ).rowcount
            > 0
        )

    def get_subscription(
        self, topic: str, callback: str
    ) -> Deferred[Optional[Subscription]]:
        def work(c: sqlite3.Connection) -> Optional[Subscription]:
            row = c.execute(
                f"SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions"
                " WHERE topic = ? AND callback = ?",
                (topic, callback),
            ).fetchone()
            return None if row is None else Subscription(*row)

        return self._read(work)

    def active_subscriptions(
        self, topic: str, now: float
    ) -> Deferred[List[Subscription]]:
        return self._read(
            lambda c: [
                Subscription(*row)
                for row in c.execute(ACTIVE_SUBSCRIPTIONS, (topic, now))
            ]
        )

    def list_subscriptions(self, topic: Optional[str]) -> Deferred[List[Subscription]]:
        select = f"SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions"

        def work(c: sqlite3.Connection) -> List[Subscription]:
            if topic is None:
                rows = c.execute(f"{select} ORDER BY topic, callback")
            else:
                rows = c.execute(f"{select} WHERE topic = ? ORDER BY callback", (topic,))
            return [Subscription(*row) for row in rows]

        return self._read(work)

    def purge_expired(self, now: float) -> Deferred[List[Tuple[str, str]]]:
        at = self._reactor.seconds()

        def work(c: sqlite3.Connection) -> List[Tuple[str, str]]:
            pairs = [(t, cb) for t, cb in c.execute(EXPIRED_SUBSCRIPTIONS, (now,))]
            c.execute("DELETE FROM subscriptions WHERE expires_at <= ?", (now,))
            for topic, callback in pairs:
                _cancel_deliveries(c, topic, callback, CANCELLED_EXPIRED, at)
            return pairs

        return self._write(work)


# -- rows <-> records (these run on the worker thread) ----------------------------


def _dump_headers(headers: Headers) -> str:
    return json.dumps([[name, value] for name, value in headers])


def _load_headers(text: str) -> Headers:
    return tuple((name, value) for name, value in json.loads(text))


def _attempt_row(attempt: Attempt) -> Tuple[Any, ...]:
    return (attempt.at, attempt.status_code, attempt.error, attempt.duration_ms)


def _finished_at(d: Delivery) -> Optional[float]:
    """A finished delivery's last activity: its last attempt, else its creation."""
    if d.status not in (DELIVERED, FAILED):
        return None
    return d.attempts[-1].at if d.attempts else d.created_at


def _cancel_deliveries(
    c: sqlite3.Connection, topic: str, callback: str, reason: str, at: float
) -> int:
    ids = [row[0] for row in c.execute(QUEUED_NOTIFICATIONS, (topic, callback))]
    c.executemany(
        APPEND_ATTEMPT, [(i, i, at, None, reason, 0) for i in ids]
    )
    c.executemany(CANCEL_DELIVERY, [(FAILED, at, i) for i in ids])
    return len(ids)


def _insert_deliveries(c: sqlite3.Connection, deliveries: List[Delivery]) -> None:
    c.executemany(
        f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                d.id, d.url, d.body, d.content_type, _dump_headers(d.headers),
                d.status, d.created_at, d.next_attempt_at, d.retries, d.timeout,
                d.errback, d.callback, d.kind, d.topic, d.event_id, d.parent_id,
                d.idempotency_key, d.retry_from, d.claimed_until, _finished_at(d),
            )
            for d in deliveries
        ],
    )
    c.executemany(
        "INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [
            (d.id, seq, *_attempt_row(a))
            for d in deliveries
            for seq, a in enumerate(d.attempts)
        ],
    )


def _get_delivery(c: sqlite3.Connection, delivery_id: str) -> Optional[Delivery]:
    rows = c.execute(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,)
    ).fetchall()
    loaded = _load_deliveries(c, rows)
    return loaded[0] if loaded else None


def _load_deliveries(c: sqlite3.Connection, rows: List[Any]) -> List[Delivery]:
    """Build deliveries from rows, fetching their attempts in a few queries."""
    attempts: Dict[str, List[Attempt]] = {}
    ids = [row[0] for row in rows]
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for delivery_id, at, code, error, ms in c.execute(
            "SELECT delivery_id, at, status_code, error, duration_ms FROM attempts"
            f" WHERE delivery_id IN ({marks}) ORDER BY delivery_id, seq",
            chunk,
        ):
            attempts.setdefault(delivery_id, []).append(Attempt(at, code, error, ms))
    return [
        Delivery(
            id=row[0], url=row[1], body=bytes(row[2]), content_type=row[3],
            headers=_load_headers(row[4]), status=row[5], created_at=row[6],
            next_attempt_at=row[7], attempts=tuple(attempts.get(row[0], ())),
            retries=row[8], timeout=row[9], errback=row[10], callback=row[11],
            kind=row[12], topic=row[13], event_id=row[14], parent_id=row[15],
            idempotency_key=row[16], retry_from=row[17], claimed_until=row[18],
        )
        for row in rows
    ]


def _claim_due(
    c: sqlite3.Connection, now: float, limit: int, lease_until: float
) -> List[Delivery]:
    """Select then update, in the batch's transaction: no one else can claim."""
    if limit <= 0:
        return []
    untimed = c.execute(CLAIM_UNTIMED, (SCHEDULED, limit)).fetchall()
    scheduled = c.execute(CLAIM_SCHEDULED, (SCHEDULED, now, limit)).fetchall()
    expired = c.execute(CLAIM_EXPIRED, (DELIVERING, now, limit)).fetchall()
    # Due time of a scheduled row is next_attempt_at (7); of a lapsed claim,
    # claimed_until (18).
    merged = heapq.merge(
        ((_UNTIMED, row[0], row) for row in untimed),
        ((row[7], row[0], row) for row in scheduled),
        ((row[18], row[0], row) for row in expired),
    )
    rows = [row for _, _, row in itertools.islice(merged, limit)]
    c.executemany(
        "UPDATE deliveries SET status = ?, claimed_until = ? WHERE id = ?",
        [(DELIVERING, lease_until, row[0]) for row in rows],
    )
    return [
        _evolve_claimed(d, lease_until) for d in _load_deliveries(c, rows)
    ]


def _evolve_claimed(delivery: Delivery, lease_until: float) -> Delivery:
    return attr.evolve(delivery, status=DELIVERING, claimed_until=lease_until)


def _event(row: Any) -> Event:
    return Event(
        id=row[0], topic=row[1], body=bytes(row[2]), content_type=row[3],
        headers=_load_headers(row[4]), created_at=row[5], idempotency_key=row[6],
    )
