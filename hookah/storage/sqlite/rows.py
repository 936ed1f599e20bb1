"""
Hookah's records as SQLite rows: deliveries with their attempts, and events.

These functions run on the worker thread, inside the batch's transaction,
with the connection the worker passes to each operation. They encode what
the schema (``schema``) stores (with the idempotency keys of new
deliveries and events, kept in a table of their own), decode it back into
``hookah.model`` records, and do the multi-statement delivery work that must see a
consistent set of rows: claiming due deliveries, cancelling queued ones.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
import sqlite3
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union


from hookah.model import (
    DELIVERING,
    FAILED,
    SCHEDULED,
    Attempt,
    Delivery,
    Event,
)
from hookah.storage.records import (  # noqa: F401 (the stores use them through this module)
    DELIVERY_COLUMNS,
    deliveries_from_rows,
    delivery_values,
    dump_headers,
    event_from_row,
)
from hookah.storage.sqlite.schema import (
    APPEND_ATTEMPT,
    CANCEL_DELIVERY,
    CLAIM_EXPIRED,
    CLAIM_SCHEDULED,
    CLAIM_UNTIMED,
    QUEUED_NOTIFICATIONS,
    REMEMBER_IDEMPOTENCY_KEY,
    UNTIMED,
)

# SQLite's historical limit on bound variables is 999.
_IN_CHUNK = 500


def attempt_row(attempt: Attempt) -> Tuple[Any, ...]:
    return (attempt.at, attempt.status_code, attempt.error, attempt.duration_ms)


def cancel_deliveries(
    c: sqlite3.Connection, topic: str, callback: str, reason: str, at: float
) -> int:
    """Fail the notifications queued for (topic, callback), ``reason`` as their last attempt."""
    ids = [row[0] for row in c.execute(QUEUED_NOTIFICATIONS, (topic, callback))]
    c.executemany(
        APPEND_ATTEMPT, [(i, i, at, None, reason, 0) for i in ids]
    )
    c.executemany(CANCEL_DELIVERY, [(FAILED, at, i) for i in ids])
    return len(ids)


def remember_idempotency_keys(
    c: sqlite3.Connection, records: Sequence[Union[Delivery, Event]]
) -> None:
    """Record the keys of ``records`` (in the caller's transaction), apart from them."""
    keyed = [
        (r.idempotency_key, r.id, r.created_at)
        for r in records
        if r.idempotency_key is not None
    ]
    if keyed:
        c.executemany(REMEMBER_IDEMPOTENCY_KEY, keyed)


INSERT_DELIVERY = (
    f"INSERT INTO deliveries ({DELIVERY_COLUMNS}, finished_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_ATTEMPT = (
    "INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def insert_deliveries(c: sqlite3.Connection, deliveries: List[Delivery]) -> None:
    if len(deliveries) == 1:
        c.execute(INSERT_DELIVERY, delivery_values(deliveries[0]))
    else:
        c.executemany(INSERT_DELIVERY, [delivery_values(d) for d in deliveries])
    attempts = [
        (d.id, seq, *attempt_row(a))
        for d in deliveries
        for seq, a in enumerate(d.attempts)
    ]
    if attempts:
        c.executemany(INSERT_ATTEMPT, attempts)
    remember_idempotency_keys(c, deliveries)


def one_statement(deliveries: Sequence[Delivery]) -> bool:
    """
    Whether ``insert_deliveries`` writes ``deliveries`` in a single
    statement (one row, no attempts, no idempotency key), which SQLite
    applies whole or not at all.
    """
    return len(deliveries) == 1 and not deliveries[0].attempts and deliveries[0].idempotency_key is None


def get_delivery(c: sqlite3.Connection, delivery_id: str) -> Optional[Delivery]:
    rows = c.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,)
    ).fetchall()
    loaded = load_deliveries(c, rows)
    return loaded[0] if loaded else None


def load_deliveries(c: sqlite3.Connection, rows: List[Any]) -> List[Delivery]:
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
    return deliveries_from_rows(rows, attempts)


def claim_due(
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
        ((UNTIMED, row[0], row) for row in untimed),
        ((row[7], row[0], row) for row in scheduled),
        ((row[18], row[0], row) for row in expired),
    )
    rows = [row for _, _, row in itertools.islice(merged, limit)]
    tokens = {row[0]: uuid.uuid4().hex for row in rows}
    c.executemany(
        "UPDATE deliveries SET status = ?, claimed_until = ?, claim_token = ? WHERE id = ?",
        [(DELIVERING, lease_until, tokens[row[0]], row[0]) for row in rows],
    )
    return [
        d.replace(status=DELIVERING, claimed_until=lease_until, claim_token=tokens[d.id])
        for d in load_deliveries(c, rows)
    ]
