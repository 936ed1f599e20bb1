"""
Group commit for the PostgreSQL store: the writes that arrive while one
transaction is in flight share the next one.

A store operation run alone costs a thread hand-off, a pooled connection, a
``BEGIN``, its statements and a ``COMMIT``, each a round trip and a turn of
psycopg in a thread that competes with the reactor for the GIL; under load
that overhead, not the database's work, bounds a node. The hot writes (new
deliveries, attempts' outcomes, claims, claim hand-backs, notifications) go
through a ``Batcher`` instead: at most ``concurrency`` transactions in flight
(two: while one waits on the database the other can run; one alone left the
dispatcher's claim loop waiting a whole transaction behind the one in
flight), and the operations queued meanwhile (at most ``limit``) run together
in the next, each kind as one statement for all of its operations (arrays
``unnest``-ed into an ``INSERT`` or an ``UPDATE ... FROM``), sent in one
pipeline with its ``BEGIN`` and ``COMMIT``: one round trip (each costs the
database thread the GIL back from a busy reactor thread, up to the
interpreter's switch interval). Operations of one kind that touch the same
delivery go into successive statements, in the order they were queued;
operations of different kinds run in a fixed order (inserts, outcomes,
hand-backs, claims). Concurrent operations were never ordered (each ran on
a thread of its own), so this order promises no less than before. Rows are
updated in id order, so two transactions in flight never deadlock on them.

Outcomes stay per operation. A statement reports, row by row, which of its
operations found their delivery and held its claim: a lost claim
(``ClaimLost``) or an unknown delivery (``KeyError``) fails that operation
alone, having written nothing, while the rest commit. A statement that
raises (a duplicate id, say) rolls the whole transaction back, and the
batch runs again one operation at a time, each in a savepoint of its own,
so the failure stays with the operation that caused it. A failed ``COMMIT``
fails every operation of the batch: nothing is reported durable that is
not. A lost connection fails them all with ``StorageUnavailable`` (by the
store's translation of the driver's error).

With two transactions in flight, a claim in one can take a delivery the
other handed back (an outcome, a hand-back) as soon as that one commits,
and its thread may report first. Its caller must not hear of the claim
before the hand-back: a dispatcher still holding the delivery until then
takes the claim for its own, drops it, and the delivery waits out the
lease. So a batch whose claims returned a delivery that a batch still in
flight writes (``Operation.keys``) reports after that one.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from typing import Any, Callable, ClassVar, Deque, Dict, List, Sequence, Set, Tuple, Type

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

Outcome = Tuple[bool, Any]
"""(True, result) or (False, a Failure), for one operation."""


class Operation:
    """
    One write waiting for a transaction. A kind of operation is a subclass:
    ``statement`` builds the one statement of any number of them, and
    ``outcomes`` reads what it returned, one outcome per operation. A kind
    whose operations cannot share a statement sets ``together = False``
    and implements ``run`` (on a cursor, in a savepoint of its own).
    """

    # Where the kind's statement goes in a transaction: lower first.
    order: ClassVar[int] = 50
    together: ClassVar[bool] = True
    __slots__ = ("deferred",)

    def __init__(self) -> None:
        self.deferred: Deferred[Any] = Deferred()

    def keys(self) -> Sequence[str]:
        """The deliveries this operation changes, which no other in its statement may."""
        return ()

    def claimed(self, result: Any) -> Sequence[str]:
        """The deliveries a successful ``result`` hands to the caller (a claim's)."""
        return ()

    @classmethod
    def statement(cls, ops: Sequence[Any]) -> Tuple[str, Any]:
        raise NotImplementedError

    @classmethod
    def outcomes(cls, cur: Any, ops: Sequence[Any]) -> List[Outcome]:
        """After ``statement`` ran on ``cur``: each operation's outcome; (True, None) by default."""
        return [(True, None)] * len(ops)

    def run(self, cur: Any) -> Any:
        """Alone, in a savepoint: the result, or an exception that undoes this operation."""
        sql, params = self.statement([self])
        cur.execute(sql, params)
        ((ok, value),) = self.outcomes(cur, [self])
        if not ok:
            value.raiseException()
        return value


def plan(ops: Sequence[Operation]) -> List[List[Operation]]:
    """
    The statements a batch runs, in order, as the operations of each: one
    per kind, split where an operation touches a delivery an earlier one of
    its statement touched (queue order is kept across the split).
    """
    kinds: Dict[Type[Operation], List[List[Operation]]] = {}
    seen: Dict[Type[Operation], List[Set[str]]] = {}
    for op in ops:
        kind = type(op)
        if not kind.together:
            kinds.setdefault(kind, []).append([op])
            continue
        statements = kinds.setdefault(kind, [])
        touched = seen.setdefault(kind, [])
        keys = op.keys()
        # The first statement after the last one touching these keys.
        at = 0
        for i in range(len(statements) - 1, -1, -1):
            if any(k in touched[i] for k in keys):
                at = i + 1
                break
        if at == len(statements):
            statements.append([])
            touched.append(set())
        statements[at].append(op)
        touched[at].update(keys)
    return [s for kind in sorted(kinds, key=lambda k: k.order) for s in kinds[kind]]


def transact(connection: Any, ops: Sequence[Operation]) -> List[Outcome]:
    """
    Run ``ops`` in one transaction on ``connection`` (a psycopg connection
    outside a transaction): together, or one by one after a statement
    failed; their outcomes in the order of ``ops``. Raises, failing them
    all, when the commit fails or the connection is lost.
    """
    import psycopg

    statements = plan(ops)
    together = [s for s in statements if type(s[0]).together]
    singles = [s[0] for s in statements if not type(s[0]).together]
    committing = False
    try:
        results: Dict[int, Outcome] = {}
        if together:
            cursors = []
            try:
                # BEGIN (implicit), the statements and, unless work of its
                # own follows, COMMIT: one round trip.
                with connection.pipeline():
                    for s in together:
                        cur = connection.cursor()
                        cur.execute(*type(s[0]).statement(s))
                        cursors.append((cur, s))
                    if not singles:
                        connection.cursor().execute("COMMIT")
            except psycopg.Error:
                # Every statement done: the COMMIT is what failed.
                committing = not singles and all(_done(cur) for cur, _ in cursors)
                raise
            for cur, s in cursors:
                for op, outcome in zip(s, type(s[0]).outcomes(cur, s)):
                    results[id(op)] = outcome
                cur.close()
        if singles:
            # Work that reads its own results as it goes, outside the
            # pipeline: each in a savepoint (in a transaction of its own if
            # alone).
            with connection.transaction() if not together else nullcontext():
                for op in singles:
                    results[id(op)] = _alone(connection, op)
                committing = True
            connection.commit()
        return [results[id(op)] for op in ops]
    except psycopg.OperationalError:
        raise
    except Exception:
        if committing or connection.broken:
            raise
        connection.rollback()
    with connection.transaction():
        results = {id(op): _alone(connection, op) for s in statements for op in s}
    return [results[id(op)] for op in ops]


def _done(cur: Any) -> bool:
    """Whether the statement of ``cur`` ran to its end (in a pipeline that then failed)."""
    from psycopg import pq

    result = cur.pgresult
    return result is not None and result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)


