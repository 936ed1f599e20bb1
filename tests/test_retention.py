"""
``RetentionService`` on a ``Clock``: what it deletes, when, in batches, and
how it stops; plus the ``--retention`` setting and its wiring.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hookah.config import Config, ConfigError, build_config
from hookah.ids import IdGenerator
from hookah.model import DELIVERED, FAILED, SCHEDULED, Attempt, Delivery, Event
from hookah.delivery.retention import RetentionService
from hookah.storage.interface import StorageUnavailable
from hookah.storage.memory import MemoryStore
from tests.support import http_client, start_hookah, temp_dir

T0 = 1_700_000_000.0
DAY = 86400.0


class CountingStore(MemoryStore):
    """A ``MemoryStore`` that records the retention calls made to it."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.calls: List[Tuple[str, float, int]] = []

    def purge_finished(self, before: float, limit: int = 10_000) -> Deferred:
        self.calls.append(("purge_finished", before, limit))
        return super().purge_finished(before, limit)

    def trim_events(self, before: float, limit: int = 10_000) -> Deferred:
        self.calls.append(("trim_events", before, limit))
        return super().trim_events(before, limit)

    def purge_idempotency_keys(self, before: float, limit: int = 10_000) -> Deferred:
        self.calls.append(("purge_idempotency_keys", before, limit))
        return super().purge_idempotency_keys(before, limit)


class RetentionServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = CountingStore(self.clock)
        self.new_id = IdGenerator(self.clock.seconds)
        self.service = RetentionService(self.store, self.clock, retention=7 * DAY, history_age=2 * DAY,
                                        idempotency_window=3 * DAY, interval=60, batch=2)

    def start(self) -> None:
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def finished(self, at: float, status: str = DELIVERED) -> Delivery:
        delivery = Delivery(id=self.new_id(), url="https://example.com/", body=b"x" * 100, status=status,
                            created_at=at - 10, attempts=(Attempt(at, 200 if status == DELIVERED else 500),))
        self.successResultOf(self.store.add_deliveries([delivery]))
        return delivery

    def exists(self, delivery: Delivery) -> bool:
        return self.successResultOf(self.store.get_delivery(delivery.id)) is not None

    def test_deletes_old_finished_deliveries_in_batches(self) -> None:
        old = [self.finished(T0 - 8 * DAY, status) for status in (DELIVERED, FAILED, DELIVERED, FAILED, DELIVERED)]
        young = self.finished(T0 - 6 * DAY)
        almost = self.finished(T0 - 7 * DAY + 30)
        waiting = Delivery(id=self.new_id(), url="https://example.com/", body=b"x", status=SCHEDULED,
                           created_at=T0 - 30 * DAY, next_attempt_at=T0 + 3600)
        self.successResultOf(self.store.add_deliveries([waiting]))
        self.start()
        self.assertEqual([self.exists(d) for d in old], [False] * 5)
        self.assertTrue(self.exists(young) and self.exists(almost) and self.exists(waiting))
        # Full batches are followed at once by another, until one is not full.
        purges = [c for c in self.store.calls if c[0] == "purge_finished"]
        self.assertEqual(purges, [("purge_finished", T0 - 7 * DAY, 2)] * 3)
        self.clock.advance(59)
        self.assertTrue(self.exists(almost))
        self.clock.advance(1)
        self.assertFalse(self.exists(almost))
        self.assertTrue(self.exists(young) and self.exists(waiting))

    def test_trims_events_of_every_topic(self) -> None:
        events = [Event(self.new_id(), topic, b"e", created_at=T0 - age * DAY)
                  for topic, age in (("quiet", 3), ("quiet", 1), ("other", 5), ("other", 2.5))]
        for event in events:
            self.successResultOf(self.store.add_event(event, [], 1000, 0.0))
        self.start()
        remaining = self.successResultOf(self.store.events_after(["quiet", "other"], None, 100))
        self.assertEqual(remaining, [events[1]])
        self.assertIn(("trim_events", T0 - 2 * DAY, 2), self.store.calls)

    def test_idempotency_keys_kept_for_the_window_whatever_happens_to_their_records(self) -> None:
        """Retention and history trims forget no key; the window alone does."""
        keyed = [
            Delivery(id=self.new_id(), url="https://example.com/", body=b"x", status=DELIVERED,
                     created_at=T0 - age * DAY, idempotency_key=f"k{age}",
                     attempts=(Attempt(T0 - age * DAY, 200),))
            for age in (8, 4, 2.5)
        ]
        self.successResultOf(self.store.add_deliveries(keyed))
        event = Event(self.new_id(), "news", b"e", created_at=T0 - 2.5 * DAY, idempotency_key="event")
        self.successResultOf(self.store.add_event(event, [], 1000, 0.0))
        late = Event(self.new_id(), "news", b"e", created_at=T0 - 3 * DAY + 30, idempotency_key="late")
        self.successResultOf(self.store.add_event(late, [], 1000, 0.0))
        self.start()

        def key(name: str) -> Any:
            return self.successResultOf(self.store.find_idempotency_key(name, None))

        # The 8-day-old delivery is gone and so is its key (past 3 days);
        # the 4-day-old one's key too, though its delivery is kept (7 days).
        self.assertFalse(self.exists(keyed[0]))
        self.assertTrue(self.exists(keyed[1]))
        self.assertEqual([key("k8"), key("k4")], [None, None])
        # Inside the window: kept, although the events left the history (2 days).
        self.assertEqual(self.successResultOf(self.store.events_after(["news"], None, 10)), [])
        self.assertEqual((key("k2.5"), key("event"), key("late")), (keyed[2].id, event.id, late.id))
        self.assertIn(("purge_idempotency_keys", T0 - 3 * DAY, 2), self.store.calls)
        self.clock.advance(60)
        self.assertIsNone(key("late"))
        self.assertEqual((key("k2.5"), key("event")), (keyed[2].id, event.id))

    def test_a_failing_pass_is_logged_and_the_loop_goes_on(self) -> None:
        old = self.finished(T0 - 8 * DAY)
        broken = [True]
        original = self.store.purge_finished

        def purge_finished(before: float, limit: int = 10_000) -> Deferred:
            if broken:
                broken.clear()
                return fail(RuntimeError("disk on fire"))
            return original(before, limit)

        self.store.purge_finished = purge_finished  # type: ignore[method-assign]
        self.start()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.exists(old))
        self.clock.advance(60)
        self.assertFalse(self.exists(old))

    def test_storage_unavailable_is_one_warning_line_and_the_loop_goes_on(self) -> None:
        old = self.finished(T0 - 8 * DAY)
        down = [True]
        original = self.store.purge_finished

        def purge_finished(before: float, limit: int = 10_000) -> Deferred:
            if down:
                return fail(StorageUnavailable("PostgreSQL: connection refused"))
            return original(before, limit)

        self.store.purge_finished = purge_finished  # type: ignore[method-assign]
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.start()
        self.clock.advance(60)
        self.assertEqual(self.flushLoggedErrors(), [])  # no traceback
        warnings = [e for e in events if "deleting old" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 2)  # one line per pass
        self.assertTrue(all(e["log_level"] == LogLevel.warn and "log_failure" not in e for e in warnings))
        self.assertIn("storage unavailable (PostgreSQL: connection refused)", formatEvent(warnings[0]))
        self.assertTrue(self.exists(old))
        down.clear()
        self.clock.advance(60)
        self.assertFalse(self.exists(old))

    def test_stop_waits_for_the_pass_in_progress(self) -> None:
        pending: Deferred = Deferred()
        calls: List[float] = []

        def purge_finished(before: float, limit: int = 10_000) -> Deferred:
            calls.append(before)
            return pending

        self.store.purge_finished = purge_finished  # type: ignore[method-assign]
        self.service.startService()
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        pending.callback(0)
        self.successResultOf(stopped)
        self.clock.advance(600)
        self.assertEqual(len(calls), 1, "no pass after stopping")

    def test_stop_when_idle(self) -> None:
        self.service.startService()
        self.successResultOf(self.service.stopService())
        self.assertIsNone(self.successResultOf(self.service.sweep()))


