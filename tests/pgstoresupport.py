"""
The fixture the PostgreSQL store's own suites share: a fresh database of the
throwaway cluster per test, a ``PostgresStore`` opened on it (closed at the
test's end), deliveries to add, and SQL run as the cluster's admin to look
at what the database holds.
"""

from __future__ import annotations

from typing import Any, Generator, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from hookah.ids import IdGenerator
from hookah.model import Delivery
from hookah.storage.postgres.store import PostgresStore
from tests import pgsupport
from tests.storecontract import T0


class PostgresStoreCase(TestCase):
    def setUp(self) -> None:
        self.url = pgsupport.fresh_database(self)
        self.newId = IdGenerator(lambda: T0)

    @inlineCallbacks
    def openStore(self, **options: Any) -> Generator[Deferred[Any], Any, PostgresStore]:
        options.setdefault("clock", "caller")
        options.setdefault("listen", False)
        options.setdefault("reap_interval", 0)
        store = PostgresStore(self.url, options.pop("reactor", reactor), **options)
        yield store.open()
        self.addCleanup(store.close)
        return store

    def delivery(self, **fields: Any) -> Delivery:
        fields.setdefault("id", self.newId())
        fields.setdefault("url", "https://example.com/")
        fields.setdefault("body", b"x")
        fields.setdefault("created_at", T0)
        fields.setdefault("next_attempt_at", T0)
        return Delivery(**fields)

    def admin(self, sql: str) -> List[Any]:
        """``sql``'s rows, run by the cluster's admin in this test's database."""
        return list(pgsupport.cluster().admin(sql, self.url.split("/")[3].split("?")[0]))
