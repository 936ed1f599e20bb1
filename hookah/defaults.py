"""
Every default setting in one place.

``Config`` takes its defaults from here, and so do the constructors of the
parts (dispatcher, hub, publisher, core, retention, stores, the outgoing
client), so that a part built without a ``Config`` (in a test, in an
embedding program) behaves like the server, and changing a default is one
edit. The option help (``hookah.config.SETTINGS``) names these values too.
"""

from __future__ import annotations

from typing import Tuple

DAY = 86400.0

# Where the server listens and what it stores in.
PORT = 8080
STORAGE = "sqlite:hookah.db"

# The ``hookah`` command: the server it talks to, and how long it waits
# for one answer.
SERVER_URL = f"http://localhost:{PORT}"
CLIENT_TIMEOUT = 30.0

# About a day of retries in all (85,685 s, 23.8 h), dense at first, when most
# outages end, and hourly later.
RETRY_SCHEDULE: Tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)

# Seconds an outgoing request may take, its response body included: a
# delivery attempt, a WebSub verification, a topic fetch.
TIMEOUT = 30.0

# Seconds between keep-alives on an idle stream.
KEEPALIVE = 30.0

# WebSub lease seconds granted: (minimum, default when none is asked, maximum).
LEASE_BOUNDS: Tuple[int, int, int] = (60, 864000, 2592000)

# Largest request body accepted, and how far a slow stream may lag, in bytes.
MAX_BODY = 1024 * 1024
STREAM_BUFFER = 1024 * 1024

# Delivery attempts in flight at once; to one host; the circuit breaker.
CONCURRENCY = 256
HOST_CONCURRENCY = 16
# The breaker opens when a host's attempts have failed, with no success
# between them, at least BREAKER_THRESHOLD times over BREAKER_WINDOW
# seconds; it pauses the host for BREAKER_PAUSE seconds, twice as long after
# each failed probe, at most BREAKER_COOLDOWN (hookah.delivery.hosts).
BREAKER_THRESHOLD = 5
BREAKER_WINDOW = 10.0
BREAKER_PAUSE = 2.0
BREAKER_COOLDOWN = 60.0

# Topic history: events kept per topic, and for how long.
HISTORY_COUNT = 1000
HISTORY_AGE = 7 * DAY

# How long finished deliveries are kept, and idempotency keys remembered.
RETENTION = 7 * DAY
IDEMPOTENCY_WINDOW = DAY

# With several nodes on one database (postgresql:// storage): seconds a
# node's claim on a delivery lasts unless renewed (live nodes renew every
# third of it), so a dead node's deliveries are taken over this soon.
CLAIM_LEASE = 30.0

# Rows one retention call deletes at most: each batch is one short write, so
# the single SQLite writer keeps serving the requests queued in between.
PURGE_BATCH = 10_000

# Seconds the SQLite writer waits when the server is busy (writes queued
# behind the one it took, or the last commit less than this ago), so that
# more share its commit and fsync (storage/sqlite/worker.py).
SQLITE_COMMIT_DELAY = 0.0002

# Limits at the socket (hookah.web.channel): seconds a request head may
# take, bytes per second a body must average, connections carrying requests
# and open streams at most, and the listen queue for bursts.
HEAD_TIMEOUT = 10.0
MIN_BODY_RATE = 1024
MAX_CONNECTIONS = 1000
MAX_STREAMS = 10000
BACKLOG = 1024