class RetentionSettingTests(SynchronousTestCase):
    def test_default_is_a_week(self) -> None:
        self.assertEqual(Config().retention, 604800.0)
        self.assertEqual(build_config({}, {}).retention, 604800.0)

    def test_sources(self) -> None:
        self.assertEqual(build_config({"retention": "3600"}, {}).retention, 3600.0)
        self.assertEqual(build_config({}, {"HOOKAH_RETENTION": "86400"}).retention, 86400.0)
        for bad in ("0", "-5", "soon"):
            with self.assertRaises(ConfigError) as caught:
                build_config({"retention": bad}, {})
            self.assertIn("--retention", str(caught.exception))


class RetentionWiringTests(TestCase):
    def test_service_runs_with_configured_ages(self) -> Any:
        async def go() -> None:
            service, _ = await start_hookah(self, retention=3600.0, history_age=7200.0)
            retention = service.getServiceNamed("retention")
            self.assertIs(retention, service.retention)
            self.assertTrue(retention.running)
            self.assertEqual((retention.retention, retention.history_age), (3600.0, 7200.0))
            self.assertEqual(retention.idempotency_window, 86400.0)
            service, _ = await start_hookah(self, idempotency_window=600.0)
            self.assertEqual(service.retention.idempotency_window, 600.0)

        return ensureDeferred(go())


class IdempotencyKeyLifetimeTests(TestCase):
    """The review finding: a topic event's key outlives ``--history-count``."""

    async def dispatch(self, base: str, key: Optional[str], body: bytes) -> Tuple[int, Dict[str, Any]]:
        headers = {b"Content-Type": [b"text/plain"]}
        if key is not None:
            headers[b"Idempotency-Key"] = [key.encode()]
        response = await http_client(self).post(f"{base}/dispatch?_topic=orders", data=body, headers=headers)
        return response.code, json.loads(await response.content())

    async def check(self, **config: Any) -> None:
        service, base = await start_hookah(self, history_count=1, **config)
        code, first = await self.dispatch(base, "order-42", b"1")
        self.assertEqual(code, 202, first)
        for n in range(3):
            code, _ = await self.dispatch(base, None, str(n).encode())
            self.assertEqual(code, 202)
        self.assertIsNone(await service.store.get_event(first["id"]), "the event left the history")
        code, again = await self.dispatch(base, "order-42", b"1")
        self.assertEqual((code, again["id"], again["duplicate"]), (200, first["id"], True))
        # A retention pass (the window has not passed) keeps it too.
        await service.retention.sweep()
        code, again = await self.dispatch(base, "order-42", b"1")
        self.assertEqual((code, again["id"]), (200, first["id"]))

    def test_memory(self) -> Any:
        return ensureDeferred(self.check())

    def test_sqlite(self) -> Any:
        directory = temp_dir(self, prefix="hookah-keys-")
        return ensureDeferred(self.check(storage=f"sqlite:{os.path.join(directory, 'h.db')}"))

