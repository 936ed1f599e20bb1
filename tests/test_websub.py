"""
Unit tests of the WebSub hub's rules, without sockets: a ``Clock`` for every
timer and a scripted HTTP client that the test answers request by request.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, List, Optional

import attr
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hookah.delivery.dispatcher import Dispatcher
from hookah.websub.distributor import Distributor, hub_url, link_header, signature
from hookah.websub.publisher import Publisher
from hookah.ids import IdGenerator
from hookah.metrics import Metrics
from hookah.model import (
    CANCELLED_EXPIRED,
    CANCELLED_GONE,
    CANCELLED_UNSUBSCRIBED,
    DELIVERING,
    FAILED,
    KIND_DISPATCH,
    KIND_WEBSUB,
    SCHEDULED,
    Attempt,
    Delivery,
    Event,
    Subscription,
)
from hookah.outbound.ssrf import TargetRefused
from hookah.storage.memory import MemoryStore
from hookah.websub.subscriptions import (
    DENIED,
    REJECTED,
    HubBusy,
    UNREACHABLE,
    VERIFIED,
    SubscriptionRequest,
    TopicPolicy,
    WebSubHub,
    clamp_lease,
    decode_unreserved,
    new_challenge,
    verification_url,
)
from tests.storeflavours import LaterFlavour, MemoryFlavour, SQLiteFlavour, run_on
from tests.support import submit
from tests.websubsupport import ScriptedClient, parse_links

T0 = 1_000_000.0
TOPIC = "https://publisher.example/feed"
CALLBACK = "https://subscriber.example/cb?id=7"
BOUNDS = (60, 864000, 2592000)


def sub(mode: str = "subscribe", **fields: Any) -> SubscriptionRequest:
    fields.setdefault("topic", TOPIC)
    fields.setdefault("callback", CALLBACK)
    return SubscriptionRequest(mode=mode, **fields)


class HelperTests(SynchronousTestCase):
    def test_clamp_lease(self) -> None:
        self.assertEqual(clamp_lease(None, BOUNDS), 864000)
        self.assertEqual(clamp_lease(1, BOUNDS), 60)
        self.assertEqual(clamp_lease(3600, BOUNDS), 3600)
        self.assertEqual(clamp_lease(10**12, BOUNDS), 2592000)

    def test_decode_unreserved_only(self) -> None:
        self.assertEqual(decode_unreserved("https://a.example/%7Euser/%41b%2d%5F"), "https://a.example/~user/Ab-_")
        # Reserved characters stay escaped: /a%2Fb is not /a/b.
        self.assertEqual(decode_unreserved("https://a.example/a%2Fb?x=%26%3D"), "https://a.example/a%2Fb?x=%26%3D")
        self.assertEqual(decode_unreserved("https://a.example/%zz%4"), "https://a.example/%zz%4")

    def test_verification_url_keeps_query(self) -> None:
        params = [("hub.mode", "subscribe"), ("hub.topic", "https://t.example/?a=1&b")]
        self.assertEqual(
            verification_url("https://s.example/cb?hub.mode=mine&x=1", params),
            "https://s.example/cb?hub.mode=mine&x=1&hub.mode=subscribe&hub.topic=https%3A%2F%2Ft.example%2F%3Fa%3D1%26b",
        )
        self.assertTrue(verification_url("https://s.example/cb", params).startswith("https://s.example/cb?hub.mode="))
        self.assertTrue(verification_url("https://s.example/cb?", params).startswith("https://s.example/cb?hub.mode="))
        self.assertTrue(verification_url("https://s.example/cb#frag", params).startswith("https://s.example/cb?hub."))

    def test_challenge_alphabet_and_uniqueness(self) -> None:
        challenges = {new_challenge() for _ in range(200)}
        self.assertEqual(len(challenges), 200)
        for challenge in challenges:
            # 5.3: [#x2B] | [#2D-#x39] | [#x3D] | [#41-#x5A] | [#x5F] | [#x61-#x7A]
            self.assertRegex(challenge, r"\A[+\-./0-9=A-Z_a-z]{40,}\Z")

    def test_topic_policy(self) -> None:
        self.assertIsNone(TopicPolicy().refusal("https://anything.example/"))
        policy = TopicPolicy(["https://blog.example/feeds/", "https://news.example", "https://*.corp.example/*"])
        self.assertIsNone(policy.refusal("https://blog.example/feeds/main"))
        self.assertIsNotNone(policy.refusal("https://blog.example/private"))
        self.assertIsNone(policy.refusal("https://news.example"))
        self.assertIsNone(policy.refusal("https://news.example/today"))
        self.assertIsNotNone(policy.refusal("https://news.example.evil.test/"))
        self.assertIsNone(policy.refusal("https://a.corp.example/x"))
        self.assertIsNotNone(policy.refusal("http://a.corp.example/x"))

    def test_hub_url_rule(self) -> None:
        self.assertEqual(hub_url("https://hooks.example.com"), "https://hooks.example.com/hub")
        self.assertEqual(hub_url("https://hooks.example.com/"), "https://hooks.example.com/hub")
        self.assertEqual(hub_url("https://example.com/hookah", "http://other:1"), "https://example.com/hookah/hub")
        self.assertEqual(hub_url(None, "http://127.0.0.1:8080"), "http://127.0.0.1:8080/hub")

    def test_link_header_and_signature(self) -> None:
        self.assertEqual(
            link_header("https://h.example/hub", "https://t.example/feed?x=1"),
            '<https://h.example/hub>; rel="hub", <https://t.example/feed?x=1>; rel="self"',
        )
        # A topic name cannot break the header.
        self.assertEqual(link_header("http://h/hub", "a b>\r\nX: y"), '<http://h/hub>; rel="hub", <a%20b%3E%0D%0AX:%20y>; rel="self"')
        expected = hmac.new(b"key", b"body", hashlib.sha256).hexdigest()
        self.assertEqual(signature("key", b"body"), "sha256=" + expected)


class HubTests(MemoryFlavour, SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = self.make_clock()
        self.clock.advance(T0)
        self.store = self.make_store(self.clock)
        self.client = ScriptedClient()
        self.metrics = Metrics()
        self.hub = WebSubHub(
            self.store, self.client, self.clock, BOUNDS, TopicPolicy(), timeout=10,
            verify_retries=(5, 60), purge_interval=100, metrics=self.metrics,
        )

    def outcome(self, d: Any) -> Any:
        return self.successResultOf(d)

    def stored(self) -> Optional[Subscription]:
        return self.successResultOf(self.store.get_subscription(TOPIC, CALLBACK))

    def test_verification_request(self) -> None:
        d = self.hub.submit(sub(lease_seconds=3600, secret="s3cret"))
        call = self.client.pop()
        self.assertEqual(call.method, "GET")
        self.assertTrue(call.url.startswith(CALLBACK + "&"))
        self.assertEqual(call.query["id"], "7")
        self.assertEqual(call.query["hub.mode"], "subscribe")
        self.assertEqual(call.query["hub.topic"], TOPIC)
        self.assertEqual(call.query["hub.lease_seconds"], "3600")
        self.assertNotIn("hub.secret", call.query)
        self.assertNotIn("hub.verify_token", call.query)
        self.assertIsNone(self.stored(), "nothing changes before verification")
        self.clock.advance(2)
        call.echo()
        self.assertEqual(self.outcome(d), VERIFIED)
        self.assertEqual(
            self.stored(),
            Subscription(TOPIC, CALLBACK, "s3cret", 3600, created_at=T0, expires_at=T0 + 3600),
        )
        self.assertEqual(self.metrics.verifications.labels("subscribe", VERIFIED)._value.get(), 1)

    def test_lease_is_clamped(self) -> None:
        for asked, granted in ((1, 60), (None, 864000), (10**9, 2592000)):
            d = self.hub.submit(sub(lease_seconds=asked))
            call = self.client.pop()
            self.assertEqual(call.query["hub.lease_seconds"], str(granted))
            call.echo()
            self.outcome(d)
            stored = self.stored()
            assert stored is not None
            self.assertEqual((stored.lease_seconds, stored.expires_at), (granted, T0 + granted))

    def test_verify_token_echoed(self) -> None:
        self.hub.submit(sub(verify_token="tok en"))
        self.assertEqual(self.client.pop().query["hub.verify_token"], "tok en")

    def test_wrong_challenge_or_refusal_changes_nothing_and_is_not_retried(self) -> None:
        for answer in ((200, b"not the challenge"), (404, b""), (302, b""), (200, b"")):
            d = self.hub.submit(sub())
            call = self.client.pop()
            call.answer(*answer)
            self.assertEqual(self.outcome(d), REJECTED)
            self.clock.advance(1000)
            self.assertEqual(self.client.calls, [])
            self.assertIsNone(self.stored())

    def test_challenge_echo_must_be_exact(self) -> None:
        d = self.hub.submit(sub())
        call = self.client.pop()
        call.answer(200, call.query["hub.challenge"].encode() + b"\n")
        self.assertEqual(self.outcome(d), REJECTED)

    def test_async_verification_retried_with_backoff(self) -> None:
        d = self.hub.submit(sub())
        first = self.client.pop()
        first.error(ConnectionRefusedError())
        self.assertNoResult(d)
        self.clock.advance(4.9)
        self.assertEqual(self.client.calls, [])
        self.clock.advance(0.1)
        second = self.client.pop()
        self.assertNotEqual(second.query["hub.challenge"], first.query["hub.challenge"])
        second.answer(503)
        self.clock.advance(59)
        self.assertEqual(self.client.calls, [])
        self.clock.advance(1)
        third = self.client.pop()
        third.echo()
        self.assertEqual(self.outcome(d), VERIFIED)
        stored = self.stored()
        assert stored is not None
        # The lease counts from the verification request that succeeded.
        self.assertEqual(stored.expires_at, T0 + 65 + 864000)

    def test_retries_give_up(self) -> None:
        d = self.hub.submit(sub())
        for _ in range(3):
            self.client.pop().answer(500)
            self.clock.advance(60)
        self.assertEqual(self.outcome(d), UNREACHABLE)
        self.assertEqual(self.client.calls, [])
        self.assertIsNone(self.stored())

    def test_refused_address_is_not_retried(self) -> None:
        d = self.hub.submit(sub())
        self.client.pop().error(TargetRefused("127.0.0.1 is a loopback address"))
        self.assertEqual(self.outcome(d), REJECTED)
        self.clock.advance(1000)
        self.assertEqual(self.client.calls, [])

    def test_sync_verification_is_not_retried(self) -> None:
        d = ensureDeferred(self.hub.verify_now(sub()))
        self.client.pop().answer(500)
        self.assertFalse(self.outcome(d))
        self.clock.advance(1000)
        self.assertEqual(self.client.calls, [])

    def test_failed_verification_leaves_old_state(self) -> None:
        d = self.hub.submit(sub(secret="old", lease_seconds=600))
        self.client.pop().echo()
        self.outcome(d)
        before = self.stored()
        self.clock.advance(10)
        d = self.hub.submit(sub(secret="new", lease_seconds=6000))
        self.client.pop().answer(404)
        self.assertEqual(self.outcome(d), REJECTED)
        self.assertEqual(self.stored(), before)
        d = self.hub.submit(sub("unsubscribe"))
        self.client.pop().answer(200, b"wrong")
        self.outcome(d)
        self.assertEqual(self.stored(), before)

    def test_resubscribe_replaces_and_unsubscribe_removes(self) -> None:
        for secret in ("one", None):
            d = self.hub.submit(sub(secret=secret))
            self.client.pop().echo()
            self.outcome(d)
        self.assertEqual(len(self.successResultOf(self.store.list_subscriptions(TOPIC))), 1)
        stored = self.stored()
        assert stored is not None
        self.assertIsNone(stored.secret, "a new subscription may drop its secret")
        d = self.hub.submit(sub("unsubscribe", lease_seconds=5))
        call = self.client.pop()
        self.assertEqual(call.query["hub.mode"], "unsubscribe")
        self.assertNotIn("hub.lease_seconds", call.query)
        call.echo()
        self.outcome(d)
        self.assertIsNone(self.stored())

    def test_newest_verified_request_wins_whatever_the_order(self) -> None:
        subscribe = self.hub.submit(sub())
        unsubscribe = self.hub.submit(sub("unsubscribe"))
        subscribe_call, unsubscribe_call = self.client.pop(), self.client.pop()
        unsubscribe_call.echo()
        subscribe_call.echo()
        self.assertEqual((self.outcome(subscribe), self.outcome(unsubscribe)), (VERIFIED, VERIFIED))
        self.assertIsNone(self.stored(), "the older subscribe finished last but must not win")
        # When the newer request fails, the older verified one applies.
        subscribe = self.hub.submit(sub())
        unsubscribe = self.hub.submit(sub("unsubscribe"))
        subscribe_call, unsubscribe_call = self.client.pop(), self.client.pop()
        unsubscribe_call.answer(404)
        subscribe_call.echo()
        self.assertIsNotNone(self.stored())
        self.assertEqual(self.hub._keys, {}, "no bookkeeping left once requests are done")

    def test_denied_topic(self) -> None:
        self.hub.policy = TopicPolicy(["https://allowed.example/"])
        d = self.hub.submit(sub())
        call = self.client.pop()
        self.assertTrue(call.url.startswith(CALLBACK + "&"))
        self.assertEqual(call.query["hub.mode"], "denied")
        self.assertEqual(call.query["hub.topic"], TOPIC)
        self.assertTrue(call.query["hub.reason"])
        self.assertNotIn("hub.challenge", call.query)
        call.answer(200)
        self.assertEqual(self.outcome(d), DENIED)
        self.assertEqual(self.client.calls, [])
        self.assertIsNone(self.stored())

    def test_expired_subscriptions_receive_nothing_and_are_purged(self) -> None:
        d = self.hub.submit(sub(lease_seconds=60))
        self.client.pop().echo()
        self.outcome(d)
        self.hub.startService()
        self.addCleanup(self.hub.stopService)
        self.assertEqual(len(self.successResultOf(self.store.active_subscriptions(TOPIC, self.clock.seconds()))), 1)
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(self.store.active_subscriptions(TOPIC, self.clock.seconds())), [])
        self.assertIsNotNone(self.stored(), "not purged before the purge loop runs")
        self.clock.advance(40)
        self.assertIsNone(self.stored())

    def test_stop_cancels_pending_verifications(self) -> None:
        self.hub.startService()
        d = self.hub.submit(sub())
        self.client.pop().answer(500)
        self.assertEqual(len(self.hub.tasks), 1)
        stopped = self.hub.stopService()
        self.successResultOf(stopped)
        self.assertIsNone(self.successResultOf(d), "cancelled, with no outcome")
        self.assertIsNone(self.stored())
        self.clock.advance(1000)
        self.assertEqual(self.client.calls, [])
        self.assertEqual(len(self.hub.tasks), 0)

    def gone(self, status_code: int, at: float, kind: str = KIND_WEBSUB) -> Delivery:
        return Delivery(
            id="D1", url=CALLBACK, body=b"x", kind=kind, topic=TOPIC, status=FAILED,
            attempts=(Attempt(at, status_code, f"HTTP {status_code}"),),
        )

    def finished(self, delivery: Delivery) -> Any:
        d = self.hub.delivery_finished(delivery)
        assert d is not None
        return d

    def subscribed(self, **fields: Any) -> None:
        d = self.hub.submit(sub(**fields))
        self.client.pop().echo()
        self.assertEqual(self.outcome(d), VERIFIED)

    def queue(self, *ids: str, callback: str = CALLBACK, **fields: Any) -> None:
        fields.setdefault("status", SCHEDULED)
        fields.setdefault("next_attempt_at", T0 + 30)
        self.successResultOf(self.store.add_deliveries([
            Delivery(id=i, url=callback, body=b"x", kind=KIND_WEBSUB, topic=TOPIC, created_at=T0, **fields)
            for i in ids
        ]))

    def delivery(self, delivery_id: str) -> Delivery:
        found: Delivery = self.successResultOf(self.store.get_delivery(delivery_id))
        return found

    def assertCancelled(self, delivery_id: str, reason: str) -> None:
        delivery = self.delivery(delivery_id)
        self.assertEqual((delivery.status, delivery.next_attempt_at), (FAILED, None))
        self.assertEqual((delivery.attempts[-1].status_code, delivery.attempts[-1].error), (None, reason))

    def test_hub_url_kept_with_the_subscription(self) -> None:
        self.subscribed(hub_url="https://seen.example/hub")
        stored = self.stored()
        assert stored is not None
        self.assertEqual(stored.hub_url, "https://seen.example/hub")

    def test_unsubscribe_cancels_queued_notifications(self) -> None:
        self.subscribed()
        self.queue("N1", "N2")
        self.queue("OTHER", callback="https://other.example/cb")
        d = self.hub.submit(sub("unsubscribe"))
        call = self.client.pop()
        self.assertEqual(self.delivery("N1").status, SCHEDULED, "nothing changes before verification")
        call.echo()
        self.outcome(d)
        self.assertIsNone(self.stored())
        for delivery_id in ("N1", "N2"):
            self.assertCancelled(delivery_id, CANCELLED_UNSUBSCRIBED)
        self.assertEqual(self.delivery("OTHER").status, SCHEDULED)

    def test_failed_unsubscribe_cancels_nothing(self) -> None:
        self.subscribed()
        self.queue("N1")
        d = self.hub.submit(sub("unsubscribe"))
        self.client.pop().answer(404)
        self.outcome(d)
        self.assertEqual(self.delivery("N1").status, SCHEDULED)

    def test_notification_in_flight_is_cancelled_once_settled(self) -> None:
        """An attempt in flight at unsubscription, then scheduled again, is cancelled by the settle pass."""
        self.hub.settle = 90
        self.hub.startService()
        self.addCleanup(self.hub.stopService)
        self.subscribed()
        self.queue("N1", status=DELIVERING, claimed_until=T0 + 90)
        d = self.hub.submit(sub("unsubscribe"))
        self.client.pop().echo()
        self.outcome(d)
        self.assertEqual(self.delivery("N1").status, DELIVERING, "its attempt goes on")
        self.successResultOf(self.store.finish_attempt("N1", Attempt(T0 + 1, 503, "HTTP 503"), SCHEDULED, T0 + 31))
        self.clock.advance(89)
        self.assertEqual(self.delivery("N1").status, SCHEDULED, "not yet settled")
        self.clock.advance(100)  # the next purge pass after the settle period
        self.assertCancelled("N1", CANCELLED_UNSUBSCRIBED)
        self.assertEqual(self.hub._settling, {})

    def test_settle_pass_spares_a_renewed_subscription(self) -> None:
        self.hub.settle = 90
        self.hub.startService()
        self.addCleanup(self.hub.stopService)
        self.subscribed()
        d = self.hub.submit(sub("unsubscribe"))
        self.client.pop().echo()
        self.outcome(d)
        self.clock.advance(10)
        self.subscribed()
        self.queue("NEW")
        self.clock.advance(200)
        self.assertEqual(self.delivery("NEW").status, SCHEDULED)
        self.assertEqual(self.hub._settling, {})

    def test_expired_lease_cancels_queued_notifications(self) -> None:
        self.subscribed(lease_seconds=60)
        self.queue("N1", next_attempt_at=T0 + 500)
        self.hub.startService()
        self.addCleanup(self.hub.stopService)
        self.assertEqual(self.delivery("N1").status, SCHEDULED)
        # The purge pass after the lease ended (every 100 s here).
        self.clock.advance(100)
        self.assertIsNone(self.stored())
        self.assertCancelled("N1", CANCELLED_EXPIRED)

    def test_410_cancels_the_other_queued_notifications(self) -> None:
        self.subscribed()
        self.queue("N2")
        self.successResultOf(self.finished(self.gone(410, T0 + 1)))
        self.assertIsNone(self.stored())
        self.assertCancelled("N2", CANCELLED_GONE)

    def test_verifications_in_flight_are_bounded(self) -> None:
        self.hub = WebSubHub(
            self.store, self.client, self.clock, BOUNDS, timeout=10, verify_retries=(5,),
            max_verifications=2, backlog=2,
        )
        callbacks = [f"https://s{i}.example/cb" for i in range(4)]
        results = [self.hub.submit(sub(callback=cb)) for cb in callbacks]
        self.assertEqual(len(self.client.calls), 2, "two in flight, two waiting for a turn")
        self.assertTrue(self.hub.busy())
        self.assertRaises(HubBusy, self.hub.submit, sub(callback="https://more.example/cb"))
        self.failureResultOf(ensureDeferred(self.hub.verify_now(sub(callback="https://sync.example/cb"))), HubBusy)
        # A verification that will be retried frees its turn while it waits.
        self.client.pop().answer(503)
        self.assertEqual(len(self.client.calls), 2)
        self.client.pop().echo()
        self.settle()  # its turn is free once the subscription is stored
        self.assertFalse(self.hub.busy())
        self.client.pop().echo()
        self.client.pop().echo()
        self.clock.advance(5)
        self.client.pop().echo()
        self.assertEqual([self.outcome(d) for d in results], [VERIFIED] * 4)
        self.assertEqual(self.hub._pending, 0)
        self.assertEqual(len(self.successResultOf(self.store.list_subscriptions(TOPIC))), 4)

    def test_stop_waits_for_the_purge_in_progress(self) -> None:
        pending: Deferred = Deferred()
        self.store.purge_expired = lambda now: pending  # type: ignore[method-assign]
        self.hub.startService()
        stopped = self.hub.stopService()
        self.assertNoResult(stopped)
        pending.callback([])
        self.successResultOf(stopped)

    def test_cancelled_while_waiting_for_a_turn(self) -> None:
        self.hub = WebSubHub(self.store, self.client, self.clock, BOUNDS, max_verifications=1)
        self.hub.startService()
        first = self.hub.submit(sub(callback="https://one.example/cb"))
        waiting = self.hub.submit(sub(callback="https://two.example/cb"))
        self.assertEqual(len(self.client.calls), 1)
        self.successResultOf(self.hub.stopService())
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(self.hub._pending, 0)

    def test_the_hub_wants_to_hear_only_of_a_410_to_a_notification(self) -> None:
        # Asked before the dispatcher builds the finished record.
        notification = Delivery(id="D1", url=CALLBACK, body=b"x", kind=KIND_WEBSUB, topic=TOPIC, status=DELIVERING)
        self.assertTrue(self.hub.wants(notification, Attempt(T0, 410, "HTTP 410")))
        for status_code in (200, 404, 500, None):
            self.assertFalse(self.hub.wants(notification, Attempt(T0, status_code, "x")), status_code)
        webhook = Delivery(id="D2", url=CALLBACK, body=b"x", kind=KIND_DISPATCH, status=DELIVERING)
        self.assertFalse(self.hub.wants(webhook, Attempt(T0, 410, "HTTP 410")))

    def test_410_removes_subscription(self) -> None:
        d = self.hub.submit(sub())
        self.client.pop().echo()
        self.outcome(d)
        self.assertIsNone(self.hub.delivery_finished(self.gone(500, T0 + 1)))
        self.assertIsNone(self.hub.delivery_finished(self.gone(410, T0 + 1, KIND_DISPATCH)))
        self.assertIsNotNone(self.stored())
        # A 410 to an attempt made before a renewal does not end the renewed subscription.
        self.successResultOf(self.finished(self.gone(410, T0 - 1)))
        self.assertIsNotNone(self.stored())
        self.successResultOf(self.finished(self.gone(410, T0 + 1)))
        self.assertIsNone(self.stored())


class DispatcherGoneTests(MemoryFlavour, SynchronousTestCase):
    """The dispatcher's final-state hook, end to end: a 410 ends the subscription."""

    def test_410_from_callback(self) -> None:
        clock = self.make_clock()
        clock.advance(T0)
        store = self.make_store(clock)
        client = ScriptedClient()
        new_id = IdGenerator(clock.seconds)
        hub = WebSubHub(store, client, clock, BOUNDS)
        dispatcher = Dispatcher(store, client, clock, new_id, (10,), outcome_listeners=[hub])
        dispatcher.startService()
        self.addCleanup(dispatcher.stopService)
        self.successResultOf(store.put_subscription(Subscription(TOPIC, CALLBACK, None, 60, T0, T0 + 600)))
        clock.advance(1)
        distributor = Distributor(store, new_id, "https://hub.example")
        deliveries = self.successResultOf(distributor(Event("E1", TOPIC, b"x"), clock.seconds()))
        self.successResultOf(submit(dispatcher, deliveries))
        clock.advance(0)
        post = client.pop()
        self.assertEqual((post.method, post.url), ("POST", CALLBACK))
        post.answer(500)
        self.assertIsNotNone(self.successResultOf(store.get_subscription(TOPIC, CALLBACK)), "other failures keep it")
        clock.advance(20)
        client.pop().answer(410)
        self.settle()  # the attempt is stored before the hook ends the subscription
        self.assertIsNone(self.successResultOf(store.get_subscription(TOPIC, CALLBACK)))


