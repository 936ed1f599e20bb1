"""
Statuses, kinds and verdicts are enums in the code and the same text as
before everywhere else: JSON, query strings, metric labels, log lines and
the SQLite rows (which existing databases already hold).
"""

from __future__ import annotations

import json
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hookah.delivery.hosts import Verdict
from hookah.delivery.waiting import WaitReason
from hookah.metrics import Metrics
from hookah.model import (
    FAILED,
    HOST_BUSY,
    KIND_WEBSUB,
    SCHEDULED,
    STATUSES,
    Deferral,
    Delivery,
    DeliveryKind,
    DeliveryStatus,
)
from hookah.storage.memory import MemoryStore
from hookah.storage.sqlite.store import SQLiteStore
from hookah.websub.subscriptions import Mode, Outcome, SubscriptionRequest
from tests.support import http_client, start_hookah, temp_dir


class TextEnumTests(SynchronousTestCase):
    def test_members_are_their_text(self) -> None:
        self.assertEqual([str(s) for s in STATUSES], ["scheduled", "delivering", "delivered", "failed"])
        for member in (FAILED, KIND_WEBSUB, Mode.UNSUBSCRIBE, Outcome.UNREACHABLE, Verdict.DEFER, HOST_BUSY, WaitReason.HOST_PAUSED):
            self.assertEqual(str(member), member.value)
            self.assertEqual(f"{member}", member.value)
            self.assertEqual(f"[{member:>12}]", f"[{member.value:>12}]")
            self.assertEqual(" ".join([member]), member.value)
            self.assertEqual(json.dumps(member), json.dumps(member.value))
            self.assertEqual(member, member.value)
            self.assertEqual(hash(member), hash(member.value))

    def test_records_hold_members_whatever_they_are_given(self) -> None:
        delivery = Delivery("D", "http://h.example/", b"", status="failed", kind="websub", deferred="host_paused")  # type: ignore[arg-type]
        self.assertIs(delivery.status, DeliveryStatus.FAILED)
        self.assertIs(delivery.deferred, Deferral.HOST_PAUSED)
        self.assertIsNone(Delivery("D", "http://h.example/", b"").deferred)
        self.assertIs(delivery.kind, DeliveryKind.WEBSUB)
        self.assertEqual(json.dumps(delivery.to_json())[:60], '{"id": "D", "url": "http://h.example/", "status": "failed", ')
        request = SubscriptionRequest("subscribe", "http://t.example/", "http://c.example/")  # type: ignore[arg-type]
        self.assertIs(request.mode, Mode.SUBSCRIBE)
        self.assertRaises(ValueError, Delivery, "D", "u", b"", status="lost")

    def test_metric_labels_are_the_text(self) -> None:
        metrics = Metrics()
        metrics.deliveries.labels(FAILED).inc()
        metrics.verifications.labels(Mode.DENIED, Outcome.SENT).inc()
        text = metrics.render().decode()
        self.assertIn('hookah_deliveries_finished_total{outcome="failed"} 1.0', text)
        self.assertIn('mode="denied",outcome="sent"', text)

    def test_memory_store_counts_by_member(self) -> None:
        store = MemoryStore(Clock())
        self.successResultOf(store.add_deliveries([Delivery("D", "http://h.example/", b"")]))
        counts = self.successResultOf(store.count_deliveries())
        self.assertEqual(counts[SCHEDULED], 1)
        self.assertEqual(counts["scheduled"], 1)


class SQLiteRepresentationTests(TestCase):
    def test_rows_hold_plain_text_and_read_back_as_members(self) -> None:
        path = temp_dir(self) + "/hookah.db"

        async def go() -> None:
            store = SQLiteStore(path, reactor)
            await store.open()
            try:
                await store.add_deliveries([Delivery("D", "http://h.example/", b"", kind=KIND_WEBSUB, topic="t", deferred=HOST_BUSY)])
                delivery = await store.get_delivery("D")
                self.assertIs(delivery.deferred, Deferral.HOST_BUSY)
                self.assertIs(delivery.status, DeliveryStatus.SCHEDULED)
                self.assertIs(delivery.kind, DeliveryKind.WEBSUB)
                [page] = await store.list_deliveries(SCHEDULED, 10, None)
                self.assertIs(page.status, DeliveryStatus.SCHEDULED)
                self.assertEqual((await store.count_deliveries())[SCHEDULED], 1)
            finally:
                await store.close()
            db = sqlite3.connect(path)
            try:
                row = db.execute("SELECT status, typeof(status), kind, typeof(kind), deferred, typeof(deferred) FROM deliveries").fetchone()
            finally:
                db.close()
            self.assertEqual(row, ("scheduled", "text", "websub", "text", "host_busy", "text"))

        return ensureDeferred(go())


class HTTPRepresentationTests(TestCase):
    def test_status_filter_and_answers_are_the_contracts_text(self) -> None:
        async def go() -> None:
            _, base = await start_hookah(self)
            client = http_client(self)
            response = await client.post(f"{base}/dispatch?_url=http://127.0.0.1:9/&_delay=3600", data=b"{}")
            self.assertEqual(await response.json(), {"id": (await response.json())["id"], "status": "scheduled"})
            listed = await (await client.get(f"{base}/dispatch?status=scheduled")).json()
            self.assertEqual([d["status"] for d in listed["deliveries"]], ["scheduled"])
            self.assertEqual([d["kind"] for d in listed["deliveries"]], ["dispatch"])
            refused = await client.get(f"{base}/dispatch?status=lost")
            self.assertEqual(refused.code, 400)
            self.assertIn("scheduled, delivering, delivered, failed", (await refused.json())["message"])

        return ensureDeferred(go())
