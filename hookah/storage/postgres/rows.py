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

# The database's clock, in the seconds the model uses.
DB_NOW = "extract(epoch from clock_timestamp())::double precision"
# The same, read once per statement: clock_timestamp() is volatile, so a
# ``due_at <= DB_NOW`` condition cannot bound an index scan and is checked
# against every row of the due index instead (each claim read the whole
# backlog, future rows included: ~4 ms a claim with 4,000 rows waiting,
# which held one node to a third of its delivery rate). A scalar subquery is
# evaluated once, and bounds the scan.
DB_NOW_ONCE = f"(SELECT {DB_NOW})"

# A delivery's attempts, oldest first, as one JSON array of
# [at, status_code, error, duration_ms] (NULL when it has none): read with
# its row, in the statement that claims it, rather than in a query more.
ATTEMPTS_JSON = (
    "(SELECT json_agg(json_build_array(a.at, a.status_code, a.error, a.duration_ms) ORDER BY a.seq)"
    " FROM attempts AS a WHERE a.delivery_id = d.id)"
)

# The statement that claims: ``now`` and the lease are SQL expressions the
# store fills in (the database's clock, or the caller's).
CLAIM = (
    "WITH due AS MATERIALIZED ("
    " SELECT id, due_at FROM deliveries WHERE due_at <= {now}"
    " ORDER BY due_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    f" UPDATE deliveries AS d SET status = '{DELIVERING}', claimed_until = {{lease}},"
    " claim_token = gen_random_uuid()::text"
    # As the statements below: the rows claimed through the primary key.
    " FROM due WHERE d.id = ANY(ARRAY(SELECT id FROM due)) AND d.id = due.id"
    f" RETURNING due.due_at, {', '.join('d.' + c.strip() for c in DELIVERY_COLUMNS.split(','))},"
    f" {ATTEMPTS_JSON}"
)
APPEND_ATTEMPT = (
    "INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
    " VALUES (%s, (SELECT COALESCE(MAX(seq), -1) + 1 FROM attempts"
    " WHERE delivery_id = %s), %s, %s, %s, %s)"
)

# New deliveries, their attempts (if they come with some) and their
# idempotency keys, in one statement whatever their number: each column an
# array, sent in binary (``%b``: psycopg's text arrays are escaped element by
# element, three to four times the CPU of the binary ones). A claim an inserted delivery comes with is on the caller's clock;
# with a ``shift`` (the caller's now when it made the claim) it is moved to
# the database's clock, as claims are (``claimed_until - shift + now()``).
_DELIVERY_ARRAYS = (
    "%b::text[], %b::text[], %b::bytea[], %b::text[], %b::text[], %b::text[],"
    " %b::float8[], %b::float8[], %b::int[], %b::float8[], %b::text[], %b::text[],"
    " %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::int[],"
    " %b::float8[], %b::text[], %b::text[], %b::float8[], %b::float8[]"
)
INSERT_DELIVERIES = (
    "WITH a AS (INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
    " SELECT * FROM unnest(%b::text[], %b::int[], %b::float8[], %b::int[], %b::text[], %b::int[])),"
    " k AS (INSERT INTO idempotency_keys (key, id, created_at)"
    " SELECT * FROM unnest(%b::text[], %b::text[], %b::float8[]) ON CONFLICT DO NOTHING)"
    f" INSERT INTO deliveries ({DELIVERY_COLUMNS}, finished_at)"
    " SELECT id, url, body, content_type, headers, status, created_at, next_attempt_at,"
    " retries, timeout, errback, callback, kind, topic, event_id, parent_id,"
    " idempotency_key, retry_from,"
    f" claimed_until + COALESCE({DB_NOW_ONCE} - shift, 0), deferred, claim_token, finished_at"
    f" FROM unnest({_DELIVERY_ARRAYS}) AS r(id, url, body, content_type, headers, status,"
    " created_at, next_attempt_at, retries, timeout, errback, callback, kind, topic, event_id,"
    " parent_id, idempotency_key, retry_from, claimed_until, deferred, claim_token, finished_at, shift)"
)
# The positions in ``delivery_values`` (then the shift) of the float columns:
# psycopg refuses a list that mixes ints and floats.
_FLOATS = (6, 7, 9, 18, 21, 22)

# The statements below that update deliveries by id find them through
# ``d.id = ANY(<the ids>)`` as well as the join: an index scan bounded by the
# batch, whatever the planner believes of the table's size (its statistics
# lag behind a table that grows fast, and then it hashes a sequential scan of
# every delivery, a cost that grows with the backlog).