class DistributorTests(MemoryFlavour, SynchronousTestCase):
    def setUp(self) -> None:
        self.store = self.make_store(self.make_clock())
        self.ids = iter(f"D{i}" for i in range(100))
        self.distributor = Distributor(self.store, lambda: next(self.ids), "https://hooks.example.com")
        for callback, secret, expires in (
            ("https://a.example/cb?x=1&y=%2F", "sekrit", T0 + 10),
            ("https://b.example/cb", None, T0 + 10),
            ("https://c.example/expired", None, T0),
        ):
            self.store.put_subscription(Subscription(TOPIC, callback, secret, 10, T0 - 10, expires))
        self.store.put_subscription(Subscription("https://other.example/", "https://a.example/cb", None, 10, T0, T0 + 10))

    def test_one_delivery_per_active_subscriber(self) -> None:
        event = Event(
            "E1", TOPIC, b"<feed/>", "application/atom+xml; charset=UTF-8",
            headers=(("X-Custom", "1"), ("Link", "<forged>"), ("X-Hub-Signature", "sha256=forged")),
            created_at=T0,
        )
        deliveries = sorted(self.successResultOf(self.distributor(event, T0)), key=lambda d: d.url)
        self.assertEqual([d.url for d in deliveries], ["https://a.example/cb?x=1&y=%2F", "https://b.example/cb"])
        link = '<https://hooks.example.com/hub>; rel="hub", <https://publisher.example/feed>; rel="self"'
        signed, unsigned = deliveries
        for delivery in deliveries:
            self.assertEqual(delivery.kind, KIND_WEBSUB)
            self.assertEqual(delivery.topic, TOPIC)
            self.assertEqual(delivery.event_id, "E1")
            self.assertEqual(delivery.body, b"<feed/>")
            self.assertEqual(delivery.content_type, "application/atom+xml; charset=UTF-8")
            self.assertEqual(delivery.next_attempt_at, T0)
        self.assertEqual(unsigned.headers, (("X-Custom", "1"), ("Link", link)))
        self.assertEqual(signed.headers, (("X-Custom", "1"), ("Link", link), ("X-Hub-Signature", signature("sekrit", b"<feed/>"))))

    def test_no_subscribers(self) -> None:
        self.assertEqual(self.successResultOf(self.distributor(Event("E2", "nobody", b""), T0)), [])

    def test_hub_url_is_each_subscribers_own(self) -> None:
        """Without --public-url, each subscriber's Link names the hub URL it subscribed at."""
        store = self.make_store(self.make_clock())
        for callback, hub in (
            ("https://a.example/cb", "http://127.0.0.1:8080/hub"),
            ("https://b.example/cb", "https://forged.example/subscribe"),
            ("https://c.example/cb", "http://127.0.0.1:8080/hub"),
            ("https://old.example/cb", None),
        ):
            store.put_subscription(Subscription(TOPIC, callback, None, 10, T0, T0 + 10, hub_url=hub))
        distributor = Distributor(store, lambda: next(self.ids))
        deliveries = self.successResultOf(distributor(Event("E3", TOPIC, b""), T0))
        hubs = {d.url: parse_links(dict(d.headers)["Link"])["hub"] for d in deliveries}
        self.assertEqual(hubs, {
            "https://a.example/cb": ["http://127.0.0.1:8080/hub"],
            "https://b.example/cb": ["https://forged.example/subscribe"],
            "https://c.example/cb": ["http://127.0.0.1:8080/hub"],
            "https://old.example/cb": ["http://localhost/hub"],
        })
        # --public-url wins over what any request said.
        configured = Distributor(store, lambda: next(self.ids), "https://hooks.example.com/")
        deliveries = self.successResultOf(configured(Event("E4", TOPIC, b""), T0))
        self.assertEqual({parse_links(dict(d.headers)["Link"])["hub"][0] for d in deliveries},
                         {"https://hooks.example.com/hub"})


