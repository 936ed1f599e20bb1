"""
The embedded store: one SQLite file in WAL mode behind one writer thread.

``SQLiteStore`` implements ``IStore`` on three parts of its own:
``worker`` (the thread that is the only one ever to touch the connection,
and its group commit: one transaction, one fsync, for every operation that
queued up meanwhile), ``schema`` (the tables, their version and
migrations, the named statements) and ``rows`` (records to rows and
back). The reactor thread never waits on SQLite: every method queues an
operation and returns a Deferred that the worker fires.

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
- Idempotency keys have a table of their own (``idempotency_keys``: key,
  record id, created_at; schema version 3), written in the transaction of
  the delivery or event that carries the key and trimmed by age only
  (``purge_idempotency_keys``), so neither a history trim by count nor the
  purge of a finished delivery forgets a key inside the window.
  ``find_idempotency_key`` returns the earliest match within the window
  ("the first delivery's id", as the API promises). ``since=None`` means no
  window.
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
import sqlite3
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from hookah.model import (
    CANCELLED_EXPIRED,
    DELIVERED,
    DELIVERING,
    FAILED,
    SCHEDULED,
    STATUSES,
    Attempt,
    Delivery,
    Event,
    Subscription,
)
from hookah import defaults
from hookah.storage.interface import ClaimLost, IStore
from hookah.storage.sqlite.rows import (
    attempt_row,
    cancel_deliveries,
    claim_due,
    dump_headers,
    event_from_row,
    get_delivery,
    insert_deliveries,
    one_statement,
    load_deliveries,
    remember_idempotency_keys,
)
from hookah.storage.sqlite.schema import (
    ACTIVE_SUBSCRIPTIONS,
    APPEND_ATTEMPT,
    DELETE_ATTEMPTS,
    DELETE_DELIVERY,
    DELIVERY_COLUMNS,
    EVENT_COLUMNS,
    EXPIRED_SUBSCRIPTIONS,
    FIND_IDEMPOTENCY_KEY,
    FINISHED_BEFORE,
    NEXT_EXPIRY,
    NEXT_SCHEDULED,
    PURGE_IDEMPOTENCY_KEYS,
    RELEASE_CLAIMS,
    RELEASE_PAUSED,
    SUBSCRIPTION_COLUMNS,
    TRIM_BY_AGE,
    TRIM_BY_COUNT,
    TRIM_EVENTS,
    UNTIMED,
    upgrade,
)
from hookah.storage.sqlite.worker import SQLWorker, Work

# Re-exported: this module is where StoreClosed, the schema's version, its
# migrations and the plan-checked statements have always been found
# (tests/test_store_sqlite.py imports them from here).
from hookah.storage.sqlite.schema import (  # noqa: F401
    CANCEL_DELIVERY,
    CLAIM_EXPIRED,
    CLAIM_SCHEDULED,
    CLAIM_UNTIMED,
    MIGRATIONS as _MIGRATIONS,
    QUEUED_NOTIFICATIONS,
    SCHEMA_VERSION,
)
from hookah.storage.sqlite.worker import StoreClosed  # noqa: F401

log = Logger()


# An attempt's outcome; with a claim token, only while that claim holds.
_FINISH = (
    "UPDATE deliveries SET status = ?, next_attempt_at = ?,"
    " claimed_until = NULL, claim_token = NULL, finished_at = ?, deferred = NULL WHERE id = ?"
)
_FINISH_CLAIMED = _FINISH + " AND status = ? AND claim_token = ?"


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
        commit_delay: float = defaults.SQLITE_COMMIT_DELAY,
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"unsupported synchronous mode {synchronous!r}")
        self._path = path
        self._reactor = reactor
        self._synchronous = synchronous.upper()
        self._worker = SQLWorker(
            self._connect, reactor, path=path, batch_limit=batch_limit, commit_delay=commit_delay
        )

    @property
    def transactions(self) -> int:
        """How many transactions have committed: operations / this = batching."""
        return self._worker.transactions

    @property
    def _thread(self) -> Optional[threading.Thread]:
        """The worker thread, once opened (tests watch its lifetime)."""
        return self._worker.thread

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> Deferred[None]:
        opened = self._worker.start()
        opened.addCallback(self._logOpened)
        return opened

    def close(self) -> Deferred[None]:
        """Refuse new operations, run the queued ones, then stop the worker."""
        return self._worker.stop()

    def _logOpened(self, _: None) -> None:
        log.info(
            "opened SQLite store {path} (WAL, synchronous={synchronous})",
            path=self._path,
            synchronous=self._synchronous,
        )

    def _connect(self) -> sqlite3.Connection:
        """Open the file and bring its schema up to date; runs on the worker thread."""
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
            upgrade(connection, self._path)
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            connection.close()
            raise
        return connection

    def _read(self, work: Work) -> Deferred[Any]:
        return self._worker.submit(work, write=False)

    def _write(self, work: Work) -> Deferred[Any]:
        return self._worker.submit(work, write=True)

    # -- health ----------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        def work(c: sqlite3.Connection) -> None:
            c.execute("SELECT 1").fetchone()

        return self._read(work)

    # -- deliveries ------------------------------------------------------------

    def add_deliveries(self, deliveries: Iterable[Delivery]) -> Deferred[None]:
        deliveries = list(deliveries)
        if one_statement(deliveries):
            # One INSERT (a /dispatch): SQLite undoes a failed statement by
            # itself, so it needs no savepoint of its own.
            return self._worker.submit(lambda c: insert_deliveries(c, deliveries), write=True, atomic=True)
        return self._write(lambda c: insert_deliveries(c, deliveries))

    def get_delivery(self, delivery_id: str) -> Deferred[Optional[Delivery]]:
        return self._read(lambda c: get_delivery(c, delivery_id))

    def list_deliveries(
        self, status: Optional[str], limit: int, after: Optional[str]
    ) -> Deferred[List[Delivery]]:
        where, args = ["id > ?"], [after or ""]
        if status is not None:
            where.append("status = ?")
            args.append(status)
        sql = (
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries"
            f" WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        )
        return self._read(
            # SQLite reads a negative LIMIT as "no limit".
            lambda c: load_deliveries(
                c, c.execute(sql, (*args, max(limit, 0))).fetchall()
            )
        )

    def claim_due(
        self, now: float, limit: int, lease_until: float
    ) -> Deferred[List[Delivery]]:
        # A select and one update: nothing to undo half-way.
        return self._worker.submit(lambda c: claim_due(c, now, limit, lease_until), write=True, isolated=False)

    def finish_attempt(
        self,
        delivery_id: str,
        attempt: Attempt,
        status: str,
        next_attempt_at: Optional[float],
        follow_ups: Sequence[Delivery] = (),
        claim_token: Optional[str] = None,
    ) -> Deferred[None]:
        finished_at = attempt.at if status in (DELIVERED, FAILED) else None
        if claim_token is not None:
            sql = _FINISH_CLAIMED
            args: Tuple[Any, ...] = (status, next_attempt_at, finished_at, delivery_id, DELIVERING, claim_token)
        else:
            sql = _FINISH
            args = (status, next_attempt_at, finished_at, delivery_id)

        def work(c: sqlite3.Connection) -> None:
            updated = c.execute(sql, args).rowcount
            if not updated:
                exists = c.execute("SELECT 1 FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
                raise ClaimLost(delivery_id) if exists else KeyError(delivery_id)
            c.execute(APPEND_ATTEMPT, (delivery_id, delivery_id, *attempt_row(attempt)))
            if follow_ups:
                insert_deliveries(c, list(follow_ups))

        # Without follow-ups nothing here can fail after a change (the
        # KeyError comes first), so it needs no savepoint of its own.
        return self._worker.submit(work, write=True, isolated=bool(follow_ups))

    def release_claims(self, now: float) -> Deferred[int]:
        def work(c: sqlite3.Connection) -> int:
            claims: int = c.execute(RELEASE_CLAIMS, (SCHEDULED, DELIVERING)).rowcount
            paused: int = c.execute(RELEASE_PAUSED, (now, now)).rowcount
            return claims + paused

        return self._write(work)

    def renew_claim(self, delivery_id: str, claimed_until: float) -> Deferred[None]:
        def work(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE deliveries SET claimed_until = ? WHERE id = ? AND status = ?",
                (claimed_until, delivery_id, DELIVERING),
            )

        return self._worker.submit(work, write=True, isolated=False)

    def renew_claims(
        self, claims: Sequence[Tuple[str, str]], now: float, lease_until: float
    ) -> Deferred[List[str]]:
        claims = list(claims)

        def work(c: sqlite3.Connection) -> List[str]:
            lost = []
            for delivery_id, token in claims:
                if not c.execute(
                    "UPDATE deliveries SET claimed_until = ?"
                    " WHERE id = ? AND status = ? AND claim_token = ?",
                    (lease_until, delivery_id, DELIVERING, token),
                ).rowcount:
                    lost.append(delivery_id)
            return lost

        return self._worker.submit(work, write=True, isolated=False)

    def reschedule(
        self, delivery_id: str, next_attempt_at: float, deferred: Optional[str] = None,
        claim_token: Optional[str] = None,
    ) -> Deferred[None]:
        sql = (
            "UPDATE deliveries SET status = ?, next_attempt_at = ?,"
            " claimed_until = NULL, claim_token = NULL, deferred = ? WHERE id = ? AND status = ?"
        )
        args: Tuple[Any, ...] = (SCHEDULED, next_attempt_at, deferred, delivery_id, DELIVERING)
        if claim_token is not None:
            sql += " AND claim_token = ?"
            args += (claim_token,)

        def work(c: sqlite3.Connection) -> None:
            c.execute(sql, args)

        return self._worker.submit(work, write=True, isolated=False)

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
                " retry_from = ?, claimed_until = NULL, claim_token = NULL, finished_at = NULL, deferred = NULL"
                " WHERE id = ?",
                (SCHEDULED, now, attempts, delivery_id),
            )
            return get_delivery(c, delivery_id)

        return self._write(work)

    def next_due(self) -> Deferred[Optional[float]]:
        def work(c: sqlite3.Connection) -> Optional[float]:
            times = []
            scheduled = c.execute(NEXT_SCHEDULED, (SCHEDULED,)).fetchone()
            if scheduled is not None:
                times.append(UNTIMED if scheduled[0] is None else scheduled[0])
            expiry = c.execute(NEXT_EXPIRY, (DELIVERING,)).fetchone()
            if expiry is not None:
                times.append(expiry[0])
            return min(times) if times else None

        return self._read(work)

    def cancel_deliveries(self, topic: str, callback: str, reason: str) -> Deferred[int]:
        now = self._reactor.seconds()
        return self._write(lambda c: cancel_deliveries(c, topic, callback, reason, now))

    def purge_finished(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred[int]:
        def work(c: sqlite3.Connection) -> int:
            ids = [(row[0],) for row in c.execute(FINISHED_BEFORE, (before, max(limit, 0)))]
            c.executemany(DELETE_ATTEMPTS, ids)
            c.executemany(DELETE_DELIVERY, ids)
            return len(ids)

        return self._write(work)

    def count_deliveries(self) -> Deferred[Dict[str, int]]:
        def work(c: sqlite3.Connection) -> Dict[str, int]:
            counts: Dict[str, int] = dict.fromkeys(STATUSES, 0)
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
            row = c.execute(FIND_IDEMPOTENCY_KEY, (key, window)).fetchone()
            return None if row is None else str(row[0])

        return self._read(work)

    def purge_idempotency_keys(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred[int]:
        return self._write(
            lambda c: c.execute(PURGE_IDEMPOTENCY_KEYS, (before, max(limit, 0))).rowcount
        )

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
                f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    event.id, event.topic, event.body, event.content_type,
                    dump_headers(event.headers), event.created_at,
                    event.idempotency_key,
                ),
            )
            remember_idempotency_keys(c, [event])
            insert_deliveries(c, deliveries)
            if keep_count is not None:
                c.execute(TRIM_BY_COUNT, (event.topic, event.topic, keep_count))
            if keep_after is not None:
                c.execute(TRIM_BY_AGE, (event.topic, keep_after))

        return self._write(work)

    def trim_events(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred[int]:
        return self._write(
            lambda c: c.execute(TRIM_EVENTS, (before, max(limit, 0))).rowcount
        )

    def get_event(self, event_id: str) -> Deferred[Optional[Event]]:
        def work(c: sqlite3.Connection) -> Optional[Event]:
            row = c.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE id = ?", (event_id,)
            ).fetchone()
            return None if row is None else event_from_row(row)

        return self._read(work)

    def events_after(
        self, topics: Iterable[str], after: Optional[str], limit: int
    ) -> Deferred[List[Event]]:
        # One indexed range per topic merged here, rather than one IN query
        # that would read and sort every matching event before the LIMIT.
        topics = list(dict.fromkeys(topics))
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events"
            " WHERE topic = ? AND id > ? ORDER BY id LIMIT ?"
        )

        def work(c: sqlite3.Connection) -> List[Event]:
            ranges = [
                c.execute(sql, (topic, after or "", max(limit, 0))) for topic in topics
            ]
            merged = heapq.merge(*ranges, key=lambda row: row[0])
            return [event_from_row(row) for row in itertools.islice(merged, max(limit, 0))]

        return self._read(work)

    def last_events(self, topics: Iterable[str], count: int) -> Deferred[List[Event]]:
        topics = list(dict.fromkeys(topics))
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events"
            " WHERE topic = ? ORDER BY id DESC LIMIT ?"
        )

        def work(c: sqlite3.Connection) -> List[Event]:
            ranges = [c.execute(sql, (topic, max(count, 0))) for topic in topics]
            merged = heapq.merge(*ranges, key=lambda row: row[0], reverse=True)
            newest = [event_from_row(row) for row in itertools.islice(merged, max(count, 0))]
            newest.reverse()
            return newest

        return self._read(work)

    def events_page(
        self, topics: Iterable[str], after: Optional[str], limit: int, max_bytes: int
    ) -> Deferred[List[Event]]:
        topics = list(dict.fromkeys(topics))
        return self._read(lambda c: self._page(c, topics, after, limit, max_bytes))

    def _page(
        self, c: sqlite3.Connection, topics: List[str], after: Optional[str], limit: int, max_bytes: int
    ) -> List[Event]:
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events"
            " WHERE topic = ? AND id > ? ORDER BY id LIMIT ?"
        )
        # The cursors step one row at a time: rows past the byte bound
        # are never read.
        ranges = [
            c.execute(sql, (topic, after or "", max(limit, 0))) for topic in topics
        ]
        page: List[Event] = []
        size = 0
        merged = heapq.merge(*ranges, key=lambda row: row[0])
        for row in itertools.islice(merged, max(limit, 0)):
            event = event_from_row(row)
            page.append(event)
            size += len(event.body)
            if size >= max_bytes:
                break
        for cursor in ranges:
            cursor.close()
        return page

    def resume_page(
        self, topics: Iterable[str], after: str, limit: int, max_bytes: int
    ) -> Deferred[Tuple[bool, List[Event]]]:
        topics = list(dict.fromkeys(topics))
        # The primary key finds the resume point; the topic must be one of
        # the stream's (an id from another topic says nothing of these).
        found = "SELECT topic FROM events WHERE id = ?"

        def work(c: sqlite3.Connection) -> Tuple[bool, List[Event]]:
            row = c.execute(found, (after,)).fetchone()
            kept = row is not None and row[0] in topics
            return kept, self._page(c, topics, after, limit, max_bytes)

        return self._read(work)

    def replay_cursor(self, topics: Iterable[str], count: int) -> Deferred[Optional[str]]:
        topics = list(dict.fromkeys(topics))
        sql = "SELECT id FROM events WHERE topic = ? ORDER BY id DESC LIMIT ?"

        def work(c: sqlite3.Connection) -> Optional[str]:
            ranges = [c.execute(sql, (topic, max(count, 0) + 1)) for topic in topics]
            merged = heapq.merge(*ranges, key=lambda row: row[0], reverse=True)
            newest = list(itertools.islice(merged, max(count, 0) + 1))
            return str(newest[-1][0]) if len(newest) > count else None

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
                f"INSERT OR REPLACE INTO subscriptions ({SUBSCRIPTION_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        return self._write(work)

    def remove_subscription(
        self, topic: str, callback: str, cancel_reason: Optional[str] = None
    ) -> Deferred[bool]:
        now = self._reactor.seconds()

        def work(c: sqlite3.Connection) -> bool:
            removed = c.execute(
                "DELETE FROM subscriptions WHERE topic = ? AND callback = ?",
                (topic, callback),
            ).rowcount > 0
            if cancel_reason is not None:
                cancel_deliveries(c, topic, callback, cancel_reason, now)
            return removed

        return self._write(work)

    def get_subscription(
        self, topic: str, callback: str
    ) -> Deferred[Optional[Subscription]]:
        def work(c: sqlite3.Connection) -> Optional[Subscription]:
            row = c.execute(
                f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
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
        select = f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"

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
                cancel_deliveries(c, topic, callback, CANCELLED_EXPIRED, at)
            return pairs

        return self._write(work)
