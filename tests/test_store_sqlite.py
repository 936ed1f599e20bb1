"""
``SQLiteStore``: the ``IStore`` contract, plus what only SQLite promises.

These run on the real reactor because the store's worker thread reports back
through ``callFromThread``; nothing here sleeps, every wait is on a Deferred
or on an event the worker sets.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from typing import Any, Generator, List

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

import hookah
from hookah.ids import IdGenerator
from hookah.model import DELIVERING, SCHEDULED, Attempt, Delivery, Event, Subscription
from hookah.storage.sqlite import store as sqlitemodule
from hookah.storage.sqlite.store import SQLiteStore, StoreClosed
from tests.storecontract import T0, StoreContractMixin
from tests.support import temp_dir

_Gen = Generator[Deferred[Any], Any, None]


def temporaryDatabase(case: TestCase) -> str:
    """A fresh database path, removed after the test."""
    return os.path.join(temp_dir(case, prefix="hookah-sqlite-"), "hookah.db")


class SQLiteStoreContractTests(StoreContractMixin, TestCase):
    def make_store(self) -> SQLiteStore:
        return SQLiteStore(temporaryDatabase(self), reactor)


class SQLiteStoreTests(TestCase):
    def setUp(self) -> None:
        self.path = temporaryDatabase(self)
        self.newId = IdGenerator(lambda: T0)

    @inlineCallbacks
    def openStore(self, **options: Any) -> Generator[Deferred[Any], Any, SQLiteStore]:
        store = SQLiteStore(self.path, reactor, **options)
        yield store.open()
        self.addCleanup(store.close)
        return store

    def delivery(self, **fields: Any) -> Delivery:
        fields.setdefault("id", self.newId())
        fields.setdefault("url", "https://example.com/")
        fields.setdefault("body", b"x")
        fields.setdefault("created_at", T0)
        return Delivery(**fields)

    def blockWorker(self, store: SQLiteStore) -> threading.Event:
        """Hold the worker inside a transaction until the returned event is set.

        Everything submitted meanwhile queues up and lands in one batch.
        """
        running, release = threading.Event(), threading.Event()

        def block(connection: sqlite3.Connection) -> None:
            running.set()
            release.wait(10)

        store._read(block)
        self.assertTrue(running.wait(10), "the worker never started the blocker")
        self.addCleanup(release.set)
        return release

    @inlineCallbacks
    def test_survives_close_and_reopen(self) -> _Gen:
        store = yield self.openStore()
        d = self.delivery(body=b"\x00kept\x00", attempts=(Attempt(at=T0, status_code=500),))
        e = Event(id=self.newId(), topic="news", body=b"e", created_at=T0)
        sub = Subscription(topic="news", callback="https://cb/", expires_at=T0 + 10)
        yield store.add_event(e, [d], 10, 0.0)
        yield store.put_subscription(sub)
        yield store.close()

        reopened = yield self.openStore()
        self.assertEqual((yield reopened.get_delivery(d.id)), d)
        self.assertEqual((yield reopened.get_event(e.id)), e)
        self.assertEqual((yield reopened.get_subscription("news", "https://cb/")), sub)

    @inlineCallbacks
    def test_fired_write_survives_kill_9(self) -> _Gen:
        """The 202 promise: once the Deferred fires, SIGKILL loses nothing."""
        child = textwrap.dedent(
            """
            import sys
            from twisted.internet import defer, task
            from hookah.model import Delivery
            from hookah.storage.sqlite.store import SQLiteStore

            @defer.inlineCallbacks
            def main(reactor, path):
                store = SQLiteStore(path, reactor)
                yield store.open()
                yield defer.gatherResults([
                    store.add_deliveries([Delivery(id="%04d" % i, url="u", body=b"b")])
                    for i in range(50)
                ])
                sys.stdout.write("committed\\n")
                sys.stdout.flush()
                yield defer.Deferred()  # never closes: killed here

            task.react(main, [sys.argv[1]])
            """
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(hookah.__file__)))
        process = subprocess.Popen(
            [sys.executable, "-c", child, self.path],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": root},
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.stdout.close)  # type: ignore[union-attr]
        try:
            line = process.stdout.readline()  # type: ignore[union-attr]
        finally:
            process.send_signal(signal.SIGKILL)
        self.assertEqual(line, b"committed\n")
        self.assertEqual(process.wait(), -signal.SIGKILL)

        store = yield self.openStore()
        counts = yield store.count_deliveries()
        self.assertEqual(counts[SCHEDULED], 50)

    @inlineCallbacks
    def test_close_runs_queued_operations_first(self) -> _Gen:
        store = yield self.openStore()
        ds = [self.delivery() for _ in range(20)]
        adds = [store.add_deliveries([d]) for d in ds]
        yield store.close()
        self.assertEqual([add.called for add in adds], [True] * 20)
        reopened = yield self.openStore()
        self.assertEqual(len((yield reopened.list_deliveries(None, 100, None))), 20)

    @inlineCallbacks
    def test_refuses_work_when_closed(self) -> _Gen:
        store = SQLiteStore(self.path, reactor)
        yield self.assertFailure(store.ping(), StoreClosed)
        yield store.open()
        yield store.close()
        yield self.assertFailure(store.ping(), StoreClosed)
        yield store.close()

    @inlineCallbacks
    def test_worker_thread_lifetime(self) -> _Gen:
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        thread = store._thread
        assert thread is not None
        self.assertTrue(thread.is_alive())
        self.assertIsNot(thread, threading.current_thread())
        yield store.close()
        self.assertFalse(thread.is_alive())

    @inlineCallbacks
    def test_wal_and_full_sync(self) -> _Gen:
        yield self.openStore()
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(
            connection.execute("PRAGMA user_version").fetchone()[0],
            sqlitemodule.SCHEMA_VERSION,
        )

    @inlineCallbacks
    def test_refuses_newer_schema(self) -> _Gen:
        connection = sqlite3.connect(self.path)
        connection.execute(f"PRAGMA user_version = {sqlitemodule.SCHEMA_VERSION + 1}")
        connection.close()
        store = SQLiteStore(self.path, reactor)
        yield self.assertFailure(store.open(), RuntimeError)
        yield self.assertFailure(store.ping(), StoreClosed)
        yield store.close()

    @inlineCallbacks
    def test_concurrent_writes_share_transactions(self) -> _Gen:
        store = yield self.openStore()
        before = store.transactions
        ds = [self.delivery(next_attempt_at=T0) for _ in range(200)]
        # All started before any is waited on, as concurrent requests would.
        yield gatherResults([store.add_deliveries([d]) for d in ds])
        used = store.transactions - before
        self.assertLessEqual(used, 20, f"{used} transactions for 200 writes")
        counts = yield store.count_deliveries()
        self.assertEqual(counts[SCHEDULED], 200)

    @inlineCallbacks
    def test_failing_operation_errbacks_alone(self) -> _Gen:
        store = yield self.openStore()
        existing = self.delivery()
        yield store.add_deliveries([existing])

        release = self.blockWorker(store)
        good1, good2 = self.delivery(), self.delivery()
        before = store.transactions
        results = DeferredList(
            [
                store.add_deliveries([good1]),
                store.add_deliveries([self.delivery(), existing]),
                store.add_deliveries([good2]),
            ],
            consumeErrors=True,
        )
        release.set()
        outcomes: List[Any] = yield results
        self.assertEqual([ok for ok, _ in outcomes], [True, False, True])
        outcomes[1][1].trap(sqlite3.IntegrityError)
        # The blocker's transaction, then one for all three.
        self.assertEqual(store.transactions - before, 2)
        self.assertEqual((yield store.get_delivery(good1.id)), good1)
        self.assertEqual((yield store.get_delivery(good2.id)), good2)
        self.assertEqual((yield store.get_delivery(existing.id)), existing)
        self.assertEqual(len((yield store.list_deliveries(None, 100, None))), 3)

    @inlineCallbacks
    def test_failing_single_insert_errbacks_alone(self) -> _Gen:
        # One delivery, no attempts, no key: one INSERT without a savepoint.
        store = yield self.openStore()
        existing = self.delivery()
        yield store.add_deliveries([existing])

        release = self.blockWorker(store)
        good1, good2 = self.delivery(), self.delivery()
        before = store.transactions
        results = DeferredList(
            [
                store.add_deliveries([good1]),
                store.add_deliveries([attr.evolve(existing, url="https://other.example/")]),
                store.add_deliveries([good2]),
            ],
            consumeErrors=True,
        )
        release.set()
        outcomes: List[Any] = yield results
        self.assertEqual([ok for ok, _ in outcomes], [True, False, True])
        outcomes[1][1].trap(sqlite3.IntegrityError)
        self.assertEqual(store.transactions - before, 2)
        self.assertEqual((yield store.get_delivery(good1.id)), good1)
        self.assertEqual((yield store.get_delivery(good2.id)), good2)
        self.assertEqual((yield store.get_delivery(existing.id)), existing)
        self.assertEqual(len((yield store.list_deliveries(None, 100, None))), 3)

    @inlineCallbacks
    def test_batch_limit_caps_a_transaction(self) -> _Gen:
        store = yield self.openStore(batch_limit=10)
        release = self.blockWorker(store)
        before = store.transactions
        adds = gatherResults([store.add_deliveries([self.delivery()]) for _ in range(35)])
        release.set()
        yield adds
        self.assertEqual(store.transactions - before, 1 + 4)

    @inlineCallbacks
    def test_claims_in_one_batch_do_not_overlap(self) -> _Gen:
        """Claims batched together still run one after the other."""
        store = yield self.openStore()
        yield store.add_deliveries([self.delivery(next_attempt_at=T0) for _ in range(30)])
        release = self.blockWorker(store)
        claims = gatherResults([store.claim_due(T0, 10, T0 + 60) for _ in range(4)])
        release.set()
        batches = yield claims
        ids = [d.id for batch in batches for d in batch]
        self.assertEqual([len(batch) for batch in batches], [10, 10, 10, 0])
        self.assertEqual(len(set(ids)), 30)
        self.assertTrue(all(d.status == DELIVERING for batch in batches for d in batch))

    @inlineCallbacks
    def test_dispatcher_queries_use_indexes(self) -> _Gen:
        """No statement run per delivery may scan a table."""
        yield self.openStore()
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        statements = [
            (sqlitemodule.CLAIM_SCHEDULED, (SCHEDULED, T0, 10)),
            (sqlitemodule.CLAIM_UNTIMED, (SCHEDULED, 10)),
            (sqlitemodule.CLAIM_EXPIRED, (DELIVERING, T0, 10)),
            (sqlitemodule.RELEASE_CLAIMS, (SCHEDULED, DELIVERING)),
            (sqlitemodule.RELEASE_PAUSED, (T0, T0)),
            (sqlitemodule.NEXT_SCHEDULED, (SCHEDULED,)),
            (sqlitemodule.NEXT_EXPIRY, (DELIVERING,)),
            (sqlitemodule.APPEND_ATTEMPT, ("id", "id", T0, 200, None, 1)),
            (sqlitemodule.FIND_IDEMPOTENCY_KEY, ("k", T0)),
            (sqlitemodule.PURGE_IDEMPOTENCY_KEYS, (T0, 10)),
            (sqlitemodule.TRIM_BY_COUNT, ("t", "t", 10)),
            (sqlitemodule.TRIM_BY_AGE, ("t", T0)),
            (sqlitemodule.ACTIVE_SUBSCRIPTIONS, ("t", T0)),
            (sqlitemodule.QUEUED_NOTIFICATIONS, ("t", "https://cb/")),
            (sqlitemodule.CANCEL_DELIVERY, ("failed", T0, "id")),
            (sqlitemodule.FINISHED_BEFORE, (T0, 10)),
            (sqlitemodule.DELETE_ATTEMPTS, ("id",)),
            (sqlitemodule.DELETE_DELIVERY, ("id",)),
            (sqlitemodule.TRIM_EVENTS, (T0, 10)),
            (sqlitemodule.EXPIRED_SUBSCRIPTIONS, (T0,)),
        ]
        for sql, args in statements:
            plan = " | ".join(
                row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", args)
            )
            self.assertNotIn("SCAN", plan, f"{sql}\n  plan: {plan}")


class SQLiteMigrationTests(TestCase):
    """Files written by earlier schemas (versions 1 and 2) open and keep working."""

    @inlineCallbacks
    def test_upgrade_from_version_2_keeps_idempotency_keys(self) -> _Gen:
        path = temporaryDatabase(self)
        connection = sqlite3.connect(path, isolation_level=None)
        connection.executescript(
            f"BEGIN; {sqlitemodule._MIGRATIONS[0]}; {sqlitemodule._MIGRATIONS[1]};"
            " PRAGMA user_version = 2; COMMIT;"
        )
        columns = "id, url, body, headers, status, created_at, kind, idempotency_key"
        connection.executemany(
            f"INSERT INTO deliveries ({columns}) VALUES (?, 'https://a/', x'00', '[]', 'scheduled', ?, 'dispatch', ?)",
            [("D1", T0 - 10, "order-1"), ("D2", T0 - 5, None)],
        )
        connection.execute(
            "INSERT INTO events (id, topic, body, headers, created_at, idempotency_key)"
            " VALUES ('E1', 'news', x'00', '[]', ?, 'publish-1')", (T0 - 20,)
        )
        connection.close()

        store = SQLiteStore(path, reactor)
        yield store.open()
        self.addCleanup(store.close)
        self.assertEqual((yield store.find_idempotency_key("order-1", T0 - 60)), "D1")
        self.assertEqual((yield store.find_idempotency_key("publish-1", T0 - 60)), "E1")
        # Copied keys live apart from their records: trimming the event keeps it.
        self.assertEqual((yield store.trim_events(T0, 10)), 1)
        self.assertEqual((yield store.find_idempotency_key("publish-1", T0 - 60)), "E1")
        self.assertEqual((yield store.purge_idempotency_keys(T0, 10)), 2)
        self.assertIsNone((yield store.find_idempotency_key("order-1", None)))
        check = sqlite3.connect(path)
        self.addCleanup(check.close)
        self.assertEqual(check.execute("PRAGMA user_version").fetchone()[0], sqlitemodule.SCHEMA_VERSION)
        indexes = {row[0] for row in check.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        self.assertIn("idempotency_keys_key", indexes)
        self.assertNotIn("deliveries_idempotency", indexes)
        self.assertNotIn("events_idempotency", indexes)

    @inlineCallbacks
    def test_upgrade_from_version_3_knows_no_pause(self) -> _Gen:
        """Rows written before Hookah marked pauses are plain scheduled ones."""
        path = temporaryDatabase(self)
        connection = sqlite3.connect(path, isolation_level=None)
        connection.executescript(
            "BEGIN; " + "; ".join(sqlitemodule._MIGRATIONS[step] for step in range(3))
            + "; PRAGMA user_version = 3; COMMIT;"
        )
        columns = "id, url, body, headers, status, created_at, next_attempt_at, kind"
        connection.execute(
            f"INSERT INTO deliveries ({columns}) VALUES ('D1', 'https://a/', x'00', '[]', 'scheduled', ?, ?, 'dispatch')",
            (T0, T0 + 500),
        )
        connection.close()
        store = SQLiteStore(path, reactor)
        yield store.open()
        self.addCleanup(store.close)
        got = yield store.get_delivery("D1")
        self.assertEqual((got.next_attempt_at, got.deferred), (T0 + 500, None))
        self.assertEqual((yield store.release_claims(T0)), 0)
        self.assertEqual((yield store.get_delivery("D1")).next_attempt_at, T0 + 500)
        [claimed] = yield store.claim_due(T0 + 500, 10, T0 + 600)
        yield store.reschedule("D1", T0 + 900, "host_paused")
        self.assertEqual((yield store.release_claims(T0 + 501)), 1)
        got = yield store.get_delivery("D1")
        self.assertEqual((got.next_attempt_at, got.deferred), (T0 + 501, "host_paused"))

    @inlineCallbacks
    def test_upgrade_from_version_1(self) -> _Gen:
        path = temporaryDatabase(self)
        connection = sqlite3.connect(path, isolation_level=None)
        connection.executescript(
            f"BEGIN; {sqlitemodule._MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;"
        )
        columns = "id, url, body, headers, status, created_at, kind"
        connection.executemany(
            f"INSERT INTO deliveries ({columns}) VALUES (?, ?, x'00', '[]', ?, ?, 'dispatch')",
            [("D1", "https://a/", "delivered", T0 - 1000), ("D2", "https://a/", "failed", T0 - 1000),
             ("D3", "https://a/", "scheduled", T0 - 1000)],
        )
        connection.execute(
            "INSERT INTO attempts (delivery_id, seq, at, status_code, error, duration_ms)"
            " VALUES ('D1', 0, ?, 200, NULL, 5)", (T0 - 10,)
        )
        connection.execute(
            "INSERT INTO subscriptions (topic, callback, secret, lease_seconds, created_at, expires_at)"
            " VALUES ('news', 'https://cb/', NULL, 60, ?, ?)", (T0, T0 + 60)
        )
        connection.close()

        store = SQLiteStore(path, reactor)
        yield store.open()
        self.addCleanup(store.close)
        sub = yield store.get_subscription("news", "https://cb/")
        self.assertEqual(sub, Subscription("news", "https://cb/", None, 60, T0, T0 + 60, hub_url=None))
        # Existing finished deliveries got their last activity: D2 (created
        # long ago, no attempt) goes first, D1 (attempted at T0 - 10) only later.
        self.assertEqual((yield store.purge_finished(T0 - 100, 100)), 1)
        self.assertIsNone((yield store.get_delivery("D2")))
        self.assertIsNotNone((yield store.get_delivery("D1")))
        self.assertEqual((yield store.purge_finished(T0, 100)), 1)
        self.assertEqual([d.id for d in (yield store.list_deliveries(None, 10, None))], ["D3"])
        check = sqlite3.connect(path)
        self.addCleanup(check.close)
        self.assertEqual(check.execute("PRAGMA user_version").fetchone()[0], sqlitemodule.SCHEMA_VERSION)