@attr.s(auto_attribs=True)
class FakeCore:
    published: List[Event] = attr.Factory(list)
    count: int = 0

    def new_id(self) -> str:
        self.count += 1
        return f"E{self.count}"

    def publish(self, event: Event) -> Any:
        self.published.append(event)
        return succeed([])


class PublisherTestCase(SynchronousTestCase):
    def start_publisher(self, **options: Any) -> None:
        """A ``Publisher`` (with ``options``) fetching through a ``ScriptedClient`` into a ``FakeCore``."""
        self.clock = Clock()
        self.client = ScriptedClient()
        self.core = FakeCore()
        self.distributor = Distributor(MemoryStore(self.clock), lambda: "D")
        self.publisher = Publisher(self.core, self.client, self.clock, **options)


class PublisherTests(PublisherTestCase):
    def setUp(self) -> None:
        self.start_publisher(max_redirects=2)

    def test_fetch_follows_redirects_and_keeps_content_type(self) -> None:
        [d] = self.publisher.publish([TOPIC])
        first = self.client.pop()
        self.assertEqual((first.method, first.url), ("GET", TOPIC))
        first.answer(301, headers=[("Location", "/moved?x=1")])
        second = self.client.pop()
        self.assertEqual(second.url, "https://publisher.example/moved?x=1")
        second.answer(200, b"content", [("Content-Type", "text/html; charset=UTF-8")])
        event = self.successResultOf(d)
        self.assertEqual(self.core.published, [event])
        self.assertEqual((event.topic, event.body, event.content_type), (TOPIC, b"content", "text/html; charset=UTF-8"))

    def test_fetch_failures_publish_nothing(self) -> None:
        cases: List[List[Any]] = [[(404, [])], [(302, [("Location", "/a")])] * 3, [(302, [("Location", "ftp://x/")])]]
        for answers in cases:
            [d] = self.publisher.publish([TOPIC])
            for code, headers in answers:
                self.client.pop().answer(code, b"", headers)
            self.assertIsNone(self.successResultOf(d))
            self.assertEqual(self.client.calls, [])
        [d] = self.publisher.publish([TOPIC])
        self.client.pop().error(ConnectionRefusedError())
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.core.published, [])

    def test_pings_during_a_fetch_fold_into_one_more(self) -> None:
        [d] = self.publisher.publish([TOPIC])
        self.assertEqual(self.publisher.publish([TOPIC]), [])
        self.assertEqual(self.publisher.publish([TOPIC]), [])
        self.client.pop().answer(200, b"v1")
        self.client.pop().answer(200, b"v2")
        self.assertEqual(self.client.calls, [])
        self.successResultOf(d)
        self.assertEqual([e.body for e in self.core.published], [b"v1", b"v2"])
        self.assertEqual(self.publisher._fetching, {})


