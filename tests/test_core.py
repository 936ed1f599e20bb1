"""
The core owns writes: it decides what a dispatch or an event stores and
writes it; the dispatcher is told what to send (``Dispatcher.intake``) and
starts it once the core's write is durable. Parts hear of each other
through the listeners they were built with.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hookah.core import DispatchRequest, HookahCore
from hookah.delivery.dispatcher import Dispatcher
from hookah.ids import IdGenerator
from hookah.model import DELIVERING, FAILED, KIND_WEBSUB, Delivery, Event
from hookah.storage.memory import MemoryStore
from tests.support import FakeClient

T0 = 1_700_000_000.0
URL = "http://a.example/hook"


class Recorder:
    """An ``IEventListener`` that notes what storage held when it was told."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.told: List[Any] = []

    def publish(self, event: Event) -> None:
        self.told.append((event.id, self.store.get_event(event.id)))


class CoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore(self.clock)
        self.client = FakeClient(self.clock, lambda sent: (500, (), b"down"))
        new_id = IdGenerator(self.clock.seconds)
        self.dispatcher = Dispatcher(self.store, self.client, self.clock, new_id, (60,), poll_interval=3600)
        self.listener = Recorder(self.store)
        self.core = HookahCore(
            self.store, self.dispatcher, self.clock, new_id,
            distribution=self.subscribers, event_listeners=[self.listener],
        )
        self.dispatcher.startService()
        self.addCleanup(self.dispatcher.stopService)

    def subscribers(self, event: Event, now: float) -> Any:
        return succeed([
            Delivery(id=f"N{i}", url=f"http://s{i}.example/", body=event.body, kind=KIND_WEBSUB, topic=event.topic,
                     event_id=event.id, created_at=now, next_attempt_at=now)
            for i in range(2)
        ])

    def request(self, **fields: Any) -> DispatchRequest:
        fields.setdefault("url", URL)
        fields.setdefault("topic", None)
        return DispatchRequest(body=b"{}", content_type="application/json", **fields)

    def test_a_dispatch_is_stored_claimed_then_sent(self) -> None:
        written: List[Any] = []
        add = self.store.add_deliveries

        def add_deliveries(deliveries: Any) -> Any:
            written.append((list(deliveries), len(self.client.sent)))
            return add(deliveries)

        self.store.add_deliveries = add_deliveries  # type: ignore[method-assign]
        self.client.answer = lambda sent: None
        accepted = self.successResultOf(self.core.dispatch(self.request(retries=0)))
        [([delivery], sent_before)] = written
        self.assertEqual((delivery.id, delivery.status, sent_before), (accepted.id, DELIVERING, 0))
        self.assertIsNotNone(delivery.claimed_until)
        [sent] = self.client.sent
        self.assertEqual(sent.url, URL)

    def test_a_failed_write_frees_the_claim_and_sends_nothing(self) -> None:
        self.store.add_deliveries = lambda deliveries: fail(OSError("disk full"))  # type: ignore[method-assign]
        self.failureResultOf(self.core.dispatch(self.request()), OSError)
        self.assertEqual((self.dispatcher.in_flight, self.client.sent), (0, []))

    def test_an_event_is_stored_with_its_notifications_before_listeners_hear_of_it(self) -> None:
        accepted = self.successResultOf(self.core.dispatch(self.request(url=None, topic="news")))
        self.assertEqual(accepted.subscribers, 2)
        [(event_id, lookup)] = self.listener.told
        self.assertEqual((event_id, self.successResultOf(lookup).id), (accepted.id, accepted.id))
        self.assertEqual(sorted(s.url for s in self.client.sent), ["http://s0.example/", "http://s1.example/"])
        self.assertEqual(self.successResultOf(self.store.get_delivery("N0")).event_id, accepted.id)

    def test_an_events_notifications_carry_the_dispatchs_options(self) -> None:
        # Each option alone is enough to apply them all to every notification.
        cases = [
            ({}, (None, None, None, None, T0)),
            ({"retries": 2}, (2, None, None, None, T0)),
            ({"timeout": 5.0}, (None, 5.0, None, None, T0)),
            ({"errback": "http://e.example/"}, (None, None, "http://e.example/", None, T0)),
            ({"callback": "http://c.example/"}, (None, None, None, "http://c.example/", T0)),
            ({"delay": 30.0}, (None, None, None, None, T0 + 30.0)),
        ]

        def subscribers(event: Event, now: float) -> Any:
            return succeed([
                Delivery(id=f"{event.id}-{i}", url=f"http://s{i}.example/", body=event.body, kind=KIND_WEBSUB,
                         topic=event.topic, event_id=event.id, created_at=now, next_attempt_at=now)
                for i in range(2)
            ])

        core = HookahCore(self.store, self.dispatcher, self.clock, IdGenerator(self.clock.seconds), distribution=subscribers)
        self.client.answer = lambda sent: None  # attempts stay out: their records keep what was stored
        self.addCleanup(self.client.fail_outstanding)
        for options, expected in cases:
            accepted = self.successResultOf(core.dispatch(self.request(url=None, topic="news", **options)))
            for n in range(2):
                stored = self.successResultOf(self.store.get_delivery(f"{accepted.id}-{n}"))
                self.assertEqual(
                    (stored.retries, stored.timeout, stored.errback, stored.callback, stored.next_attempt_at), expected, options
                )
        # The delayed one was not sent; the others were, at once.
        self.assertEqual(len(self.client.sent), 2 * 5)

    def test_a_retry_wakes_the_dispatcher_at_once(self) -> None:
        accepted = self.successResultOf(self.core.dispatch(self.request(retries=0)))
        self.assertEqual(self.successResultOf(self.core.get_delivery(accepted.id)).status, FAILED)
        self.assertIsNotNone(self.successResultOf(self.core.retry(accepted.id)))
        self.clock.advance(0)  # far less than the poll interval: only a wake-up sends it
        self.assertEqual(len(self.client.sent), 2)
