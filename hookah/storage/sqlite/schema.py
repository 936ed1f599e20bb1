"""
The SQLite schema of Hookah's store: its tables, its version and the
migrations that reach it, and the statements worth naming.

The file records its schema version in ``PRAGMA user_version``; ``upgrade``
runs each missing migration in a transaction of its own, so an interrupted
upgrade resumes where it stopped. The named statements are the ones whose
query plans matter (``tests/test_store_sqlite.py`` checks that each is an
index search, never a scan) or that more than one operation runs.
"""

from __future__ import annotations

import sqlite3
from typing import Dict

from hookah.storage.records import DELIVERY_COLUMNS
from hookah.model import DELIVERED, FAILED, HOST_PAUSED, KIND_WEBSUB, SCHEDULED

SCHEMA_VERSION = 5

# Schema migrations by the version they upgrade from. A fresh file runs them
# all; a file written by a newer Hookah is refused rather than misread.
MIGRATIONS: Dict[int, str] = {
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
    # Idempotency keys in a table of their own, forgotten by age only: the
    # events that carried them are trimmed by count, the deliveries purged
    # by retention, both possibly well inside --idempotency-window. The
    # keys of the records still stored are copied over; the indexes that
    # looked keys up in those tables go.
    2: """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT NOT NULL,
    id TEXT NOT NULL,               -- the delivery or event created with it
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS idempotency_keys_key
    ON idempotency_keys (key, created_at, id);
CREATE INDEX IF NOT EXISTS idempotency_keys_created
    ON idempotency_keys (created_at);
INSERT OR IGNORE INTO idempotency_keys (key, id, created_at)
    SELECT idempotency_key, id, created_at FROM deliveries
    WHERE idempotency_key IS NOT NULL;
INSERT OR IGNORE INTO idempotency_keys (key, id, created_at)
    SELECT idempotency_key, id, created_at FROM events
    WHERE idempotency_key IS NOT NULL;
DROP INDEX IF EXISTS deliveries_idempotency;
DROP INDEX IF EXISTS events_idempotency;
""",
    # Why a delivery was pushed back by its host rather than its schedule:
    # start-up makes what a host pause held due at once, found through a
    # partial index (only rows a pause holds are in it).
    3: f"""
ALTER TABLE deliveries ADD COLUMN deferred TEXT;
CREATE INDEX IF NOT EXISTS deliveries_paused
    ON deliveries (next_attempt_at)
    WHERE deferred = '{HOST_PAUSED}' AND status = '{SCHEDULED}';
""",
    # Claim tokens: an outcome is written only by the holder of the claim.
    4: """
ALTER TABLE deliveries ADD COLUMN claim_token TEXT;
""",
}


def upgrade(connection: sqlite3.Connection, path: str) -> None:
    """Bring the file at ``path`` to ``SCHEMA_VERSION``, one step at a time."""
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"{path}: schema version {version} is newer than"
            f" this Hookah's {SCHEMA_VERSION}"
        )
    for step in range(version, SCHEMA_VERSION):
        connection.executescript(
            f"BEGIN IMMEDIATE; {MIGRATIONS[step]};"
            f" PRAGMA user_version = {step + 1}; COMMIT;"
        )


EVENT_COLUMNS = "id, topic, body, content_type, headers, created_at, idempotency_key"
SUBSCRIPTION_COLUMNS = "topic, callback, secret, lease_seconds, created_at, expires_at, hub_url"

# When a scheduled delivery without next_attempt_at is due.
UNTIMED = 0.0

# The statements the dispatcher runs per delivery; each must be an index
# search, never a scan (tests/test_store_sqlite.py checks their plans).
# A scheduled delivery without next_attempt_at is due at once (as if at 0),
# as the dispatcher treats it. It gets its own query: folding "IS NULL OR
# <= ?" into one would make SQLite walk every scheduled row when fewer than
# ``limit`` are due.
CLAIM_SCHEDULED = (
    f"SELECT {DELIVERY_COLUMNS} FROM deliveries"
    " WHERE status = ? AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at, id LIMIT ?"
)
CLAIM_UNTIMED = (
    f"SELECT {DELIVERY_COLUMNS} FROM deliveries"
    " WHERE status = ? AND next_attempt_at IS NULL"
    " ORDER BY id LIMIT ?"
)
CLAIM_EXPIRED = (
    f"SELECT {DELIVERY_COLUMNS} FROM deliveries"
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
FIND_IDEMPOTENCY_KEY = (
    "SELECT id FROM idempotency_keys WHERE key = ? AND created_at >= ?"
    " ORDER BY created_at, id LIMIT 1"
)
# OR IGNORE: the same record stored again (a purged delivery's id reused)
# keeps its one row.
REMEMBER_IDEMPOTENCY_KEY = (
    "INSERT OR IGNORE INTO idempotency_keys (key, id, created_at) VALUES (?, ?, ?)"
)
RELEASE_CLAIMS = (
    "UPDATE deliveries SET status = ?, claimed_until = NULL, claim_token = NULL"
    " WHERE status = ?"
)
# Start-up: what only a host pause held is due at once. The row keeps its
# mark, so the dispatcher probes the host before sending the rest.
RELEASE_PAUSED = (
    "UPDATE deliveries INDEXED BY deliveries_paused SET next_attempt_at = ?"
    f" WHERE deferred = '{HOST_PAUSED}' AND status = '{SCHEDULED}' AND next_attempt_at > ?"
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
    " claimed_until = NULL, claim_token = NULL, finished_at = ? WHERE id = ?"
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
PURGE_IDEMPOTENCY_KEYS = (
    "DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys"
    " INDEXED BY idempotency_keys_created WHERE created_at < ? ORDER BY created_at LIMIT ?)"
)
EXPIRED_SUBSCRIPTIONS = "SELECT topic, callback FROM subscriptions WHERE expires_at <= ?"
ACTIVE_SUBSCRIPTIONS = (
    f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions"
    " WHERE topic = ? AND expires_at > ? ORDER BY callback"
)
