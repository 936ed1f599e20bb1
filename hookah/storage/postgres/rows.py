"""
Hookah's records as PostgreSQL rows, and the statements that move them.

These functions run on the store's threads, with a psycopg cursor inside
the operation's transaction. Claiming is one statement: the due rows are
picked in a ``MATERIALIZED`` CTE with ``FOR UPDATE SKIP LOCKED`` (so the
planner cannot fold it into the update and claim more than the limit, and
two nodes claiming at once each skip the other's rows instead of waiting),
then updated with a fresh claim token.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from hookah.storage.records import (  # noqa: F401 (the stores use them through this module)
    DELIVERY_COLUMNS,
    deliveries_from_rows,
    delivery_values,
    dump_headers,
    event_from_row,
)
from hookah.model import (
    DELIVERING,
    FAILED,
    KIND_WEBSUB,
    SCHEDULED,
    Attempt,
    Delivery,
    Event,
)

EVENT_COLUMNS = "id, topic, body, content_type, headers, created_at, idempotency_key"
SUBSCRIPTION_COLUMNS = "topic, callback, secret, lease_seconds, created_at, expires_at, hub_url"

# The statement that claims: ``now`` and the lease are SQL expressions the
# store fills in (the database's clock, or the caller's).
CLAIM = (
    "WITH due AS MATERIALIZED ("
    " SELECT id, due_at FROM deliveries WHERE due_at <= {now}"
    " ORDER BY due_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    f" UPDATE deliveries AS d SET status = '{DELIVERING}', claimed_until = {{lease}},"
    " claim_token = gen_random_uuid()::text"
    " FROM due WHERE d.id = due.id"
    f" RETURNING due.due_at, {', '.join('d.' + c.strip() for c in DELIVERY_COLUMNS.split(','))}"
)
APPEND_ATTEMPT = (
    "INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
    " VALUES (%s, (SELECT COALESCE(MAX(seq), -1) + 1 FROM attempts"
    " WHERE delivery_id = %s), %s, %s, %s, %s)"
)
QUEUED_NOTIFICATIONS = (
    "SELECT id FROM deliveries WHERE topic = %s AND url = %s"
    f" AND kind = '{KIND_WEBSUB}' AND status = '{SCHEDULED}' ORDER BY id FOR UPDATE"
)
CANCEL_DELIVERY = (
    "UPDATE deliveries SET status = %s, next_attempt_at = NULL,"
    " claimed_until = NULL, claim_token = NULL, finished_at = %s WHERE id = %s"
)


def remember_idempotency_keys(cur: Any, records: Sequence[Union[Delivery, Event]]) -> None:
    keyed = [
        (r.idempotency_key, r.id, r.created_at) for r in records if r.idempotency_key is not None
    ]
    if keyed:
        cur.executemany(
            "INSERT INTO idempotency_keys (key, id, created_at) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            keyed,
        )


def insert_deliveries(cur: Any, deliveries: Sequence[Delivery]) -> None:
    if not deliveries:
        return
    cur.executemany(
        f"INSERT INTO deliveries ({DELIVERY_COLUMNS}, finished_at) VALUES"
        " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [delivery_values(d) for d in deliveries],
    )
    attempts = [
        (d.id, seq, a.at, a.status_code, a.error, a.duration_ms)
        for d in deliveries
        for seq, a in enumerate(d.attempts)
    ]
    if attempts:
        cur.executemany(
            "INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            attempts,
        )
    remember_idempotency_keys(cur, deliveries)


def load_deliveries(cur: Any, rows: List[Any]) -> List[Delivery]:
    """Build deliveries from rows, with their attempts in one more query."""
    attempts: Dict[str, List[Attempt]] = {}
    ids = [row[0] for row in rows]
    if ids:
        cur.execute(
            "SELECT delivery_id, at, status_code, error, duration_ms FROM attempts"
            " WHERE delivery_id = ANY(%s) ORDER BY delivery_id, seq",
            (ids,),
        )
        for delivery_id, at, code, error, ms in cur.fetchall():
            attempts.setdefault(delivery_id, []).append(Attempt(at, code, error, ms))
    return deliveries_from_rows(rows, attempts)


def get_delivery(cur: Any, delivery_id: str) -> Optional[Delivery]:
    cur.execute(f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = %s", (delivery_id,))
    loaded = load_deliveries(cur, cur.fetchall())
    return loaded[0] if loaded else None


def cancel_deliveries(cur: Any, topic: str, callback: str, reason: str, at: float) -> int:
    """Fail the notifications queued for (topic, callback), ``reason`` as their last attempt."""
    cur.execute(QUEUED_NOTIFICATIONS, (topic, callback))
    ids = [row[0] for row in cur.fetchall()]
    if ids:
        cur.executemany(APPEND_ATTEMPT, [(i, i, at, None, reason, 0) for i in ids])
        cur.executemany(CANCEL_DELIVERY, [(FAILED, at, i) for i in ids])
    return len(ids)
