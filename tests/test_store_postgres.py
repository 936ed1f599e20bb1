"""
``PostgresStore``: the ``IStore`` contract, plus what only a store shared by
several nodes promises (the database's clock, NOTIFY, the reaper, schema
versions, outages).

Each test gets a fresh database on the throwaway cluster of
``tests/pgsupport.py``; these run on the real reactor, since the store's
threads report back through it.
"""

from __future__ import annotations

import io
import json
import re
import time
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Generator, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from hookah.ids import IdGenerator
from hookah.model import DELIVERED, SCHEDULED, Attempt, Delivery, Event
from hookah.storage.interface import ClaimLost, ISharedStore, StorageUnavailable
from hookah.storage.postgres.schema import REAPER_LOCK, SCHEMA_VERSION
from hookah.storage.postgres.store import PostgresStore
from tests import pgsupport
from tests.pgsupport import fresh_database
from tests.storecontract import T0, StoreContractMixin
from tests.support import poll, temp_dir

_Gen = Generator[Deferred[Any], Any, None]


class PostgresStoreContractTests(StoreContractMixin, TestCase):
    def make_store(self) -> PostgresStore:
        # The contract passes its own times; production uses the database's.
        return PostgresStore(fresh_database(self), reactor, clock="caller", listen=False, reap_interval=0)


