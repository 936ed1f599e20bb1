"""
The PostgreSQL store's hot writes as batch operations (``batch.Operation``):
each kind knows the one statement that does any number of them, and how to
read each one's outcome from what it returned. The statements are in
``rows``; their text never depends on how many operations share them, so
psycopg prepares each once per connection.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from twisted.python.failure import Failure

from hookah.model import DELIVERED, FAILED, Attempt, Delivery
from hookah.storage.interface import ClaimLost
from hookah.storage.postgres import rows
from hookah.storage.postgres.batch import Operation, Outcome


class AddDeliveries(Operation):
    """``add_deliveries``: new rows, their attempts and idempotency keys."""

    order = 10
    __slots__ = ("deliveries", "shift")

    def __init__(self, deliveries: Sequence[Delivery], shift: Optional[float]) -> None:
        super().__init__()
        self.deliveries = deliveries
        self.shift = shift

    @classmethod
    def statement(cls, ops: Sequence[AddDeliveries]) -> Tuple[str, Any]:
        deliveries = [d for op in ops for d in op.deliveries]
        shifts = [op.shift for op in ops for _ in op.deliveries]
        return rows.INSERT_DELIVERIES, rows.insert_params(deliveries, shifts)


class FinishAttempt(Operation):
    """
    ``finish_attempt`` without follow-ups: the outcome, the attempt, and the
    claim released, or ``ClaimLost``/``KeyError`` with nothing written.
    """

    order = 20
    __slots__ = ("id", "values")

    def __init__(
        self, delivery_id: str, attempt: Attempt, status: str, next_attempt_at: Optional[float],
        claim_token: Optional[str],
    ) -> None:
        super().__init__()
        self.id = delivery_id
        finished_at = attempt.at if status in (DELIVERED, FAILED) else None
        self.values = (
            delivery_id, claim_token, status, next_attempt_at, finished_at,
            attempt.at, attempt.status_code, attempt.error, attempt.duration_ms,
        )

    def keys(self) -> Sequence[str]:
        return (self.id,)

    @classmethod
    def statement(cls, ops: Sequence[FinishAttempt]) -> Tuple[str, Any]:
        # In id order: two transactions of one node lock their rows in the
        # same order, so they never deadlock.
        ops = sorted(ops, key=lambda op: op.id)
        columns: List[Any] = [list(c) for c in zip(*(op.values for op in ops))]
        for i in (3, 4, 5):
            columns[i] = rows.floats(columns[i])
        return rows.FINISH_ATTEMPTS, dict(zip(rows.FINISH_COLUMNS, columns))

    @classmethod
    def outcomes(cls, cur: Any, ops: Sequence[FinishAttempt]) -> List[Outcome]:
        found = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
        outcomes: List[Outcome] = []
        for op in ops:
            written, exists = found[op.id]
            if written:
                outcomes.append((True, None))
            else:
                error = ClaimLost(op.id) if exists else KeyError(op.id)
                outcomes.append((False, Failure(error)))
        return outcomes


class Reschedule(Operation):
    """``reschedule``: a claim handed back, due again at a given time."""

    order = 30
    __slots__ = ("id", "values")

    def __init__(
        self, delivery_id: str, next_attempt_at: float, deferred: Optional[str], claim_token: Optional[str]
    ) -> None:
        super().__init__()
        self.id = delivery_id
        self.values = (delivery_id, float(next_attempt_at), deferred, claim_token)

    def keys(self) -> Sequence[str]:
        return (self.id,)

    @classmethod
    def statement(cls, ops: Sequence[Reschedule]) -> Tuple[str, Any]:
        ops = sorted(ops, key=lambda op: op.id)  # as FinishAttempt's
        return rows.RESCHEDULE, dict(zip(rows.RESCHEDULE_COLUMNS, (list(c) for c in zip(*(op.values for op in ops)))))


# The key every claim holds, so that each is a statement of its own.
_CLAIMING = ("\0claim",)


class Claim(Operation):
    """
    ``claim_due``, after the batch's outcomes (so what they made due again
    may be claimed at once), with each delivery's attempts in the same
    statement. ``sql`` is ``rows.CLAIM`` on the store's clock.
    """

    order = 40
    __slots__ = ("sql", "params")

    def __init__(self, sql: str, params: Any) -> None:
        super().__init__()
        self.sql = sql
        self.params = params

    def keys(self) -> Sequence[str]:
        return _CLAIMING

    @classmethod
    def statement(cls, ops: Sequence[Claim]) -> Tuple[str, Any]:
        (op,) = ops
        return op.sql, op.params

    @classmethod
    def outcomes(cls, cur: Any, ops: Sequence[Claim]) -> List[Outcome]:
        return [(True, rows.claimed_deliveries(cur.fetchall()))]

    def claimed(self, result: List[Delivery]) -> Sequence[str]:
        return [d.id for d in result]


class Notify(Operation):
    """Messages for other nodes (``pg_notify``), sent when the batch commits."""

    order = 50
    __slots__ = ("messages",)

    def __init__(self, messages: Sequence[Tuple[str, str]]) -> None:
        super().__init__()
        self.messages = messages

    @classmethod
    def statement(cls, ops: Sequence[Notify]) -> Tuple[str, Any]:
        messages = [m for op in ops for m in op.messages]
        return rows.NOTIFY, ([c for c, _ in messages], [p for _, p in messages])


class Work(Operation):
    """Any other write, as a function of a cursor, in a savepoint of its own."""

    order = 25
    together = False
    __slots__ = ("work", "touches")

    def __init__(self, work: Any, keys: Sequence[str] = ()) -> None:
        super().__init__()
        self.work = work
        self.touches = keys

    def keys(self) -> Sequence[str]:
        """The deliveries it hands back (an outcome's), for the claims that take them (``Batcher``)."""
        return self.touches

    def run(self, cur: Any) -> Any:
        return self.work(cur)