class PublisherBoundsTests(PublisherTestCase):
    """Publish pings need no token: the fetches they start are bounded."""

    def setUp(self) -> None:
        self.start_publisher(max_fetches=3, backlog=4)
        # Fetches a test leaves waiting end here, not at garbage collection.
        self.addCleanup(self.publisher.stopService)

    def topics(self, count: int, start: int = 0) -> List[str]:
        return [f"https://publisher.example/feed/{i}" for i in range(start, start + count)]

    def test_fetches_in_flight_are_bounded_and_queued_ones_run_as_turns_free(self) -> None:
        topics = self.topics(7)
        started = self.publisher.publish(topics)
        self.assertEqual(len(started), 7)
        self.assertEqual([c.url for c in self.client.calls], topics[:3])
        self.assertEqual((self.publisher.in_flight, self.publisher.queued), (3, 4))
        answered: List[str] = []
        while self.client.calls:
            self.assertLessEqual(len(self.client.calls), 3)
            self.assertLessEqual(self.publisher.in_flight, 3)
            call = self.client.pop()
            answered.append(call.url)
            call.answer(200, call.url.encode())
        # First come, first served; every topic fetched once and published.
        self.assertEqual(answered, topics)
        self.assertEqual([e.body.decode() for e in self.core.published], topics)
        for d in started:
            self.successResultOf(d)
        self.assertEqual((self.publisher.in_flight, self.publisher.queued), (0, 0))
        self.assertEqual(self.publisher._fetching, {})

    def test_a_failed_or_redirected_fetch_holds_one_turn(self) -> None:
        self.publisher.publish(self.topics(4))
        self.client.pop().answer(302, headers=[("Location", "/elsewhere")])
        # The redirect is followed within the same turn: still three requests.
        self.assertEqual(len(self.client.calls), 3)
        self.assertEqual(self.client.calls[-1].url, "https://publisher.example/elsewhere")
        self.client.pop().error(ConnectionRefusedError())
        self.assertEqual(len(self.client.calls), 3)
        self.assertEqual(self.client.calls[-1].url, self.topics(1, 3)[0])
        self.assertEqual(self.publisher.in_flight, 3)

    def test_past_the_bound_a_ping_is_refused_whole(self) -> None:
        self.publisher.publish(self.topics(6))
        with self.assertRaises(HubBusy) as caught:
            self.publisher.publish(self.topics(2, 6))
        self.assertIn("try again later", str(caught.exception))
        self.assertEqual(caught.exception.retry_after, 30)
        # Refused whole: the topic that would still fit was not started.
        self.assertNotIn(self.topics(1, 6)[0], self.publisher._fetching)
        self.assertEqual(self.publisher.queued, 3)
        # One more fits exactly; then only already-tracked topics are accepted.
        self.assertEqual(len(self.publisher.publish(self.topics(1, 6))), 1)
        self.assertRaises(HubBusy, self.publisher.publish, self.topics(1, 7))
        self.assertRaises(HubBusy, self.publisher.publish, self.topics(1, 0) + self.topics(1, 7))

    def test_folded_pings_do_not_count_twice(self) -> None:
        topics = self.topics(7)
        self.publisher.publish(topics)
        for _ in range(10):
            # Pings for tracked topics (running or queued) are folded, never refused.
            self.assertEqual(self.publisher.publish(topics), [])
        self.assertEqual((self.publisher.in_flight, self.publisher.queued), (3, 4))
        # Queued topics' pings are answered by their coming fetch; running
        # ones' by one more fetch each, queued behind the others.
        fetched: List[str] = []
        while self.client.calls:
            call = self.client.pop()
            fetched.append(call.url)
            call.answer(200, b"x")
        self.assertEqual(fetched, topics + topics[:3])

    def test_turns_free_as_fetches_finish_then_new_pings_fit(self) -> None:
        self.publisher.publish(self.topics(7))
        self.assertRaises(HubBusy, self.publisher.publish, self.topics(1, 7))
        self.client.pop().answer(200, b"x")
        self.assertEqual(len(self.client.calls), 3)
        self.assertEqual(len(self.publisher.publish(self.topics(1, 7))), 1)

    def test_stop_cancels_queued_and_running_fetches(self) -> None:
        started = self.publisher.publish(self.topics(7))
        stopped = self.publisher.stopService()
        self.successResultOf(stopped)
        # Cancelling running fetches hands no turn to the queued ones.
        self.assertEqual(len(self.client.calls), 3)
        for call in self.client.calls:
            self.assertTrue(call.result.called)
        for d in started:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual((self.publisher.in_flight, self.publisher.queued), (0, 0))
        self.assertEqual(self.publisher._fetching, {})
        self.assertEqual(self.core.published, [])

    def test_stop_starts_no_folded_fetch_when_cancelling_fails_a_fetch(self) -> None:
        """A client may report a cancelled request as an ordinary failure: no fetch starts after stop."""

        class FailingOnCancel(ScriptedClient):
            def request(self, *args: Any, **kwargs: Any) -> Deferred:
                d = super().request(*args, **kwargs)
                original = d._canceller

                def cancel(d: Deferred) -> None:
                    d.errback(ConnectionAbortedError("request cancelled"))

                d._canceller = cancel if original is None else original
                return d

        self.client = FailingOnCancel()
        self.publisher.client = self.client
        topics = self.topics(5)
        started = self.publisher.publish(topics)
        self.publisher.publish(topics)  # each one more fetch due
        stopped = self.publisher.stopService()
        self.successResultOf(stopped)
        self.assertEqual(len(self.client.calls), 3)
        for d in started:
            self.successResultOf(d)
        self.assertEqual((self.publisher.in_flight, self.publisher.queued), (0, 0))
        self.assertEqual(self.publisher._fetching, {})


run_on(globals(), LaterFlavour, SQLiteFlavour)
