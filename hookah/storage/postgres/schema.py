"""
The PostgreSQL schema of Hookah's store: its tables, its version and the
migrations that reach it.

The database records its version in ``hookah_schema``. ``upgrade`` runs in
one transaction under a transaction-level advisory lock, so two nodes
starting together never race: the second waits for the first, then finds
nothing left to do. A database written by a newer Hookah is refused rather
than misread. ``hookah migrate`` runs the same function.

Times are ``double precision`` seconds since the epoch, as the model holds
them. ``due_at`` is a stored generated column, the moment a delivery becomes
claimable (a scheduled one's ``next_attempt_at``, a claim's expiry), so that
claiming, ``next_due`` and the reaper are one index range each.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from hookah.model import DELIVERED, DELIVERING, FAILED, HOST_PAUSED, KIND_WEBSUB, SCHEDULED

SCHEMA_VERSION = 2

# An arbitrary constant, the same on every node: the advisory lock key of
# schema upgrades (pg_advisory_xact_lock takes a bigint).
MIGRATION_LOCK = 0x686F6F6B6168_01
# The reaper's lock: one node at a time returns expired claims.
REAPER_LOCK = 0x686F6F6B6168_02
# Retention and lease expiry: one node at a time.
MAINTENANCE_LOCK = 0x686F6F6B6168_03

# The NOTIFY channels: due work, and events committed (for other nodes' streams).
WORK_CHANNEL = "hookah_work"
EVENTS_CHANNEL = "hookah_events"

MIGRATIONS: Dict[int, str] = {
    0: f"""
CREATE TABLE deliveries (
    id text PRIMARY KEY,
    url text NOT NULL,
    body bytea NOT NULL,
    content_type text,
    headers text NOT NULL,
    status text NOT NULL,
    created_at double precision NOT NULL,
    next_attempt_at double precision,
    retries integer,
    timeout double precision,
    errback text,
    callback text,
    kind text NOT NULL,
    topic text,
    event_id text,
    parent_id text,
    idempotency_key text,
    retry_from integer NOT NULL DEFAULT 0,
    claimed_until double precision,
    claim_token text,
    deferred text,
    finished_at double precision,
    due_at double precision GENERATED ALWAYS AS (
        CASE status
            WHEN '{SCHEDULED}' THEN COALESCE(next_attempt_at, 0)
            WHEN '{DELIVERING}' THEN claimed_until
        END
    ) STORED
);
CREATE INDEX deliveries_due ON deliveries (due_at, id) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_status_id ON deliveries (status, id);
CREATE INDEX deliveries_finished ON deliveries (finished_at)
    WHERE finished_at IS NOT NULL AND status IN ('{DELIVERED}', '{FAILED}');
CREATE INDEX deliveries_paused ON deliveries (next_attempt_at)
    WHERE deferred = '{HOST_PAUSED}' AND status = '{SCHEDULED}';
CREATE INDEX deliveries_queued_notifications ON deliveries (topic, url)
    WHERE kind = '{KIND_WEBSUB}' AND status = '{SCHEDULED}';

CREATE TABLE attempts (
    delivery_id text NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    seq integer NOT NULL,
    at double precision NOT NULL,
    status_code integer,
    error text,
    duration_ms integer NOT NULL,
    PRIMARY KEY (delivery_id, seq)
);

CREATE TABLE events (
    id text PRIMARY KEY,
    topic text NOT NULL,
    body bytea NOT NULL,
    content_type text,
    headers text NOT NULL,
    created_at double precision NOT NULL,
    idempotency_key text
);
CREATE INDEX events_topic_id ON events (topic, id);
CREATE INDEX events_topic_created ON events (topic, created_at);
CREATE INDEX events_created ON events (created_at);

CREATE TABLE subscriptions (
    topic text NOT NULL,
    callback text NOT NULL,
    secret text,
    lease_seconds integer NOT NULL,
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    hub_url text,
    PRIMARY KEY (topic, callback)
);
CREATE INDEX subscriptions_expiry ON subscriptions (expires_at);

CREATE TABLE idempotency_keys (
    key text NOT NULL,
    id text NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (key, created_at, id)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
""",
    # Streams across nodes: each event gets its topic's next sequence number
    # in commit order (the topic's row in topic_sequences is locked by the
    # inserting transaction until it commits), so "seq > cursor" never skips
    # an event that committed late.
    1: """
CREATE TABLE topic_sequences (
    topic text PRIMARY KEY,
    last_seq bigint NOT NULL
);
ALTER TABLE events ADD COLUMN seq bigint;
CREATE UNIQUE INDEX events_topic_seq ON events (topic, seq);
""",
}


def current_version(cursor: Any) -> Optional[int]:
    """The database's schema version, or None when Hookah never ran on it."""
    cursor.execute("SELECT to_regclass('hookah_schema') IS NOT NULL")
    (exists,) = cursor.fetchone()
    if not exists:
        return None
    cursor.execute("SELECT version FROM hookah_schema")
    row = cursor.fetchone()
    return None if row is None else int(row[0])


def upgrade(connection: Any) -> int:
    """
    Bring the database to ``SCHEMA_VERSION`` in one transaction, under the
    migration lock. Returns how many migrations ran (0: already current).
    """
    with connection.transaction():
        cursor = connection.cursor()
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        version = current_version(cursor)
        if version is None:
            cursor.execute("CREATE TABLE hookah_schema (version integer NOT NULL)")
            cursor.execute("INSERT INTO hookah_schema (version) VALUES (0)")
            version = 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this Hookah's {SCHEMA_VERSION}"
            )
        for step in range(version, SCHEMA_VERSION):
            cursor.execute(MIGRATIONS[step])
        cursor.execute("UPDATE hookah_schema SET version = %s", (SCHEMA_VERSION,))
        return SCHEMA_VERSION - version