# Attempts' outcomes, any number in one statement (each delivery at most
# once): the update that releases each claim still held (its token, or any
# state without one), the attempt of each delivery updated, and a row per
# outcome saying whether it was written, or else whether its delivery exists.
FINISH_ATTEMPTS = (
    "WITH o AS (SELECT * FROM unnest(%(id)b::text[], %(token)b::text[], %(status)b::text[],"
    " %(next_attempt_at)b::float8[], %(finished_at)b::float8[], %(at)b::float8[],"
    " %(status_code)b::int[], %(error)b::text[], %(duration_ms)b::int[])"
    " AS o(id, token, status, next_attempt_at, finished_at, at, status_code, error, duration_ms)),"
    " done AS (UPDATE deliveries AS d SET status = o.status, next_attempt_at = o.next_attempt_at,"
    " claimed_until = NULL, claim_token = NULL, finished_at = o.finished_at, deferred = NULL"
    " FROM o WHERE d.id = ANY(%(id)b::text[]) AND d.id = o.id"
    " AND (o.token IS NULL OR d.claim_token = o.token) RETURNING d.id),"
    " a AS (INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
    " SELECT o.id, (SELECT COALESCE(MAX(p.seq), -1) + 1 FROM attempts AS p WHERE p.delivery_id = o.id),"
    " o.at, o.status_code, o.error, o.duration_ms FROM o JOIN done ON done.id = o.id)"
    " SELECT o.id, done.id IS NOT NULL, (SELECT e.id FROM deliveries AS e WHERE e.id = o.id) IS NOT NULL"
    " FROM o LEFT JOIN done ON done.id = o.id"
)
FINISH_COLUMNS = (
    "id", "token", "status", "next_attempt_at", "finished_at", "at", "status_code", "error", "duration_ms",
)
# Claims handed back (a delivery put off, or claimed by a dispatcher that
# stopped meanwhile), any number in one statement; a claim no longer held
# (another token) is left alone.
RESCHEDULE = (
    f"UPDATE deliveries AS d SET status = '{SCHEDULED}', next_attempt_at = r.next_attempt_at,"
    " claimed_until = NULL, claim_token = NULL, deferred = r.deferred"
    " FROM unnest(%(id)b::text[], %(next_attempt_at)b::float8[], %(deferred)b::text[], %(token)b::text[])"
    " AS r(id, next_attempt_at, deferred, token)"
    f" WHERE d.id = ANY(%(id)b::text[]) AND d.id = r.id AND d.status = '{DELIVERING}'"
    " AND (r.token IS NULL OR d.claim_token = r.token)"
)
RESCHEDULE_COLUMNS = ("id", "next_attempt_at", "deferred", "token")
NOTIFY = "SELECT pg_notify(n.channel, n.payload) FROM unnest(%b::text[], %b::text[]) AS n(channel, payload)"
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


def floats(values: Sequence[Any]) -> List[Optional[float]]:
    return [None if v is None else float(v) for v in values]


def insert_params(deliveries: Sequence[Delivery], shifts: Sequence[Optional[float]]) -> List[Any]:
    """
    The parameters of ``INSERT_DELIVERIES`` for ``deliveries``, each with
    its shift (None: its claim, if any, is stored as given).
    """
    columns: List[Any] = [[] for _ in range(23)]
    attempts: List[Any] = [[] for _ in range(6)]
    keys: List[Any] = [[], [], []]
    for d, shift in zip(deliveries, shifts):
        for column, value in zip(columns, delivery_values(d) + (shift,)):
            column.append(value)
        for seq, a in enumerate(d.attempts):
            for column, value in zip(attempts, (d.id, seq, float(a.at), a.status_code, a.error, a.duration_ms)):
                column.append(value)
        if d.idempotency_key is not None:
            keys[0].append(d.idempotency_key)
            keys[1].append(d.id)
            keys[2].append(float(d.created_at))
    for i in _FLOATS:
        columns[i] = floats(columns[i])
    return attempts + keys + columns


def insert_deliveries(cur: Any, deliveries: Sequence[Delivery], shift: Optional[float] = None) -> None:
    """Insert ``deliveries`` (claims moved by ``shift``; see ``INSERT_DELIVERIES``)."""
    if deliveries:
        cur.execute(INSERT_DELIVERIES, insert_params(deliveries, [shift] * len(deliveries)))


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


def claimed_deliveries(rows: List[Any]) -> List[Delivery]:
    """The rows ``CLAIM`` returned, as deliveries, earliest due first."""
    rows = sorted(rows, key=lambda row: (row[0], row[1]))
    attempts = {
        row[1]: [Attempt(at, code, error, ms) for at, code, error, ms in row[-1]]
        for row in rows
        if row[-1]
    }
    return deliveries_from_rows([row[1:-1] for row in rows], attempts)


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