def _alone(connection: Any, op: Operation) -> Outcome:
    """``op.run`` in a savepoint of its own; its failure undoes it alone."""
    import psycopg

    try:
        with connection.transaction():
            with connection.cursor() as cur:
                return (True, op.run(cur))
    except psycopg.OperationalError:
        raise
    except Exception:
        if connection.broken:
            raise
        return (False, Failure())


class Batcher:
    """
    The queue of operations (reactor thread) and the one batch in flight:
    ``run(batch)`` on a thread of ``threads`` (``transact`` on a
    connection of the store's), whose exception fails every operation of
    the batch. ``closed`` makes the error of an operation queued after
    ``stop``.
    """

    def __init__(
        self,
        reactor: Any,
        threads: Any,
        run: Callable[[List[Operation]], List[Outcome]],
        *,
        limit: int,
        closed: Callable[[], Exception],
        concurrency: int = 1,
    ) -> None:
        self._reactor = reactor
        self._threads = threads
        self._run = run
        self._limit = limit
        self._closed = closed
        self._queue: Deque[Operation] = deque()
        self._in_flight = 0
        self._concurrency = concurrency
        self._starting: Any = None
        self._stopping = False
        self._idle: List[Deferred[None]] = []
        # The batches in flight, and those finished but waiting to report
        # after some of them (a claim's, after the hand-backs it took).
        self._running: List[_Batch] = []
        self._held: List[_Batch] = []
        self.transactions = 0
        """How many batches have committed."""

    def submit(self, op: Operation) -> Deferred[Any]:
        """Queue ``op``; its Deferred fires once its transaction committed (or failed)."""
        if self._stopping:
            return fail(self._closed())
        self._queue.append(op)
        if self._in_flight < self._concurrency and self._starting is None:
            # The next turn of the reactor: what this one queues goes along.
            self._starting = self._reactor.callLater(0, self._start)
        return op.deferred

    def stop(self) -> Deferred[None]:
        """Refuse new operations; fires once the queued ones have run."""
        self._stopping = True
        if not self._in_flight and not self._queue and not self._held:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    def _start(self) -> None:
        self._starting = None
        if self._in_flight >= self._concurrency or not self._queue:
            return
        count = min(len(self._queue), self._limit)
        batch = [self._queue.popleft() for _ in range(count)]
        self._in_flight += 1
        running = _Batch(batch)
        self._running.append(running)
        d = deferToThreadPool(self._reactor, self._threads, self._run, batch)
        d.addBoth(self._finished, running)

    def _finished(self, result: Any, batch: _Batch) -> None:
        self._in_flight -= 1
        self._running.remove(batch)
        if isinstance(result, Failure):
            batch.outcomes = [(False, result)] * len(batch.ops)
        else:
            self.transactions += 1
            batch.outcomes = result
            claimed = {
                key for op, (ok, value) in zip(batch.ops, result) if ok for key in op.claimed(value)
            }
            if claimed:
                # Only batches still in flight: they finish after this one,
                # so no two batches ever wait for each other.
                batch.after = [
                    other for other in self._running if any(k in claimed for op in other.ops for k in op.keys())
                ]
        if batch.after:
            self._held.append(batch)
        else:
            self._report(batch)
        if self._queue:
            self._start()
        elif self._idle and not self._in_flight and not self._held:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def _report(self, batch: _Batch) -> None:
        """Fire ``batch``'s operations, then those of the batches held for it."""
        # The next batch starts after these fire: what their callbacks
        # queue (the claim after an outcome, say) goes with it.
        for op, (ok, value) in zip(batch.ops, batch.outcomes):
            if ok:
                op.deferred.callback(value)
            else:
                op.deferred.errback(value)
        ready = []
        for held in self._held:
            if batch in held.after:
                held.after.remove(batch)
                if not held.after:
                    ready.append(held)
        for held in ready:
            self._held.remove(held)
            self._report(held)


class _Batch:
    """The operations of one transaction, its outcomes once it finished, and the batches it reports after."""

    __slots__ = ("ops", "outcomes", "after")

    def __init__(self, ops: List[Operation]) -> None:
        self.ops = ops
        self.outcomes: List[Outcome] = []
        self.after: List[_Batch] = []