class PostgresStoreTests(TestCase):
    """What only a store that several nodes share does."""

    def setUp(self) -> None:
        self.url = fresh_database(self)
        self.newId = IdGenerator(lambda: T0)

    @inlineCallbacks
    def openStore(self, **options: Any) -> Generator[Deferred[Any], Any, PostgresStore]:
        store = PostgresStore(self.url, reactor, **options)
        yield store.open()
        self.addCleanup(store.close)
        return store

    def delivery(self, **fields: Any) -> Delivery:
        fields.setdefault("id", self.newId())
        fields.setdefault("url", "https://example.com/")
        fields.setdefault("body", b"x")
        fields.setdefault("created_at", T0)
        return Delivery(**fields)

    @inlineCallbacks
    def test_provides_ishared_store(self) -> _Gen:
        store = yield self.openStore(listen=False)
        self.assertTrue(verifyObject(ISharedStore, store))

    @inlineCallbacks
    def test_claims_use_the_database_clock(self) -> _Gen:
        store = yield self.openStore(listen=False)
        now = time.time()
        due = self.delivery(next_attempt_at=now - 5)
        later = self.delivery(next_attempt_at=now + 3600)
        yield store.add_deliveries([due, later])
        # The caller's clock says 2023 (nothing due yet) and then the far
        # future (everything due): the database's clock decides both times.
        (claimed,) = yield store.claim_due(T0, 10, T0 + 60)
        self.assertEqual(claimed.id, due.id)
        # The lease is 60 s from the database's now, not from the caller's.
        self.assertGreater(claimed.claimed_until, now + 30)
        self.assertLess(claimed.claimed_until, now + 3600)
        self.assertEqual((yield store.claim_due(1e12, 10, 1e12 + 60)), [])
        self.assertGreater((yield store.next_due()), now)

    @inlineCallbacks
    def test_a_claim_reads_only_rows_due_not_the_whole_backlog(self) -> _Gen:
        # The claim loop runs once per free slot under load: a claim that
        # read every waiting row (its "now" a volatile clock_timestamp(),
        # so no bound for the due index) cost ~4 ms with 4,000 rows waiting
        # and held one node to a third of its delivery rate. auto_explain
        # logs the plan of each statement the store runs on this database.
        pg = pgsupport.cluster()
        for setting in (
            "session_preload_libraries = 'auto_explain'", "auto_explain.log_min_duration = 0",
            "auto_explain.log_analyze = on", "auto_explain.log_format = json",
        ):
            pg.admin(f"ALTER DATABASE {self._name()} SET {setting}")
        store = yield self.openStore(listen=False, reap_interval=0)
        now = time.time()
        due = self.delivery(next_attempt_at=now - 5)
        yield store.add_deliveries([due] + [self.delivery(next_attempt_at=now + 3600) for _ in range(2000)])
        pg.admin("ANALYZE deliveries", self._name())  # as autovacuum would have
        with open(pg.log_path) as f:
            f.seek(0, io.SEEK_END)
            (claimed,) = yield store.claim_due(now, 100, now + 60)
            log = f.read()
        self.assertEqual(claimed.id, due.id)
        plans = []
        decoder = json.JSONDecoder()
        for start in (m.end() for m in re.finditer(r"plan:\s*", log)):
            plan, _ = decoder.raw_decode(log, start)
            if "SKIP LOCKED" in plan["Query Text"]:
                plans.append(plan["Plan"])
        self.assertEqual(len(plans), 1, log)

        def scans(node: Any, in_due: bool = False) -> List[Any]:
            in_due = in_due or node.get("Subplan Name") == "CTE due"
            found = [node] if in_due and node.get("Relation Name") == "deliveries" else []
            for child in node.get("Plans", []):
                found.extend(scans(child, in_due))
            return found

        # Finding the due rows reads the due row (and no waiting one).
        (scan,) = scans(plans[0])
        self.assertLessEqual(scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0), 1, plans[0])

    @inlineCallbacks
    def test_two_nodes_claiming_at_once_never_share_a_delivery(self) -> _Gen:
        a = yield self.openStore(listen=False)
        b = yield self.openStore(listen=False)
        deliveries = [self.delivery(next_attempt_at=0.0) for _ in range(200)]
        yield a.add_deliveries(deliveries)
        rounds = []
        for _ in range(5):
            rounds.extend([a.claim_due(0, 25, 60), b.claim_due(0, 25, 60)])
        results = yield gatherResults(rounds)
        ids = [d.id for batch in results for d in batch]
        self.assertTrue(all(len(batch) <= 25 for batch in results))
        self.assertEqual(len(ids), 200)
        self.assertEqual(sorted(set(ids)), sorted(d.id for d in deliveries))

    @inlineCallbacks
    def test_reaper_returns_expired_claims_on_one_node_at_a_time(self) -> _Gen:
        store = yield self.openStore(listen=False, reap_interval=0)
        d = self.delivery(next_attempt_at=0.0)
        yield store.add_deliveries([d])
        # A lease of -1 s: it ran out as soon as it was taken.
        (claimed,) = yield store.claim_due(100.0, 10, 99.0)
        holder = pgsupport.cluster().url(self._name())
        import psycopg

        with psycopg.connect(holder, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (REAPER_LOCK,))
            self.assertEqual((yield store.reap_expired_claims()), 0)
            other.execute("SELECT pg_advisory_unlock(%s)", (REAPER_LOCK,))
        self.assertEqual((yield store.reap_expired_claims()), 1)
        got = yield store.get_delivery(d.id)
        self.assertEqual((got.status, got.claim_token, got.claimed_until), (SCHEDULED, None, None))
        yield self.assertFailure(
            store.finish_attempt(d.id, Attempt(at=T0), DELIVERED, None, claim_token=claimed.claim_token),
            ClaimLost,
        )

    @inlineCallbacks
    def test_other_nodes_hear_of_new_work_and_events(self) -> _Gen:
        a = yield self.openStore(notify_interval=0.05)
        b = yield self.openStore()
        yield ensureDeferred(poll("both listening", lambda: a.listener.backend_pid and b.listener.backend_pid))
        woken: Deferred = Deferred()
        b.work_listeners.append(lambda: woken.called or woken.callback(None))
        topics: Deferred = Deferred()
        b.event_listeners.append(lambda topic, seq: topics.called or topics.callback(topic))
        a_woken: List[int] = []
        a.work_listeners.append(lambda: a_woken.append(1))
        yield a.add_deliveries([self.delivery(next_attempt_at=0.0)])
        yield woken.addTimeout(10, reactor)
        yield a.add_event(Event(id=self.newId(), topic="news", body=b"e"), [], 100, None)
        self.assertEqual((yield topics.addTimeout(10, reactor)), "news")
        # A node ignores its own announcements.
        self.assertEqual(a_woken, [])

    @inlineCallbacks
    def test_a_dropped_listening_connection_comes_back_and_catches_up(self) -> _Gen:
        store = yield self.openStore()
        pid = yield ensureDeferred(poll("listening", lambda: store.listener.backend_pid))
        caught_up: Deferred = Deferred()
        store.work_listeners.append(lambda: caught_up.called or caught_up.callback(None))
        pgsupport.cluster().admin(f"SELECT pg_terminate_backend({pid})")
        yield caught_up.addTimeout(15, reactor)
        new_pid = yield ensureDeferred(poll("listening again", lambda: store.listener.backend_pid))
        self.assertNotEqual(new_pid, pid)
        self.assertEqual(store.listener.connections, 2)

    @inlineCallbacks
    def test_nodes_starting_together_migrate_once(self) -> _Gen:
        stores = [PostgresStore(self.url, reactor, listen=False, reap_interval=0) for _ in range(3)]
        for store in stores:
            self.addCleanup(store.close)
        yield gatherResults([store.open() for store in stores])
        rows = pgsupport.cluster().admin("SELECT version FROM hookah_schema", self._name())
        self.assertEqual(rows, [(SCHEMA_VERSION,)])

    def _name(self) -> str:
        return self.url.split("/")[3].split("?")[0]

    @inlineCallbacks
    def test_a_newer_schema_is_refused(self) -> _Gen:
        store = yield self.openStore(listen=False)
        yield store.close()
        pgsupport.cluster().admin(f"UPDATE hookah_schema SET version = {SCHEMA_VERSION + 1}", self._name())
        failure = yield self.assertFailure(PostgresStore(self.url, reactor).open(), RuntimeError)
        self.assertIn("newer", str(failure))

    @inlineCallbacks
    def test_unreachable_database_is_storage_unavailable(self) -> _Gen:
        missing = temp_dir(self)
        store = PostgresStore(f"postgresql://nobody@/hookah?host={missing}", reactor, connect_timeout=1)
        yield self.assertFailure(store.open(), StorageUnavailable)


class MigrateCommandTests(TestCase):
    def test_hookah_migrate_upgrades_once(self) -> None:
        from hookah.cli.main import main

        url = fresh_database(self)
        output = io.StringIO()
        with redirect_stdout(output):
            self.assertEqual(main(["migrate", "--storage", url]), 0)
            self.assertEqual(main(["migrate", "--storage", url]), 0)
        self.assertEqual(
            output.getvalue().splitlines(),
            [f"schema version {SCHEMA_VERSION}: {SCHEMA_VERSION} migration(s) applied",
             f"schema version {SCHEMA_VERSION}: up to date"],
        )
        name = url.split("/")[3].split("?")[0]
        self.assertEqual(pgsupport.cluster().admin("SELECT version FROM hookah_schema", name), [(SCHEMA_VERSION,)])

    def test_hookah_migrate_names_an_unreachable_database(self) -> None:
        from hookah.cli.main import main

        errors = io.StringIO()
        with redirect_stderr(errors):
            code = main(["migrate", "--storage", f"postgresql://nobody@/x?host={temp_dir(self)}"])
        self.assertEqual(code, 1)
        self.assertIn("hookah: migrate: ", errors.getvalue())
        self.assertEqual(len(errors.getvalue().strip().splitlines()), 1)
