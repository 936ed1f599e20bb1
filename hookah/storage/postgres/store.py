"""
``PostgresStore``: ``IStore`` on PostgreSQL, for several Hookah nodes
sharing one database.

Threads, not psycopg's async API: each operation runs on a thread of a pool
of our own (``deferToThreadPool``, as the SQLite writer runs on a thread of
its own) with a connection from a ``psycopg_pool.ConnectionPool``, and its
Deferred fires in the reactor thread. The async API would need Twisted's
asyncio reactor installed before anything imports ``twisted.internet.reactor``,
which a twistd plugin cannot promise, and it would tie every store operation
to asyncio's loop; the blocking API on a bounded pool of threads keeps the
reactor free with any reactor, and each operation is one short transaction
(never one held across an HTTP attempt). The hot writes (new deliveries,
outcomes, claims, hand-backs, ``NOTIFY``) are grouped: those queued while a
transaction is in flight share the next one, one statement per kind
(``hookah.storage.postgres.batch``, ``writes``).

Decisions where ``IStore`` leaves room (and what only a shared store does):

- Claims use the database's clock (``clock="database"``, the default): a
  delivery is due when its time is at or before the database's ``now()``,
  and a claim lasts ``lease_until - now`` seconds from the database's now,
  so nodes whose clocks drift never take each other's live claims.
  ``clock="caller"`` takes ``now`` as given (the contract suite runs on it).
- Each claim gets a token (``gen_random_uuid()``); ``finish_attempt``,
  ``reschedule`` and ``renew_claims`` given a token touch the row only
  ``WHERE id = … AND claim_token = …`` and report a lost claim.
- New due work is announced with ``NOTIFY`` after its commit, at most one
  per ``notify_interval`` per node; other nodes listen on a dedicated
  connection (``hookah.storage.postgres.listener``).
- Expired claims are returned to ``scheduled`` by a reaper that runs on one
  node at a time (``pg_try_advisory_xact_lock``), every ``reap_interval``.
- A connection failure becomes ``StorageUnavailable`` (the web layer answers
  ``503`` with ``Retry-After``); the pool replaces broken connections, so
  the store carries on by itself once PostgreSQL is back.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from hookah.model import (
    CANCELLED_EXPIRED,
    DELIVERED,
    DELIVERING,
    FAILED,
    HOST_PAUSED,
    SCHEDULED,
    STATUSES,
    Attempt,
    Delivery,
    Event,
    Subscription,
)
from hookah import defaults
from hookah.storage.interface import ClaimLost, ISharedStore, IStore, StorageUnavailable
from hookah.storage.postgres import rows, writes
from hookah.storage.postgres.batch import Batcher, Operation, Outcome, transact
from hookah.storage.postgres.listener import Listener
from hookah.storage.postgres.rows import DB_NOW, DB_NOW_ONCE
from hookah.storage.postgres.schema import EVENTS_CHANNEL, REAPER_LOCK, WORK_CHANNEL, upgrade

log = Logger()

T = TypeVar("T")
Work = Callable[[Any], T]


def storage_error(error: BaseException) -> Optional[StorageUnavailable]:
    """The StorageUnavailable a driver error means, or None for other errors."""
    import psycopg
    import psycopg_pool

    if isinstance(error, (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)):
        text = str(error).strip().splitlines()
        return StorageUnavailable(f"PostgreSQL: {text[0] if text else type(error).__name__}")
    return None


def _on_connection(pool: Any, use: Callable[[Any], T]) -> T:
    """
    ``use`` a pooled connection (on a pool thread); a lost server becomes
    ``StorageUnavailable`` and has the pool check its other connections.
    """
    try:
        with pool.connection() as connection:
            return use(connection)
    except BaseException as e:
        error = storage_error(e)
        if error is not None:
            pool.check()
            raise error from e
        raise


@implementer(IStore, ISharedStore)
class PostgresStore:
    """``IStore`` on PostgreSQL; see the module docstring."""

    def __init__(
        self,
        conninfo: str,
        reactor: Any,
        *,
        clock: str = "database",
        pool_size: int = 8,
        connect_timeout: float = 3.0,
        notify_interval: float = 0.1,
        reap_interval: float = 5.0,
        listen: bool = True,
        batch_limit: int = 500,
        batch_concurrency: int = 2,
    ) -> None:
        if clock not in ("database", "caller"):
            raise ValueError(f"clock must be 'database' or 'caller', not {clock!r}")
        self.conninfo = conninfo
        self._reactor = reactor
        self._database_clock = clock == "database"
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._notify_interval = notify_interval
        self._reap_interval = reap_interval
        self._threads = ThreadPool(minthreads=0, maxthreads=pool_size, name="hookah-postgres")
        self._pool: Any = None
        self._open = False
        # The hot writes: those queued while a transaction is in flight
        # share the next one (hookah.storage.postgres.batch).
        self._batcher = Batcher(
            reactor, self._threads, self._transact, limit=batch_limit,
            closed=lambda: StorageUnavailable("the PostgreSQL store is closed"),
            concurrency=batch_concurrency,
        )
        self.node = uuid.uuid4().hex[:12]
        # Called (in the reactor thread) when another node announced due
        # work, and after the listening connection came back (catch up).
        self.work_listeners: List[Callable[[], Any]] = []
        # Called with (topic, seq) when events were committed on a topic,
        # by this node or another (seq: the topic's sequence number of the
        # first of them), and with (None, None) when notifications may have
        # been missed (catch up on every topic).
        self.event_listeners: List[Callable[[Optional[str], Optional[int]], Any]] = []
        self.listener = Listener(conninfo, reactor, (WORK_CHANNEL, EVENTS_CHANNEL), self._notified, self._reconnected) if listen else None
        # channel -> {topic: lowest sequence number} to announce ("" for work).
        self._notify_pending: Dict[str, Dict[str, int]] = {}
        self._notify_timer: Any = None
        self._last_notify = float("-inf")
        self._reaper: Any = None
        self.claims_lost = 0

    # -- lifecycle -------------------------------------------------------------

    def open(self) -> Deferred[None]:
        from psycopg_pool import ConnectionPool

        self._threads.start()
        self._pool = ConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self._pool_size,
            open=False,
            timeout=self._connect_timeout,
            kwargs={"connect_timeout": max(1, int(self._connect_timeout))},
            name="hookah",
        )

        def start() -> int:
            self._pool.open(wait=True, timeout=self._connect_timeout)
            with self._pool.connection() as connection:
                return upgrade(connection)

        d = deferToThreadPool(self._reactor, self._threads, start)

        def opened(migrations: int) -> None:
            self._open = True
            log.info(
                "opened PostgreSQL store (node {node}, {migrations} migrations applied)",
                node=self.node, migrations=migrations,
            )
            if self.listener is not None:
                self.listener.start()
            if self._reap_interval > 0:
                self._reaper = self._reactor.callLater(self._reap_interval, self._reap)

        def failed(failure: Any) -> Any:
            self._close_now()
            error = storage_error(failure.value)
            if error is not None:
                raise error
            return failure

        return d.addCallbacks(opened, failed)

    def _close_now(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close(timeout=1.0)
        if self._threads.started:
            self._threads.stop()

    def close(self) -> Deferred[None]:
        self._open = False
        if self._reaper is not None and self._reaper.active():
            self._reaper.cancel()
        self._reaper = None
        if self._notify_timer is not None and self._notify_timer.active():
            self._notify_timer.cancel()
        self._notify_timer = None
        writes = self._batcher.stop()

        def listener(_: object) -> Deferred[Any]:
            return self.listener.stop() if self.listener is not None else succeed(None)

        def finish(_: object) -> None:
            # ThreadPool.stop joins its threads after their queued work.
            self._close_now()

        return writes.addCallback(listener).addCallback(finish)

    # -- running work ------------------------------------------------------------

    def _run(self, work: Work[T], notify: Optional[str] = None) -> Deferred[T]:
        """Run ``work(cursor)`` in one transaction on a pool thread."""
        pool = self._pool
        if pool is None:
            from twisted.internet.defer import fail

            return fail(StorageUnavailable("the PostgreSQL store is closed"))

        def call() -> T:
            def on_cursor(connection: Any) -> T:
                with connection.cursor() as cursor:
                    return work(cursor)

            return _on_connection(pool, on_cursor)

        d = deferToThreadPool(self._reactor, self._threads, call)
        if notify is not None:
            d.addCallback(self._announce, notify)
        return d

    def _transact(self, batch: List[Operation]) -> List[Outcome]:
        """Run a batch of writes in one transaction (on a pool thread)."""
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("the PostgreSQL store is closed")
        return _on_connection(pool, lambda connection: transact(connection, batch))

    def _write(self, op: Operation, notify: Optional[str] = None) -> Deferred[Any]:
        """Queue ``op`` for the next batch of writes."""
        if self._pool is None:
            from twisted.internet.defer import fail

            return fail(StorageUnavailable("the PostgreSQL store is closed"))
        d = self._batcher.submit(op)
        if notify is not None:
            d.addCallback(self._announce, notify)
        return d

    def _shift(self) -> Optional[float]:
        """How claims inserted now move to the database's clock (``rows.INSERT_DELIVERIES``)."""
        return self._reactor.seconds() if self._database_clock else None

    def _now(self, now: float) -> str:
        """The SQL of the claim clock: the database's, or the caller's ``now``."""
        return DB_NOW_ONCE if self._database_clock else "%(now)s"

    # -- notifications -------------------------------------------------------------

    def _announce(self, result: T, channel: str, topic: str = "", seq: int = 0) -> T:
        """NOTIFY other nodes after a commit, at most once per interval per channel and topic."""
        pending = self._notify_pending.setdefault(channel, {})
        pending[topic] = min(seq, pending.get(topic, seq))
        if self._notify_timer is None:
            wait = max(0.0, self._last_notify + self._notify_interval - self._reactor.seconds())
            self._notify_timer = self._reactor.callLater(wait, self._send_notifies)
        return result

    def _send_notifies(self) -> None:
        self._notify_timer = None
        self._last_notify = self._reactor.seconds()
        pending, self._notify_pending = self._notify_pending, {}
        if self._pool is None:
            return
        messages = []
        for channel, payloads in pending.items():
            if channel == WORK_CHANNEL:
                messages.append((channel, self.node))
            else:
                # One small message per topic: "node seq topic". A topic too
                # long for a payload (8000 bytes) is announced as "any".
                for topic, seq in sorted(payloads.items()):
                    message = f"{self.node} {seq} {topic}"
                    messages.append((channel, message if len(message.encode()) < 7000 else f"{self.node} 0 "))

        # With the writes in flight, if any: in their transaction.
        d = self._write(writes.Notify(messages))
        d.addErrback(lambda f: log.warn("NOTIFY failed: {error}", error=f.getErrorMessage()))

    def _notified(self, channel: str, payload: str) -> None:
        node, _, rest = payload.partition(" ")
        if node == self.node:
            return
        if channel == WORK_CHANNEL:
            self._wake()
        elif channel == EVENTS_CHANNEL:
            seq, _, topic = rest.partition(" ")
            try:
                self._events_committed(topic or None, int(seq) if topic else None)
            except ValueError:
                log.warn("ignored a malformed event notification {payload!r}", payload=payload)

    def _events_committed(self, topic: Optional[str], seq: Optional[int]) -> None:
        for listener in list(self.event_listeners):
            try:
                listener(topic, seq)
            except Exception:
                log.failure("an event listener failed")

    def _wake(self) -> None:
        for listener in list(self.work_listeners):
            try:
                listener()
            except Exception:
                log.failure("a work listener failed")

    def _reconnected(self) -> None:
        """The listening connection is back: whatever was announced meanwhile is read now."""
        self._wake()
        self._events_committed(None, None)

    # -- the reaper ------------------------------------------------------------------

    def _reap(self) -> None:
        self._reaper = None
        d: Deferred[Any] = self.reap_expired_claims()

        def failed(failure: Any) -> None:
            log.warn("reaping expired claims failed: {error}", error=failure.getErrorMessage())

        d.addErrback(failed)

        def again(_: object) -> None:
            if self._open:
                self._reaper = self._reactor.callLater(self._reap_interval, self._reap)

        d.addBoth(again)

    def reap_expired_claims(self) -> Deferred[int]:
        """
        Return expired claims to ``scheduled`` (due at once), on one node at
        a time: a node that does not get the advisory lock does nothing.
        Deferred[int]: how many were returned (0 without the lock).
        """

        def work(cur: Any) -> int:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (REAPER_LOCK,))
            if not cur.fetchone()[0]:
                return 0
            cur.execute(
                "UPDATE deliveries SET status = %s, next_attempt_at = " + DB_NOW + ","
                " claimed_until = NULL, claim_token = NULL"
                f" WHERE due_at <= {DB_NOW_ONCE} AND status = %s",
                (SCHEDULED, DELIVERING),
            )
            return int(cur.rowcount)

        d = self._run(work)

        def reaped(count: int) -> int:
            if count:
                log.info("returned {count} expired claims", count=count)
                self._announce(None, WORK_CHANNEL)
                self._wake()
            return count

        return d.addCallback(reaped)

    # -- health ----------------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        def work(cur: Any) -> None:
            cur.execute("SELECT 1")
            cur.fetchone()

        return self._run(work)

    # -- deliveries ------------------------------------------------------------------

    def add_deliveries(self, deliveries: Iterable[Delivery]) -> Deferred[None]:
        # Deliveries inserted already claimed (the dispatcher's fast path)
        # get their lease on the database's clock, as claims do.
        deliveries = list(deliveries)
        op = writes.AddDeliveries(deliveries, self._shift())
        return self._write(op, notify=WORK_CHANNEL if self._has_scheduled(deliveries) else None)

    @staticmethod
    def _has_scheduled(deliveries: Sequence[Delivery]) -> bool:
        return any(d.status == SCHEDULED for d in deliveries)

    def get_delivery(self, delivery_id: str) -> Deferred[Optional[Delivery]]:
        return self._run(lambda cur: rows.get_delivery(cur, delivery_id))

    def list_deliveries(
        self, status: Optional[str], limit: int, after: Optional[str]
    ) -> Deferred[List[Delivery]]:
        where, args = ["id > %s"], [after or ""]
        if status is not None:
            where.append("status = %s")
            args.append(status)
        sql = (
            f"SELECT {rows.DELIVERY_COLUMNS} FROM deliveries"
            f" WHERE {' AND '.join(where)} ORDER BY id LIMIT %s"
        )

        def work(cur: Any) -> List[Delivery]:
            cur.execute(sql, (*args, max(limit, 0)))
            return rows.load_deliveries(cur, cur.fetchall())

        return self._run(work)

    def claim_due(self, now: float, limit: int, lease_until: float) -> Deferred[List[Delivery]]:
        if limit <= 0:
            return succeed([])
        clock = self._now(now)
        sql = rows.CLAIM.format(now=clock, lease=f"{clock} + %(lease)s")
        params = {"now": now, "limit": limit, "lease": lease_until - now}

        # In the batch of writes: the claim after an attempt's outcome
        # shares its transaction.
        return self._write(writes.Claim(sql, params))

    def finish_attempt(
        self,
        delivery_id: str,
        attempt: Attempt,
        status: str,
        next_attempt_at: Optional[float],
        follow_ups: Sequence[Delivery] = (),
        claim_token: Optional[str] = None,
    ) -> Deferred[None]:
        follow_ups = list(follow_ups)
        notify = WORK_CHANNEL if status == SCHEDULED or self._has_scheduled(follow_ups) else None
        if not follow_ups:
            op: Operation = writes.FinishAttempt(delivery_id, attempt, status, next_attempt_at, claim_token)
            return self._write(op, notify=notify).addErrback(self._lost)
        finished_at = attempt.at if status in (DELIVERED, FAILED) else None
        shift = self._shift()

        def work(cur: Any) -> None:
            sql = (
                "UPDATE deliveries SET status = %s, next_attempt_at = %s,"
                " claimed_until = NULL, claim_token = NULL, finished_at = %s, deferred = NULL WHERE id = %s"
            )
            args: Tuple[Any, ...] = (status, next_attempt_at, finished_at, delivery_id)
            if claim_token is not None:
                sql += " AND claim_token = %s"
                args += (claim_token,)
            cur.execute(sql, args)
            if not cur.rowcount:
                cur.execute("SELECT 1 FROM deliveries WHERE id = %s", (delivery_id,))
                if cur.fetchone() is None:
                    raise KeyError(delivery_id)
                raise ClaimLost(delivery_id)
            cur.execute(
                rows.APPEND_ATTEMPT,
                (delivery_id, delivery_id, attempt.at, attempt.status_code, attempt.error, attempt.duration_ms),
            )
            rows.insert_deliveries(cur, follow_ups, shift)

        return self._write(writes.Work(work, (delivery_id,)), notify=notify).addErrback(self._lost)

    def _lost(self, failure: Any) -> Any:
        if failure.check(ClaimLost):
            self.claims_lost += 1
        return failure

    def renew_claims(
        self, claims: Sequence[Tuple[str, str]], now: float, lease_until: float
    ) -> Deferred[List[str]]:
        claims = list(claims)
        if not claims:
            return succeed([])
        clock = self._now(now)

        def work(cur: Any) -> List[str]:
            cur.execute(
                f"UPDATE deliveries AS d SET claimed_until = {clock} + %(lease)s"
                " FROM unnest(%(ids)s::text[], %(tokens)s::text[]) AS c(id, token)"
                f" WHERE d.id = c.id AND d.claim_token = c.token AND d.status = '{DELIVERING}'"
                " RETURNING d.id",
                {
                    "now": now, "lease": lease_until - now,
                    "ids": [i for i, _ in claims], "tokens": [t for _, t in claims],
                },
            )
            kept = {row[0] for row in cur.fetchall()}
            return [i for i, _ in claims if i not in kept]

        return self._run(work)

    def renew_claim(self, delivery_id: str, claimed_until: float) -> Deferred[None]:
        lease = claimed_until - self._reactor.seconds()

        def work(cur: Any) -> None:
            cur.execute(
                f"UPDATE deliveries SET claimed_until = {self._lease_expr()}"
                " WHERE id = %(id)s AND status = %(status)s",
                {"id": delivery_id, "status": DELIVERING, "until": claimed_until, "lease": lease},
            )

        return self._run(work)

    def _lease_expr(self) -> str:
        """A claim's end: the database's now plus the lease, or the caller's absolute time."""
        return f"{DB_NOW} + %(lease)s" if self._database_clock else "%(until)s"

    def release_claims(self, now: float) -> Deferred[int]:
        # Hookah never calls this on a shared store at start-up (the other
        # nodes' claims and host pauses are theirs; the reaper returns
        # expired claims); it is here for an operator's tool and the contract.
        def work(cur: Any) -> int:
            cur.execute(
                "UPDATE deliveries SET status = %s, claimed_until = NULL, claim_token = NULL"
                " WHERE status = %s",
                (SCHEDULED, DELIVERING),
            )
            claims = int(cur.rowcount)
            cur.execute(
                "UPDATE deliveries SET next_attempt_at = %s"
                " WHERE deferred = %s AND status = %s AND next_attempt_at > %s",
                (now, HOST_PAUSED, SCHEDULED, now),
            )
            return claims + int(cur.rowcount)

        return self._run(work, notify=WORK_CHANNEL)

    def reschedule(
        self, delivery_id: str, next_attempt_at: float, deferred: Optional[str] = None,
        claim_token: Optional[str] = None,
    ) -> Deferred[None]:
        op = writes.Reschedule(delivery_id, next_attempt_at, deferred, claim_token)
        return self._write(op, notify=WORK_CHANNEL)

    def requeue(self, delivery_id: str, now: float) -> Deferred[Optional[Delivery]]:
        def work(cur: Any) -> Optional[Delivery]:
            cur.execute("SELECT status FROM deliveries WHERE id = %s FOR UPDATE", (delivery_id,))
            row = cur.fetchone()
            if row is None or row[0] not in (DELIVERED, FAILED):
                return None
            cur.execute(
                "UPDATE deliveries SET status = %s, next_attempt_at = %s,"
                " retry_from = (SELECT COUNT(*) FROM attempts WHERE delivery_id = %s),"
                " claimed_until = NULL, claim_token = NULL, finished_at = NULL, deferred = NULL WHERE id = %s",
                (SCHEDULED, now, delivery_id, delivery_id),
            )
            return rows.get_delivery(cur, delivery_id)

        return self._run(work, notify=WORK_CHANNEL)

    def next_due(self) -> Deferred[Optional[float]]:
        def work(cur: Any) -> Optional[float]:
            cur.execute(
                "SELECT due_at FROM deliveries WHERE due_at IS NOT NULL ORDER BY due_at LIMIT 1"
            )
            row = cur.fetchone()
            return None if row is None else float(row[0])

        return self._run(work)

    def cancel_deliveries(self, topic: str, callback: str, reason: str) -> Deferred[int]:
        now = self._reactor.seconds()
        return self._run(lambda cur: rows.cancel_deliveries(cur, topic, callback, reason, now))

    def purge_finished(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred[int]:
        def work(cur: Any) -> int:
            cur.execute(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
                " WHERE finished_at < %s AND status IN (%s, %s)"
                " ORDER BY finished_at LIMIT %s FOR UPDATE SKIP LOCKED)",
                (before, DELIVERED, FAILED, max(limit, 0)),
            )
            return int(cur.rowcount)

        return self._run(work)

    def count_deliveries(self) -> Deferred[Dict[str, int]]:
        def work(cur: Any) -> Dict[str, int]:
            counts: Dict[str, int] = dict.fromkeys(STATUSES, 0)
            cur.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status")
            counts.update((status, int(n)) for status, n in cur.fetchall())
            return counts

        return self._run(work)

    def find_idempotency_key(self, key: str, since: Optional[float]) -> Deferred[Optional[str]]:
        window = float("-inf") if since is None else since

        def work(cur: Any) -> Optional[str]:
            cur.execute(
                "SELECT id FROM idempotency_keys WHERE key = %s AND created_at >= %s"
                " ORDER BY created_at, id LIMIT 1",
                (key, window),
            )
            row = cur.fetchone()
            return None if row is None else str(row[0])

        return self._run(work)

    def purge_idempotency_keys(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred[int]:
        def work(cur: Any) -> int:
            cur.execute(
                "DELETE FROM idempotency_keys WHERE ctid IN (SELECT ctid FROM idempotency_keys"
                " WHERE created_at < %s ORDER BY created_at LIMIT %s)",
                (before, max(limit, 0)),
            )
            return int(cur.rowcount)

        return self._run(work)

    # -- events ------------------------------------------------------------------------

    def add_event(
        self,
        event: Event,
        deliveries: Iterable[Delivery],
        keep_count: Optional[int],
        keep_after: Optional[float],
    ) -> Deferred[None]:
        deliveries = list(deliveries)
        shift = self._shift()

        def work(cur: Any) -> int:
            # The topic's row stays locked until commit: sequence numbers
            # are handed out in commit order, with no gaps.
            cur.execute(
                "INSERT INTO topic_sequences (topic, last_seq) VALUES (%s, 1)"
                " ON CONFLICT (topic) DO UPDATE SET last_seq = topic_sequences.last_seq + 1"
                " RETURNING last_seq",
                (event.topic,),
            )
            (seq,) = cur.fetchone()
            cur.execute(
                f"INSERT INTO events ({rows.EVENT_COLUMNS}, seq) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    event.id, event.topic, event.body, event.content_type,
                    rows.dump_headers(event.headers), event.created_at, event.idempotency_key, seq,
                ),
            )
            rows.remember_idempotency_keys(cur, [event])
            rows.insert_deliveries(cur, deliveries, shift)
            if keep_count is not None:
                cur.execute(
                    "DELETE FROM events WHERE topic = %s AND seq <= %s", (event.topic, seq - keep_count)
                )
            if keep_after is not None:
                cur.execute(
                    "DELETE FROM events WHERE topic = %s AND created_at <= %s", (event.topic, keep_after)
                )
            return int(seq)

        def committed(seq: int) -> None:
            self._announce(None, EVENTS_CHANNEL, event.topic, seq)
            self._events_committed(event.topic, seq)

        d = self._run(work, notify=WORK_CHANNEL if self._has_scheduled(deliveries) else None)
        return d.addCallback(committed)

    def events_since(self, topic: str, seq: int, limit: int) -> Deferred[List[Tuple[int, Event]]]:
        """
        The events of ``topic`` with a sequence number above ``seq``, in
        sequence (commit) order, at most ``limit``, each with its number:
        how a node follows what every node commits on a topic.
        """

        def work(cur: Any) -> List[Tuple[int, Event]]:
            cur.execute(
                f"SELECT seq, {rows.EVENT_COLUMNS} FROM events WHERE topic = %s AND seq > %s"
                " ORDER BY seq LIMIT %s",
                (topic, seq, max(limit, 0)),
            )
            return [(int(row[0]), rows.event_from_row(row[1:])) for row in cur.fetchall()]

        return self._run(work)

    def trim_events(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred[int]:
        def work(cur: Any) -> int:
            cur.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events"
                " WHERE created_at < %s ORDER BY created_at LIMIT %s)",
                (before, max(limit, 0)),
            )
            return int(cur.rowcount)

        return self._run(work)

    def get_event(self, event_id: str) -> Deferred[Optional[Event]]:
        def work(cur: Any) -> Optional[Event]:
            cur.execute(f"SELECT {rows.EVENT_COLUMNS} FROM events WHERE id = %s", (event_id,))
            row = cur.fetchone()
            return None if row is None else rows.event_from_row(row)

        return self._run(work)

    def events_after(
        self, topics: Iterable[str], after: Optional[str], limit: int
    ) -> Deferred[List[Event]]:
        topics = list(dict.fromkeys(topics))

        def work(cur: Any) -> List[Event]:
            cur.execute(
                f"SELECT {rows.EVENT_COLUMNS} FROM events"
                " WHERE topic = ANY(%s) AND id > %s ORDER BY id LIMIT %s",
                (topics, after or "", max(limit, 0)),
            )
            return [rows.event_from_row(row) for row in cur.fetchall()]

        return self._run(work)

    def events_page(
        self, topics: Iterable[str], after: Optional[str], limit: int, max_bytes: int
    ) -> Deferred[List[Event]]:
        topics = list(dict.fromkeys(topics))
        return self._run(lambda cur: self._page(cur, topics, after, limit, max_bytes))

    def resume_page(
        self, topics: Iterable[str], after: str, limit: int, max_bytes: int
    ) -> Deferred[Tuple[bool, List[Event]]]:
        topics = list(dict.fromkeys(topics))

        def work(cur: Any) -> Tuple[bool, List[Event]]:
            # The primary key finds the resume point, in the same
            # transaction as the page; an id of another topic says nothing
            # of these.
            cur.execute("SELECT 1 FROM events WHERE id = %s AND topic = ANY(%s)", (after, topics))
            kept = cur.fetchone() is not None
            return kept, self._page(cur, topics, after, limit, max_bytes)

        return self._run(work)

    @staticmethod
    def _page(cur: Any, topics: List[str], after: Optional[str], limit: int, max_bytes: int) -> List[Event]:
        # Read in small slices, so rows past the byte bound are never fetched.
        step = 32
        page: List[Event] = []
        size = 0
        cursor_id = after or ""
        while len(page) < limit:
            cur.execute(
                f"SELECT {rows.EVENT_COLUMNS} FROM events"
                " WHERE topic = ANY(%s) AND id > %s ORDER BY id LIMIT %s",
                (topics, cursor_id, min(step, limit - len(page))),
            )
            batch = cur.fetchall()
            for row in batch:
                event = rows.event_from_row(row)
                page.append(event)
                size += len(event.body)
                if size >= max_bytes:
                    return page
            if len(batch) < step:
                break
            cursor_id = page[-1].id
        return page

    def replay_cursor(self, topics: Iterable[str], count: int) -> Deferred[Optional[str]]:
        topics = list(dict.fromkeys(topics))

        def work(cur: Any) -> Optional[str]:
            cur.execute(
                "SELECT id FROM events WHERE topic = ANY(%s) ORDER BY id DESC LIMIT 1 OFFSET %s",
                (topics, max(count, 0)),
            )
            row = cur.fetchone()
            return None if row is None else str(row[0])

        return self._run(work)

    def last_events(self, topics: Iterable[str], count: int) -> Deferred[List[Event]]:
        topics = list(dict.fromkeys(topics))

        def work(cur: Any) -> List[Event]:
            cur.execute(
                f"SELECT {rows.EVENT_COLUMNS} FROM events"
                " WHERE topic = ANY(%s) ORDER BY id DESC LIMIT %s",
                (topics, max(count, 0)),
            )
            newest = [rows.event_from_row(row) for row in cur.fetchall()]
            newest.reverse()
            return newest

        return self._run(work)

    def list_topics(self) -> Deferred[List[Tuple[str, int, int]]]:
        now = self._reactor.seconds()

        def work(cur: Any) -> List[Tuple[str, int, int]]:
            cur.execute(
                "SELECT topic, SUM(events), SUM(subscribers) FROM ("
                " SELECT topic, COUNT(*) AS events, 0 AS subscribers FROM events GROUP BY topic"
                " UNION ALL"
                " SELECT topic, 0, COUNT(*) FROM subscriptions WHERE expires_at > %s GROUP BY topic"
                ") AS t GROUP BY topic ORDER BY topic",
                (now,),
            )
            return [(t, int(e), int(s)) for t, e, s in cur.fetchall()]

        return self._run(work)

    # -- subscriptions -------------------------------------------------------------------

    def put_subscription(self, subscription: Subscription) -> Deferred[None]:
        s = subscription
        row = (s.topic, s.callback, s.secret, s.lease_seconds, s.created_at, s.expires_at, s.hub_url)

        def work(cur: Any) -> None:
            cur.execute(
                f"INSERT INTO subscriptions ({rows.SUBSCRIPTION_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (topic, callback) DO UPDATE SET secret = excluded.secret,"
                " lease_seconds = excluded.lease_seconds, created_at = excluded.created_at,"
                " expires_at = excluded.expires_at, hub_url = excluded.hub_url",
                row,
            )

        return self._run(work)

    def remove_subscription(
        self, topic: str, callback: str, cancel_reason: Optional[str] = None
    ) -> Deferred[bool]:
        now = self._reactor.seconds()

        def work(cur: Any) -> bool:
            cur.execute("DELETE FROM subscriptions WHERE topic = %s AND callback = %s", (topic, callback))
            removed = cur.rowcount > 0
            if cancel_reason is not None:
                rows.cancel_deliveries(cur, topic, callback, cancel_reason, now)
            return removed

        return self._run(work)

    def get_subscription(self, topic: str, callback: str) -> Deferred[Optional[Subscription]]:
        def work(cur: Any) -> Optional[Subscription]:
            cur.execute(
                f"SELECT {rows.SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE topic = %s AND callback = %s",
                (topic, callback),
            )
            row = cur.fetchone()
            return None if row is None else Subscription(*row)

        return self._run(work)

    def active_subscriptions(self, topic: str, now: float) -> Deferred[List[Subscription]]:
        def work(cur: Any) -> List[Subscription]:
            cur.execute(
                f"SELECT {rows.SUBSCRIPTION_COLUMNS} FROM subscriptions"
                " WHERE topic = %s AND expires_at > %s ORDER BY callback",
                (topic, now),
            )
            return [Subscription(*row) for row in cur.fetchall()]

        return self._run(work)

    def list_subscriptions(self, topic: Optional[str]) -> Deferred[List[Subscription]]:
        select = f"SELECT {rows.SUBSCRIPTION_COLUMNS} FROM subscriptions"

        def work(cur: Any) -> List[Subscription]:
            if topic is None:
                cur.execute(f"{select} ORDER BY topic, callback")
            else:
                cur.execute(f"{select} WHERE topic = %s ORDER BY callback", (topic,))
            return [Subscription(*row) for row in cur.fetchall()]

        return self._run(work)

    def purge_expired(self, now: float) -> Deferred[List[Tuple[str, str]]]:
        at = self._reactor.seconds()

        def work(cur: Any) -> List[Tuple[str, str]]:
            cur.execute(
                "DELETE FROM subscriptions WHERE expires_at <= %s RETURNING topic, callback", (now,)
            )
            pairs = sorted((t, cb) for t, cb in cur.fetchall())
            for topic, callback in pairs:
                rows.cancel_deliveries(cur, topic, callback, CANCELLED_EXPIRED, at)
            return pairs

        return self._run(work)

