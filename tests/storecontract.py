"""
The ``IStore`` contract: one suite that every storage provider must pass.

A provider's test module mixes ``StoreContractMixin`` into a trial
``TestCase`` and implements ``make_store``; the web layer and the dispatcher
rely on exactly what is asserted here, whatever the provider.

Times are explicit arguments (around ``T0``) except where the interface gives
no ``now`` (``list_topics``); there the leases are far in the past or far in
the future so that a ``Clock`` at zero and the wall clock agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator, List

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from zope.interface.verify import verifyObject

from hookah.ids import IdGenerator
from hookah.model import (
    CANCELLED_EXPIRED,
    CANCELLED_UNSUBSCRIBED,
    DELIVERED,
    DELIVERING,
    FAILED,
    HOST_BUSY,
    KIND_ERRBACK,
    KIND_WEBSUB,
    SCHEDULED,
    Attempt,
    Delivery,
    Event,
    Subscription,
)
from hookah.storage.interface import IStore

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase as _Base
else:
    _Base = object

T0 = 1_700_000_000.0
FAR_FUTURE = 1e12
LONG_AGO = 0.0

_Gen = Generator[Deferred[Any], Any, None]


class StoreContractMixin(_Base):
    """Mix into a ``twisted.trial.unittest.TestCase``; provide ``make_store``."""

    store: Any

    def make_store(self) -> Any:
        """An ``IStore`` provider, not yet opened, or a Deferred of one."""
        raise NotImplementedError("a provider's test case says how to build it")

    @inlineCallbacks
    def setUp(self) -> _Gen:  # type: ignore[override]
        store = yield maybeDeferred(self.make_store)
        yield store.open()
        self.addCleanup(store.close)
        self.store = store
        self.newId = IdGenerator(lambda: T0)

    # -- helpers -------------------------------------------------------------

    def delivery(self, **fields: Any) -> Delivery:
        """A plain scheduled delivery with a fresh, ascending id."""
        fields.setdefault("id", self.newId())
        fields.setdefault("url", "https://example.com/hook")
        fields.setdefault("body", b"payload")
        fields.setdefault("created_at", T0)
        return Delivery(**fields)

    def event(self, topic: str, **fields: Any) -> Event:
        fields.setdefault("id", self.newId())
        fields.setdefault("body", b"event")
        fields.setdefault("created_at", T0)
        return Event(topic=topic, **fields)

    def subscription(self, topic: str, callback: str, **fields: Any) -> Subscription:
        fields.setdefault("expires_at", FAR_FUTURE)
        return Subscription(topic=topic, callback=callback, **fields)

    @inlineCallbacks
    def publish(self, *events: Event, keep_count: int = 1000, keep_after: float = 0.0) -> _Gen:
        for event in events:
            yield self.store.add_event(event, [], keep_count, keep_after)

    @inlineCallbacks
    def history(self, topic: str) -> Generator[Deferred[Any], Any, List[str]]:
        events = yield self.store.events_after([topic], None, 10_000)
        return [e.id for e in events]

    # -- basics ----------------------------------------------------------------

    def test_provides_istore(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))

    @inlineCallbacks
    def test_ping(self) -> _Gen:
        result = yield self.store.ping()
        self.assertIsNone(result)

    # -- deliveries ------------------------------------------------------------

    @inlineCallbacks
    def test_delivery_roundtrip_keeps_every_field(self) -> _Gen:
        d = Delivery(
            id=self.newId(),
            url="https://example.com/hook?x=1&y=é",
            body=b"\x00binary\x00\xff\xfe body \x00",
            content_type="application/octet-stream",
            headers=(("X-B", "2"), ("X-A", "1"), ("X-B", "ünï"), ("x-a", "")),
            status=DELIVERING,
            created_at=T0 + 0.123456,
            next_attempt_at=T0 + 10.5,
            attempts=(
                Attempt(at=T0 + 1, status_code=500, error=None, duration_ms=12),
                Attempt(at=T0 + 2, status_code=None, error="timeout", duration_ms=30000),
                Attempt(at=T0 + 3, status_code=429, error="slow down", duration_ms=7),
            ),
            retries=5,
            timeout=2.5,
            errback="https://example.com/errback",
            callback="https://example.com/callback",
            kind=KIND_WEBSUB,
            topic="news",
            event_id="01EVENT",
            parent_id="01PARENT",
            idempotency_key="key-1",
            retry_from=2,
            claimed_until=T0 + 60,
        )
        yield self.store.add_deliveries([d])
        got = yield self.store.get_delivery(d.id)
        self.assertEqual(got, d)
        self.assertIsInstance(got.body, bytes)
        self.assertIsInstance(got.headers, tuple)
        self.assertIsInstance(got.attempts, tuple)

    @inlineCallbacks
    def test_delivery_roundtrip_of_defaults(self) -> _Gen:
        d = Delivery(id=self.newId(), url="https://example.com/", body=b"")
        yield self.store.add_deliveries([d])
        got = yield self.store.get_delivery(d.id)
        self.assertEqual(got, d)

    @inlineCallbacks
    def test_get_missing_delivery(self) -> _Gen:
        got = yield self.store.get_delivery("01NOSUCHDELIVERY")
        self.assertIsNone(got)

    @inlineCallbacks
    def test_add_deliveries_is_atomic(self) -> _Gen:
        """A batch with one bad delivery (a duplicate id) stores none of them."""
        first = self.delivery()
        yield self.store.add_deliveries([first])
        fresh = self.delivery()
        yield self.assertFailure(
            self.store.add_deliveries([fresh, attr.evolve(first, url="https://other/")]),
            Exception,
        )
        self.assertIsNone((yield self.store.get_delivery(fresh.id)))
        self.assertEqual((yield self.store.get_delivery(first.id)), first)

    @inlineCallbacks
    def test_list_deliveries_pages_by_id(self) -> _Gen:
        statuses = [SCHEDULED, FAILED, DELIVERED, FAILED, SCHEDULED, FAILED, DELIVERING]
        ds = [
            self.delivery(status=s, attempts=(Attempt(at=T0, status_code=500),))
            for s in statuses
        ]
        # Inserted out of order: the order is the ids', not insertion's.
        yield self.store.add_deliveries(ds[3:])
        yield self.store.add_deliveries(ds[:3])

        page = yield self.store.list_deliveries(None, 3, None)
        self.assertEqual(page, ds[:3])
        page = yield self.store.list_deliveries(None, 3, ds[2].id)
        self.assertEqual(page, ds[3:6])
        page = yield self.store.list_deliveries(None, 3, ds[5].id)
        self.assertEqual(page, ds[6:])
        page = yield self.store.list_deliveries(None, 3, ds[6].id)
        self.assertEqual(page, [])

        failed = [d for d in ds if d.status == FAILED]
        page = yield self.store.list_deliveries(FAILED, 2, None)
        self.assertEqual(page, failed[:2])
        page = yield self.store.list_deliveries(FAILED, 2, failed[1].id)
        self.assertEqual(page, failed[2:])
        page = yield self.store.list_deliveries(DELIVERED, 10, ds[2].id)
        self.assertEqual(page, [])

    @inlineCallbacks
    def test_count_deliveries(self) -> _Gen:
        statuses = [SCHEDULED, SCHEDULED, DELIVERING, FAILED, FAILED, FAILED]
        yield self.store.add_deliveries([self.delivery(status=s) for s in statuses])
        counts = yield self.store.count_deliveries()
        self.assertEqual(
            {status: n for status, n in counts.items() if n},
            {SCHEDULED: 2, DELIVERING: 1, FAILED: 3},
        )

    @inlineCallbacks
    def test_count_deliveries_when_empty(self) -> _Gen:
        counts = yield self.store.count_deliveries()
        self.assertEqual(sum(counts.values()), 0)

    # -- claiming ----------------------------------------------------------------

    @inlineCallbacks
    def test_claim_due_takes_only_due_deliveries(self) -> _Gen:
        due = self.delivery(next_attempt_at=T0)
        exactly_now = self.delivery(next_attempt_at=T0 + 10)
        later = self.delivery(next_attempt_at=T0 + 11)
        done = self.delivery(status=DELIVERED, next_attempt_at=T0 - 100)
        gave_up = self.delivery(status=FAILED, next_attempt_at=T0 - 100)
        held = self.delivery(status=DELIVERING, next_attempt_at=T0 - 100,
                             claimed_until=T0 + 30)
        yield self.store.add_deliveries([due, exactly_now, later, done, gave_up, held])

        claimed = yield self.store.claim_due(T0 + 10, 100, T0 + 70)
        self.assertEqual(
            claimed,
            [attr.evolve(d, status=DELIVERING, claimed_until=T0 + 70)
             for d in (due, exactly_now)],
        )
        for d in claimed:
            self.assertEqual((yield self.store.get_delivery(d.id)), d)
        self.assertEqual((yield self.store.get_delivery(later.id)), later)
        self.assertEqual((yield self.store.get_delivery(held.id)), held)

    @inlineCallbacks
    def test_claim_due_earliest_first_and_limit(self) -> _Gen:
        times = [T0 + 5, T0 + 1, T0 + 4, T0 + 2, T0 + 3]
        ds = [self.delivery(next_attempt_at=t) for t in times]
        yield self.store.add_deliveries(ds)
        claimed = yield self.store.claim_due(T0 + 10, 3, T0 + 100)
        self.assertEqual([d.next_attempt_at for d in claimed], [T0 + 1, T0 + 2, T0 + 3])
        claimed = yield self.store.claim_due(T0 + 10, 3, T0 + 100)
        self.assertEqual([d.next_attempt_at for d in claimed], [T0 + 4, T0 + 5])
        claimed = yield self.store.claim_due(T0 + 10, 3, T0 + 100)
        self.assertEqual(claimed, [])

    @inlineCallbacks
    def test_claimed_not_claimed_again_before_lease_expiry(self) -> _Gen:
        d = self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([d])
        first = yield self.store.claim_due(T0, 10, T0 + 60)
        self.assertEqual([c.id for c in first], [d.id])
        self.assertEqual((yield self.store.claim_due(T0, 10, T0 + 60)), [])
        self.assertEqual((yield self.store.claim_due(T0 + 59.9, 10, T0 + 120)), [])

    @inlineCallbacks
    def test_expired_claim_is_claimable_again(self) -> _Gen:
        """Crash recovery: a lease that ran out frees the delivery for another."""
        d = self.delivery(next_attempt_at=T0, attempts=(Attempt(at=T0 - 5, status_code=503),))
        yield self.store.add_deliveries([d])
        yield self.store.claim_due(T0, 10, T0 + 60)
        again = yield self.store.claim_due(T0 + 60, 10, T0 + 120)
        self.assertEqual(again, [attr.evolve(d, status=DELIVERING, claimed_until=T0 + 120)])
        self.assertEqual((yield self.store.get_delivery(d.id)), again[0])

    @inlineCallbacks
    def test_claim_due_inserted_already_claimed(self) -> _Gen:
        """A caller may insert a delivery claimed by itself; it is not up for grabs."""
        d = self.delivery(status=DELIVERING, next_attempt_at=T0, claimed_until=T0 + 30)
        yield self.store.add_deliveries([d])
        self.assertEqual((yield self.store.claim_due(T0 + 29, 10, T0 + 90)), [])
        claimed = yield self.store.claim_due(T0 + 30, 10, T0 + 90)
        self.assertEqual([c.id for c in claimed], [d.id])

    @inlineCallbacks
    def test_claim_due_orders_expired_claims_and_scheduled_together(self) -> _Gen:
        scheduled_late = self.delivery(next_attempt_at=T0 + 10)
        lapsed = self.delivery(status=DELIVERING, next_attempt_at=T0 - 50,
                               claimed_until=T0 + 5)
        scheduled_early = self.delivery(next_attempt_at=T0 + 1)
        yield self.store.add_deliveries([scheduled_late, lapsed, scheduled_early])
        claimed = yield self.store.claim_due(T0 + 20, 2, T0 + 80)
        self.assertEqual([d.id for d in claimed], [scheduled_early.id, lapsed.id])
        claimed = yield self.store.claim_due(T0 + 20, 2, T0 + 80)
        self.assertEqual([d.id for d in claimed], [scheduled_late.id])

    @inlineCallbacks
    def test_scheduled_without_time_is_due_at_once(self) -> _Gen:
        untimed = self.delivery(next_attempt_at=None)
        timed = self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([timed, untimed])
        due = yield self.store.next_due()
        self.assertIsNotNone(due)
        self.assertLessEqual(due, T0)
        claimed = yield self.store.claim_due(T0, 10, T0 + 60)
        self.assertEqual([d.id for d in claimed], [untimed.id, timed.id])

    @inlineCallbacks
    def test_release_claims(self) -> _Gen:
        """Start-up of a single node: every claim is released, due at once."""
        a = self.delivery(next_attempt_at=T0)
        b = self.delivery(next_attempt_at=T0 + 1)
        inserted_claimed = self.delivery(status=DELIVERING, next_attempt_at=T0 + 2,
                                         claimed_until=T0 + 1000)
        waiting = self.delivery(next_attempt_at=T0 + 500)
        done = self.delivery(status=DELIVERED, next_attempt_at=T0)
        yield self.store.add_deliveries([a, b, inserted_claimed, waiting, done])
        yield self.store.claim_due(T0 + 1, 10, T0 + 60)

        released = yield self.store.release_claims(T0 + 1)
        self.assertEqual(released, 3)
        for d in (a, b, inserted_claimed):
            got = yield self.store.get_delivery(d.id)
            self.assertEqual(got, attr.evolve(d, status=SCHEDULED, claimed_until=None))
        self.assertEqual((yield self.store.get_delivery(waiting.id)), waiting)
        self.assertEqual((yield self.store.get_delivery(done.id)), done)
        self.assertEqual((yield self.store.next_due()), T0)
        claimed = yield self.store.claim_due(T0 + 2, 10, T0 + 60)
        self.assertEqual([d.id for d in claimed], [a.id, b.id, inserted_claimed.id])
        self.assertEqual((yield self.store.release_claims(T0 + 2)), 3)
        self.assertEqual((yield self.store.release_claims(T0 + 2)), 0)

    @inlineCallbacks
    def test_release_claims_makes_what_a_pause_held_due_at_once(self) -> _Gen:
        """A restart starts with a clean view of hosts: pauses end with it."""
        paused = self.delivery(next_attempt_at=T0)
        busy = self.delivery(next_attempt_at=T0)
        own = self.delivery(next_attempt_at=T0 + 300)
        paused_past = self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([paused, busy, own, paused_past])
        yield self.store.claim_due(T0, 10, T0 + 60)
        yield self.store.reschedule(paused.id, T0 + 900, "host_paused")
        yield self.store.reschedule(busy.id, T0 + 200, "host_busy")
        yield self.store.reschedule(paused_past.id, T0 + 5, "host_paused")
        got = yield self.store.get_delivery(paused.id)
        self.assertEqual((got.status, got.next_attempt_at, got.deferred), (SCHEDULED, T0 + 900, "host_paused"))

        self.assertEqual((yield self.store.release_claims(T0 + 10)), 1)
        got = yield self.store.get_delivery(paused.id)
        # Due at once, still marked: the dispatcher probes its host first.
        self.assertEqual((got.status, got.next_attempt_at, got.deferred), (SCHEDULED, T0 + 10, "host_paused"))
        self.assertEqual((yield self.store.get_delivery(busy.id)).next_attempt_at, T0 + 200)
        self.assertEqual((yield self.store.get_delivery(own.id)).next_attempt_at, T0 + 300)
        self.assertEqual((yield self.store.get_delivery(paused_past.id)).next_attempt_at, T0 + 5)
        claimed = yield self.store.claim_due(T0 + 10, 10, T0 + 70)
        self.assertEqual({c.id for c in claimed}, {paused.id, paused_past.id})

    @inlineCallbacks
    def test_an_attempt_clears_the_deferral_mark(self) -> _Gen:
        d = self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([d])
        yield self.store.claim_due(T0, 10, T0 + 60)
        yield self.store.reschedule(d.id, T0 + 50, "host_paused")
        yield self.store.claim_due(T0 + 50, 10, T0 + 110)
        yield self.store.finish_attempt(d.id, Attempt(at=T0 + 50, status_code=500), SCHEDULED, T0 + 80)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual((got.next_attempt_at, got.deferred), (T0 + 80, None))
        self.assertEqual((yield self.store.release_claims(T0 + 60)), 0)
        self.assertEqual((yield self.store.get_delivery(d.id)).next_attempt_at, T0 + 80)
        # A deferral stored with a new delivery (its host had no room) too.
        held = self.delivery(next_attempt_at=T0 + 400, deferred="host_paused")
        yield self.store.add_deliveries([held])
        self.assertEqual((yield self.store.get_delivery(held.id)), held)
        self.assertEqual((yield self.store.release_claims(T0 + 60)), 1)
        self.assertEqual((yield self.store.get_delivery(held.id)).next_attempt_at, T0 + 60)

    # -- finishing and rescheduling --------------------------------------------

    @inlineCallbacks
    def test_finish_attempt_with_retry(self) -> _Gen:
        d = self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([d])
        yield self.store.claim_due(T0, 10, T0 + 60)
        first = Attempt(at=T0 + 1, status_code=500, duration_ms=40)
        yield self.store.finish_attempt(d.id, first, SCHEDULED, T0 + 30)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual(
            got,
            attr.evolve(d, status=SCHEDULED, next_attempt_at=T0 + 30,
                        attempts=(first,), claimed_until=None),
        )
        self.assertEqual((yield self.store.claim_due(T0 + 29, 10, T0 + 90)), [])
        self.assertEqual(len((yield self.store.claim_due(T0 + 30, 10, T0 + 90))), 1)

        second = Attempt(at=T0 + 31, error="connection refused", duration_ms=3)
        yield self.store.finish_attempt(d.id, second, SCHEDULED, T0 + 300)
        third = Attempt(at=T0 + 301, status_code=200, duration_ms=9)
        yield self.store.claim_due(T0 + 300, 10, T0 + 360)
        yield self.store.finish_attempt(d.id, third, DELIVERED, None)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual(got.attempts, (first, second, third))
        self.assertEqual(got.status, DELIVERED)
        self.assertIsNone(got.claimed_until)
        self.assertEqual((yield self.store.claim_due(T0 + 10_000, 10, T0 + 10_060)), [])

    @inlineCallbacks
    def test_finish_attempt_failed(self) -> _Gen:
        d = self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([d])
        yield self.store.claim_due(T0, 10, T0 + 60)
        gone = Attempt(at=T0 + 1, status_code=410)
        yield self.store.finish_attempt(d.id, gone, FAILED, None)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual((got.status, got.attempts, got.claimed_until), (FAILED, (gone,), None))
        self.assertEqual((yield self.store.next_due()), None)

    @inlineCallbacks
    def test_finish_attempt_stores_follow_ups_with_the_outcome(self) -> _Gen:
        d = self.delivery(next_attempt_at=T0, errback="http://errors.example/")
        yield self.store.add_deliveries([d])
        yield self.store.claim_due(T0, 10, T0 + 60)
        report = self.delivery(url="http://errors.example/", kind=KIND_ERRBACK, parent_id=d.id, next_attempt_at=T0 + 1)
        gone = Attempt(at=T0 + 1, status_code=410)
        yield self.store.finish_attempt(d.id, gone, FAILED, None, [report])
        self.assertEqual((yield self.store.get_delivery(d.id)).status, FAILED)
        self.assertEqual((yield self.store.get_delivery(report.id)), report)
        claimed = yield self.store.claim_due(T0 + 1, 10, T0 + 60)
        self.assertEqual([c.id for c in claimed], [report.id])

    @inlineCallbacks
    def test_finish_attempt_of_an_unknown_delivery_stores_no_follow_up(self) -> _Gen:
        report = self.delivery(kind=KIND_ERRBACK)
        yield self.assertFailure(
            self.store.finish_attempt("01UNKNOWN0000000000000000", Attempt(at=T0), FAILED, None, [report]),
            KeyError,
        )
        self.assertIsNone((yield self.store.get_delivery(report.id)))

    # -- claim tokens (fencing) --------------------------------------------------

    @inlineCallbacks
    def test_each_claim_has_its_own_token(self) -> _Gen:
        a, b = self.delivery(next_attempt_at=T0), self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([a, b])
        first = yield self.store.claim_due(T0, 10, T0 + 60)
        tokens = [c.claim_token for c in first]
        self.assertEqual(len(set(tokens)), 2)
        self.assertNotIn(None, tokens)
        stored = yield self.store.get_delivery(a.id)
        self.assertEqual(stored.claim_token, first[0].claim_token)
        # The lease ran out: the next claim of the same delivery is another.
        again = yield self.store.claim_due(T0 + 60, 10, T0 + 120)
        self.assertEqual(len(again), 2)
        self.assertFalse(set(tokens) & {c.claim_token for c in again})

    @inlineCallbacks
    def test_outcome_of_a_claim_taken_over_is_refused(self) -> _Gen:
        from hookah.storage.interface import ClaimLost

        d = self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([d])
        (old,) = yield self.store.claim_due(T0, 10, T0 + 60)
        (new,) = yield self.store.claim_due(T0 + 60, 10, T0 + 120)
        report = self.delivery(kind=KIND_ERRBACK)
        late = Attempt(at=T0 + 61, status_code=500)
        yield self.assertFailure(
            self.store.finish_attempt(d.id, late, FAILED, None, [report], claim_token=old.claim_token),
            ClaimLost,
        )
        self.assertIsNone((yield self.store.get_delivery(report.id)))
        yield self.store.reschedule(d.id, T0 + 500, claim_token=old.claim_token)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual((got.status, got.attempts, got.claim_token), (DELIVERING, (), new.claim_token))
        ok = Attempt(at=T0 + 62, status_code=200)
        yield self.store.finish_attempt(d.id, ok, DELIVERED, None, claim_token=new.claim_token)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual((got.status, got.attempts, got.claim_token), (DELIVERED, (ok,), None))
        # Finished: no claim holds it any more, not even the last one.
        yield self.assertFailure(
            self.store.finish_attempt(d.id, ok, DELIVERED, None, claim_token=new.claim_token), ClaimLost
        )

    @inlineCallbacks
    def test_reschedule_hands_back_only_the_claim_it_names(self) -> _Gen:
        # The dispatcher hands back the newest claim it holds on a delivery
        # (hookah.delivery.dispatcher._adopt): the older token's hand-back
        # is a no-op, the newer one's puts the delivery back, as asked.
        d = self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([d])
        (old,) = yield self.store.claim_due(T0, 10, T0 + 60)
        (new,) = yield self.store.claim_due(T0 + 60, 10, T0 + 120)
        yield self.store.reschedule(d.id, T0 + 300, HOST_BUSY, claim_token=old.claim_token)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual((got.status, got.claim_token, got.deferred), (DELIVERING, new.claim_token, None))
        yield self.store.reschedule(d.id, T0 + 300, HOST_BUSY, claim_token=new.claim_token)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual(
            (got.status, got.next_attempt_at, got.claimed_until, got.claim_token, got.deferred),
            (SCHEDULED, T0 + 300, None, None, HOST_BUSY),
        )
        self.assertEqual((yield self.store.claim_due(T0 + 299, 10, T0 + 400)), [])
        self.assertEqual([c.id for c in (yield self.store.claim_due(T0 + 300, 10, T0 + 400))], [d.id])

    @inlineCallbacks
    def test_renew_claims_extends_held_leases_only(self) -> _Gen:
        a, b = self.delivery(next_attempt_at=T0), self.delivery(next_attempt_at=T0)
        yield self.store.add_deliveries([a, b])
        held = yield self.store.claim_due(T0, 10, T0 + 60)
        tokens = {c.id: c.claim_token for c in held}
        # b's lease runs out and someone else claims it.
        yield self.store.renew_claims([(a.id, tokens[a.id])], T0 + 50, T0 + 110)
        (taken,) = yield self.store.claim_due(T0 + 60, 10, T0 + 200)
        self.assertEqual(taken.id, b.id)
        lost = yield self.store.renew_claims(
            [(a.id, tokens[a.id]), (b.id, tokens[b.id]), ("01UNKNOWN0000000000000000", "x")],
            T0 + 100, T0 + 160,
        )
        self.assertEqual(sorted(lost), sorted([b.id, "01UNKNOWN0000000000000000"]))
        self.assertEqual((yield self.store.claim_due(T0 + 159, 10, T0 + 200)), [])
        self.assertEqual((yield self.store.get_delivery(b.id)).claim_token, taken.claim_token)
        (expired,) = yield self.store.claim_due(T0 + 160, 10, T0 + 220)
        self.assertEqual(expired.id, a.id)

    @inlineCallbacks
    def test_reschedule_releases_claim_without_attempt(self) -> _Gen:
        d = self.delivery(next_attempt_at=T0, attempts=(Attempt(at=T0 - 1, status_code=502),))
        yield self.store.add_deliveries([d])
        yield self.store.claim_due(T0, 10, T0 + 60)
        yield self.store.reschedule(d.id, T0 + 100)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual(got, attr.evolve(d, next_attempt_at=T0 + 100))
        self.assertEqual((yield self.store.claim_due(T0 + 99, 10, T0 + 200)), [])
        claimed = yield self.store.claim_due(T0 + 100, 10, T0 + 200)
        self.assertEqual([c.id for c in claimed], [d.id])

    @inlineCallbacks
    def test_renew_claim_moves_the_lease(self) -> _Gen:
        """An attempt longer than its claim allows keeps its delivery to itself."""
        d = self.delivery(next_attempt_at=T0)
        done = self.delivery(status=DELIVERED, next_attempt_at=T0)
        yield self.store.add_deliveries([d, done])
        yield self.store.claim_due(T0, 10, T0 + 90)
        yield self.store.renew_claim(d.id, T0 + 3660)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual((got.status, got.claimed_until), (DELIVERING, T0 + 3660))
        self.assertEqual((yield self.store.claim_due(T0 + 3000, 10, T0 + 3100)), [])
        self.assertEqual((yield self.store.next_due()), T0 + 3660)
        claimed = yield self.store.claim_due(T0 + 3660, 10, T0 + 3750)
        self.assertEqual([c.id for c in claimed], [d.id])
        # Only a claimed delivery is touched.
        yield self.store.renew_claim(done.id, T0 + 5000)
        self.assertEqual((yield self.store.get_delivery(done.id)), done)

    @inlineCallbacks
    def test_requeue_finished(self) -> _Gen:
        attempts = (Attempt(at=T0, status_code=500), Attempt(at=T0 + 5, status_code=500))
        failed = self.delivery(status=FAILED, attempts=attempts, retry_from=1)
        delivered = self.delivery(status=DELIVERED, attempts=attempts[:1])
        yield self.store.add_deliveries([failed, delivered])

        requeued = yield self.store.requeue(failed.id, T0 + 1000)
        expected = attr.evolve(failed, status=SCHEDULED, next_attempt_at=T0 + 1000,
                               retry_from=2)
        self.assertEqual(requeued, expected)
        self.assertEqual(requeued.current_attempts, ())
        self.assertEqual((yield self.store.get_delivery(failed.id)), expected)

        requeued = yield self.store.requeue(delivered.id, T0 + 1000)
        self.assertEqual(
            requeued,
            attr.evolve(delivered, status=SCHEDULED, next_attempt_at=T0 + 1000, retry_from=1),
        )
        claimed = yield self.store.claim_due(T0 + 1000, 10, T0 + 1060)
        self.assertEqual({c.id for c in claimed}, {failed.id, delivered.id})

    @inlineCallbacks
    def test_requeue_refuses_unfinished_and_unknown(self) -> _Gen:
        scheduled = self.delivery(next_attempt_at=T0 + 50)
        delivering = self.delivery(status=DELIVERING, claimed_until=T0 + 50)
        yield self.store.add_deliveries([scheduled, delivering])
        for d in (scheduled, delivering):
            self.assertIsNone((yield self.store.requeue(d.id, T0)))
            self.assertEqual((yield self.store.get_delivery(d.id)), d)
        self.assertIsNone((yield self.store.requeue("01NOSUCHDELIVERY", T0)))

    # -- cancelling WebSub notifications ------------------------------------------

    def notification(self, topic: str = "news", url: str = "https://a.example/cb", **fields: Any) -> Delivery:
        fields.setdefault("next_attempt_at", T0 + 30)
        return self.delivery(kind=KIND_WEBSUB, topic=topic, url=url, event_id="01EVENT", **fields)

    def assertCancelled(self, got: Delivery, before: Delivery, reason: str) -> None:
        self.assertEqual((got.status, got.next_attempt_at, got.claimed_until), (FAILED, None, None))
        self.assertEqual(got.attempts[:-1], before.attempts)
        mark = got.attempts[-1]
        self.assertEqual((mark.status_code, mark.error, mark.duration_ms), (None, reason, 0))
        self.assertIsInstance(mark.at, float)
        self.assertEqual(attr.evolve(got, status=before.status, next_attempt_at=before.next_attempt_at,
                                     attempts=before.attempts), before)

    @inlineCallbacks
    def test_cancel_deliveries_ends_queued_notifications_of_one_pair(self) -> _Gen:
        retrying = self.notification(attempts=(Attempt(at=T0, status_code=500, error="HTTP 500"),))
        untimed = self.notification(next_attempt_at=None)
        in_flight = self.notification(status=DELIVERING, claimed_until=T0 + 60)
        done = self.notification(status=DELIVERED, attempts=(Attempt(at=T0, status_code=200),))
        other_callback = self.notification(url="https://b.example/cb")
        other_topic = self.notification(topic="sport")
        # Same URL and topic, but not a WebSub notification.
        webhook = self.delivery(url="https://a.example/cb", topic="news", next_attempt_at=T0)
        errback = self.delivery(kind=KIND_ERRBACK, url="https://a.example/cb", topic="news",
                                next_attempt_at=T0)
        untouched = [in_flight, done, other_callback, other_topic, webhook, errback]
        yield self.store.add_deliveries([retrying, untimed] + untouched)

        count = yield self.store.cancel_deliveries("news", "https://a.example/cb", CANCELLED_UNSUBSCRIBED)
        self.assertEqual(count, 2)
        for d in (retrying, untimed):
            self.assertCancelled((yield self.store.get_delivery(d.id)), d, CANCELLED_UNSUBSCRIBED)
        for d in untouched:
            self.assertEqual((yield self.store.get_delivery(d.id)), d)
        claimed = yield self.store.claim_due(FAR_FUTURE, 100, FAR_FUTURE + 60)
        self.assertEqual({c.id for c in claimed},
                         {in_flight.id, other_callback.id, other_topic.id, webhook.id, errback.id})
        self.assertEqual(
            (yield self.store.cancel_deliveries("news", "https://a.example/cb", CANCELLED_UNSUBSCRIBED)), 0
        )
        counts = yield self.store.count_deliveries()
        self.assertEqual(counts[FAILED], 2)

    @inlineCallbacks
    def test_remove_subscription_cancels_its_notifications_with_it(self) -> _Gen:
        sub = Subscription(topic="news", callback="https://a.example/cb", expires_at=FAR_FUTURE)
        yield self.store.put_subscription(sub)
        queued = self.notification()
        other = self.notification(url="https://b.example/cb")
        yield self.store.add_deliveries([queued, other])
        removed = yield self.store.remove_subscription("news", "https://a.example/cb", CANCELLED_UNSUBSCRIBED)
        self.assertTrue(removed)
        self.assertIsNone((yield self.store.get_subscription("news", "https://a.example/cb")))
        self.assertCancelled((yield self.store.get_delivery(queued.id)), queued, CANCELLED_UNSUBSCRIBED)
        self.assertEqual((yield self.store.get_delivery(other.id)), other)
        # Without a reason, removal leaves queued notifications alone.
        yield self.store.put_subscription(attr.evolve(sub, callback="https://b.example/cb"))
        yield self.store.remove_subscription("news", "https://b.example/cb")
        self.assertEqual((yield self.store.get_delivery(other.id)), other)

    @inlineCallbacks
    def test_cancel_deliveries_after_a_retry_is_scheduled(self) -> _Gen:
        """An attempt in flight at the first cancel, then rescheduled, is caught by the next."""
        d = self.notification(next_attempt_at=T0)
        yield self.store.add_deliveries([d])
        yield self.store.claim_due(T0, 10, T0 + 60)
        self.assertEqual((yield self.store.cancel_deliveries("news", d.url, "gone")), 0)
        failed = Attempt(at=T0 + 1, status_code=503, error="HTTP 503")
        yield self.store.finish_attempt(d.id, failed, SCHEDULED, T0 + 10)
        self.assertEqual((yield self.store.cancel_deliveries("news", d.url, "gone")), 1)
        got = yield self.store.get_delivery(d.id)
        self.assertEqual(got.status, FAILED)
        self.assertEqual([(a.status_code, a.error) for a in got.attempts], [(503, "HTTP 503"), (None, "gone")])
        self.assertIsNone((yield self.store.next_due()))
        # A manual resend of a cancelled notification is still possible.
        requeued = yield self.store.requeue(d.id, T0 + 100)
        self.assertEqual((requeued.status, requeued.retry_from), (SCHEDULED, 2))

    # -- retention ---------------------------------------------------------------

    @inlineCallbacks
    def test_purge_finished_by_last_activity(self) -> _Gen:
        long_ago = T0 - 10_000
        old_failed = self.delivery(status=FAILED, created_at=long_ago)
        old_delivered = self.delivery(
            status=DELIVERED, created_at=long_ago,
            attempts=(Attempt(at=T0 - 300, status_code=500), Attempt(at=T0 - 200, status_code=200)),
        )
        # Created long ago, but active recently: kept.
        recent = self.delivery(status=FAILED, created_at=long_ago,
                               attempts=(Attempt(at=T0 - 1, status_code=410),))
        boundary = self.delivery(status=DELIVERED, created_at=long_ago,
                                 attempts=(Attempt(at=T0, status_code=200),))
        scheduled = self.delivery(created_at=long_ago, next_attempt_at=long_ago)
        delivering = self.delivery(status=DELIVERING, created_at=long_ago, claimed_until=long_ago)
        kept = [recent, boundary, scheduled, delivering]
        yield self.store.add_deliveries([old_delivered, old_failed] + kept)

        # Oldest activity first, at most ``limit`` per call.
        self.assertEqual((yield self.store.purge_finished(T0 - 1, 1)), 1)
        self.assertIsNone((yield self.store.get_delivery(old_failed.id)))
        self.assertEqual((yield self.store.get_delivery(old_delivered.id)), old_delivered)
        self.assertEqual((yield self.store.purge_finished(T0 - 1, 10)), 1)
        self.assertIsNone((yield self.store.get_delivery(old_delivered.id)))
        self.assertEqual((yield self.store.purge_finished(T0 - 1, 10)), 0)
        for d in kept:
            self.assertEqual((yield self.store.get_delivery(d.id)), d)
        page = yield self.store.list_deliveries(None, 100, None)
        self.assertEqual([d.id for d in page], [d.id for d in sorted(kept, key=lambda d: d.id)])
        # The attempts went with it: the id, stored again, has only its own.
        again = attr.evolve(old_delivered, attempts=(Attempt(at=T0, status_code=201),))
        yield self.store.add_deliveries([again])
        self.assertEqual((yield self.store.get_delivery(again.id)), again)

    @inlineCallbacks
    def test_purge_finished_follows_state_changes(self) -> _Gen:
        """Finishing makes a delivery purgeable from its last attempt; a requeue makes it safe."""
        d = self.delivery(created_at=T0 - 1000, next_attempt_at=T0 - 1000)
        resent = self.delivery(status=FAILED, created_at=T0 - 1000)
        yield self.store.add_deliveries([d, resent])
        yield self.store.claim_due(T0, 10, T0 + 60)
        yield self.store.finish_attempt(d.id, Attempt(at=T0 - 50, status_code=200), DELIVERED, None)
        yield self.store.requeue(resent.id, T0)
        self.assertEqual((yield self.store.purge_finished(T0 - 50, 100)), 0)
        self.assertEqual((yield self.store.purge_finished(T0, 100)), 1)
        self.assertIsNone((yield self.store.get_delivery(d.id)))
        self.assertEqual((yield self.store.get_delivery(resent.id)).status, SCHEDULED)

    @inlineCallbacks
    def test_trim_events_across_topics(self) -> _Gen:
        a1 = self.event("a", created_at=T0 - 100)
        b1 = self.event("b", created_at=T0 - 50)
        c1 = self.event("c", created_at=T0 - 10)
        a2 = self.event("a", created_at=T0)
        b2 = self.event("b", created_at=T0 + 10)
        yield self.publish(a1, b1, c1, a2, b2)
        self.assertEqual((yield self.store.trim_events(T0, 1)), 1)
        self.assertIsNone((yield self.store.get_event(a1.id)))
        self.assertEqual((yield self.store.get_event(b1.id)), b1)
        self.assertEqual((yield self.store.trim_events(T0, 10)), 2)
        self.assertEqual((yield self.store.trim_events(T0, 10)), 0)
        self.assertEqual((yield self.history("a")), [a2.id])
        self.assertEqual((yield self.history("b")), [b2.id])
        self.assertEqual((yield self.history("c")), [])
        self.assertEqual(sorted(t for t, _, _ in (yield self.store.list_topics())), ["a", "b"])
        self.assertEqual((yield self.store.last_events(["a", "b", "c"], 10)), [a2, b2])

    @inlineCallbacks
    def test_trim_events_after_count_trims(self) -> _Gen:
        """Events already trimmed by ``add_event`` are not counted twice."""
        events = [self.event("a", created_at=T0 + i) for i in range(4)]
        yield self.publish(*events, keep_count=2)
        self.assertEqual((yield self.store.trim_events(T0 + 10, 100)), 2)
        self.assertEqual((yield self.history("a")), [])

    # -- next_due ----------------------------------------------------------------

    @inlineCallbacks
    def test_next_due_when_nothing(self) -> _Gen:
        self.assertIsNone((yield self.store.next_due()))
        yield self.store.add_deliveries(
            [self.delivery(status=DELIVERED, next_attempt_at=T0),
             self.delivery(status=FAILED, next_attempt_at=T0)]
        )
        self.assertIsNone((yield self.store.next_due()))

    @inlineCallbacks
    def test_next_due_sees_schedules_and_claim_expiries(self) -> _Gen:
        scheduled = self.delivery(next_attempt_at=T0 + 50)
        # A claimed delivery is due when its claim lapses, whatever its old
        # next_attempt_at said.
        claimed = self.delivery(status=DELIVERING, next_attempt_at=T0 + 1,
                                claimed_until=T0 + 30)
        yield self.store.add_deliveries([scheduled, claimed])
        self.assertEqual((yield self.store.next_due()), T0 + 30)
        yield self.store.finish_attempt(claimed.id, Attempt(at=T0 + 2, status_code=200),
                                        DELIVERED, None)
        self.assertEqual((yield self.store.next_due()), T0 + 50)
        yield self.store.add_deliveries([self.delivery(next_attempt_at=T0 + 7)])
        self.assertEqual((yield self.store.next_due()), T0 + 7)

    # -- idempotency keys --------------------------------------------------------

    @inlineCallbacks
    def test_find_idempotency_key(self) -> _Gen:
        d = self.delivery(idempotency_key="order-1", created_at=T0)
        yield self.store.add_deliveries([d, self.delivery(idempotency_key="other")])
        e = self.event("news", idempotency_key="order-2", created_at=T0 + 10)
        yield self.store.add_event(e, [], 100, 0.0)

        self.assertEqual((yield self.store.find_idempotency_key("order-1", T0 - 60)), d.id)
        self.assertEqual((yield self.store.find_idempotency_key("order-1", T0)), d.id)
        self.assertIsNone((yield self.store.find_idempotency_key("order-1", T0 + 0.001)))
        self.assertEqual((yield self.store.find_idempotency_key("order-2", T0)), e.id)
        self.assertIsNone((yield self.store.find_idempotency_key("order-2", T0 + 11)))
        self.assertIsNone((yield self.store.find_idempotency_key("unknown", 0.0)))

    @inlineCallbacks
    def test_idempotency_key_reused_after_window(self) -> _Gen:
        old = self.delivery(idempotency_key="k", created_at=T0)
        new = self.delivery(idempotency_key="k", created_at=T0 + 86_400)
        yield self.store.add_deliveries([old])
        yield self.store.add_deliveries([new])
        self.assertEqual((yield self.store.find_idempotency_key("k", T0 + 3600)), new.id)

    @inlineCallbacks
    def test_find_idempotency_key_without_window(self) -> _Gen:
        old = self.delivery(idempotency_key="k", created_at=T0 - 86_400 * 30)
        yield self.store.add_deliveries([old])
        self.assertEqual((yield self.store.find_idempotency_key("k", None)), old.id)

    @inlineCallbacks
    def test_idempotency_key_survives_its_event_leaving_the_history(self) -> _Gen:
        """Trimmed by count (``--history-count``) or by age, the event's key stays."""
        first = self.event("news", idempotency_key="by-count", created_at=T0)
        aged = self.event("quiet", idempotency_key="by-age", created_at=T0 - 100)
        yield self.publish(first, aged, keep_count=1)
        yield self.publish(self.event("news", created_at=T0 + 1), keep_count=1)
        self.assertEqual((yield self.history("news")), [(yield self.store.last_events(["news"], 1))[0].id])
        self.assertIsNone((yield self.store.get_event(first.id)))
        self.assertEqual((yield self.store.trim_events(T0, 10)), 1)
        self.assertIsNone((yield self.store.get_event(aged.id)))
        self.assertEqual((yield self.store.find_idempotency_key("by-count", T0 - 60)), first.id)
        self.assertEqual((yield self.store.find_idempotency_key("by-age", T0 - 3600)), aged.id)

    @inlineCallbacks
    def test_idempotency_key_survives_the_purge_of_its_delivery(self) -> _Gen:
        d = self.delivery(idempotency_key="order-9", status=DELIVERED, created_at=T0 - 1000,
                          attempts=(Attempt(at=T0 - 900, status_code=200),))
        yield self.store.add_deliveries([d])
        self.assertEqual((yield self.store.purge_finished(T0, 10)), 1)
        self.assertIsNone((yield self.store.get_delivery(d.id)))
        self.assertEqual((yield self.store.find_idempotency_key("order-9", T0 - 3600)), d.id)
        # The same record stored again keeps one key.
        yield self.store.add_deliveries([d])
        self.assertEqual((yield self.store.purge_idempotency_keys(T0, 10)), 1)
        self.assertIsNone((yield self.store.find_idempotency_key("order-9", None)))

    @inlineCallbacks
    def test_idempotency_keys_of_follow_ups_and_event_deliveries(self) -> _Gen:
        d = self.delivery(status=DELIVERING, claimed_until=T0 + 60)
        yield self.store.add_deliveries([d])
        report = self.delivery(kind=KIND_ERRBACK, parent_id=d.id, idempotency_key="report")
        yield self.store.finish_attempt(d.id, Attempt(at=T0, status_code=500), FAILED, None, [report])
        e = self.event("news")
        notification = self.delivery(kind=KIND_WEBSUB, topic="news", event_id=e.id, idempotency_key="fan")
        yield self.store.add_event(e, [notification], 100, 0.0)
        self.assertEqual((yield self.store.find_idempotency_key("report", T0)), report.id)
        self.assertEqual((yield self.store.find_idempotency_key("fan", T0)), notification.id)

    @inlineCallbacks
    def test_idempotency_keys_are_stored_with_their_record_or_not_at_all(self) -> _Gen:
        existing = self.delivery()
        yield self.store.add_deliveries([existing])
        yield self.assertFailure(
            self.store.add_deliveries([self.delivery(idempotency_key="lost-1"), existing]), Exception
        )
        e = self.event("news", idempotency_key="lost-2")
        yield self.assertFailure(
            self.store.add_event(e, [self.delivery(idempotency_key="lost-3"), existing], 100, 0.0), Exception
        )
        for key in ("lost-1", "lost-2", "lost-3"):
            self.assertIsNone((yield self.store.find_idempotency_key(key, None)), key)

    @inlineCallbacks
    def test_purge_idempotency_keys_by_age_only(self) -> _Gen:
        """Keys are forgotten once older than the window, oldest first, in batches."""
        oldest = self.delivery(idempotency_key="a", created_at=T0 - 300)
        older = self.event("news", idempotency_key="b", created_at=T0 - 200)
        boundary = self.delivery(idempotency_key="c", created_at=T0 - 100)
        young = self.delivery(idempotency_key="d", created_at=T0)
        reused = self.delivery(idempotency_key="a", created_at=T0 + 10)
        yield self.store.add_deliveries([oldest, boundary, young])
        yield self.publish(older)
        yield self.store.add_deliveries([reused])

        self.assertEqual((yield self.store.purge_idempotency_keys(T0 - 100, 1)), 1)
        # The first use of "a" is gone; its later use is still remembered.
        self.assertEqual((yield self.store.find_idempotency_key("a", None)), reused.id)
        self.assertEqual((yield self.store.find_idempotency_key("b", None)), older.id)
        # Strictly before: the key created at the bound stays.
        self.assertEqual((yield self.store.purge_idempotency_keys(T0 - 100, 10)), 1)
        self.assertEqual((yield self.store.purge_idempotency_keys(T0 - 100, 10)), 0)
        self.assertIsNone((yield self.store.find_idempotency_key("b", None)))
        self.assertEqual((yield self.store.find_idempotency_key("c", None)), boundary.id)
        self.assertEqual((yield self.store.purge_idempotency_keys(T0 + 5, 10)), 2)
        for key in ("b", "c", "d"):
            self.assertIsNone((yield self.store.find_idempotency_key(key, None)), key)
        self.assertEqual((yield self.store.find_idempotency_key("a", T0 - 1000)), reused.id)
        # Records themselves are untouched by the key purge.
        self.assertEqual((yield self.store.get_delivery(young.id)), young)
        self.assertEqual((yield self.store.get_event(older.id)), older)

    # -- events --------------------------------------------------------------------

    @inlineCallbacks
    def test_add_event_with_deliveries(self) -> _Gen:
        e = self.event(
            "news",
            body=b"\x00{}\x00",
            content_type="application/json",
            headers=(("X-Z", "1"), ("X-A", "2")),
            created_at=T0 + 0.25,
            idempotency_key="publish-1",
        )
        ds = [
            self.delivery(kind=KIND_WEBSUB, topic="news", event_id=e.id,
                          url=f"https://sub{i}.example/", next_attempt_at=T0)
            for i in range(3)
        ]
        yield self.store.add_event(e, ds, 100, 0.0)
        self.assertEqual((yield self.store.get_event(e.id)), e)
        for d in ds:
            self.assertEqual((yield self.store.get_delivery(d.id)), d)
        self.assertEqual(len((yield self.store.claim_due(T0, 10, T0 + 60))), 3)

    @inlineCallbacks
    def test_add_event_is_atomic(self) -> _Gen:
        existing = self.delivery()
        yield self.store.add_deliveries([existing])
        e = self.event("news")
        fresh = self.delivery(topic="news", event_id=e.id)
        yield self.assertFailure(
            self.store.add_event(e, [fresh, attr.evolve(existing, topic="news")], 100, 0.0),
            Exception,
        )
        self.assertIsNone((yield self.store.get_event(e.id)))
        self.assertIsNone((yield self.store.get_delivery(fresh.id)))
        self.assertEqual((yield self.history("news")), [])

    @inlineCallbacks
    def test_get_missing_event(self) -> _Gen:
        self.assertIsNone((yield self.store.get_event("01NOSUCHEVENT")))

    @inlineCallbacks
    def test_add_event_trims_by_count(self) -> _Gen:
        other = self.event("other")
        yield self.publish(other)
        news = [self.event("news", created_at=T0 + i) for i in range(5)]
        yield self.publish(*news, keep_count=3)
        self.assertEqual((yield self.history("news")), [e.id for e in news[2:]])
        self.assertEqual((yield self.history("other")), [other.id])
        self.assertIsNone((yield self.store.get_event(news[0].id)))

    @inlineCallbacks
    def test_add_event_trims_by_age(self) -> _Gen:
        other = self.event("other", created_at=T0 - 1000)
        yield self.publish(other)
        news = [self.event("news", created_at=T0 + 10 * i) for i in range(4)]
        yield self.publish(*news[:3])
        yield self.store.add_event(news[3], [], 1000, T0 + 10)
        # Kept: created strictly after keep_after; the one at T0 + 10 goes.
        self.assertEqual((yield self.history("news")), [news[2].id, news[3].id])
        self.assertEqual((yield self.history("other")), [other.id])

    @inlineCallbacks
    def test_events_page_ends_at_the_byte_bound(self) -> _Gen:
        sizes = [100, 300, 50, 1000, 10, 10, 10]
        events = [self.event("a" if i % 2 else "b", body=b"x" * n) for i, n in enumerate(sizes)]
        yield self.publish(*events)
        # 100 + 300 reaches 400: the page ends with the event that got there.
        self.assertEqual((yield self.store.events_page(["a", "b"], None, 100, 400)), events[:2])
        self.assertEqual((yield self.store.events_page(["a", "b"], None, 100, 401)), events[:3])
        # At least one event, however large.
        self.assertEqual((yield self.store.events_page(["a", "b"], events[2].id, 100, 1)), [events[3]])
        # The count bound still holds, and the cursor as in events_after.
        self.assertEqual((yield self.store.events_page(["a", "b"], events[3].id, 2, 10_000)), events[4:6])
        self.assertEqual((yield self.store.events_page(["b"], None, 100, 10_000)), events[0::2])
        self.assertEqual((yield self.store.events_page(["a", "b"], events[-1].id, 100, 10_000)), [])
        self.assertEqual((yield self.store.events_page(["nope"], None, 100, 10_000)), [])

    @inlineCallbacks
    def test_resume_page_tells_whether_the_resume_point_is_kept(self) -> _Gen:
        other = self.event("other")
        yield self.publish(other)
        news = [self.event("news", body=b"x" * 10) for _ in range(5)]
        yield self.publish(*news, keep_count=3)
        # Kept: the page after it, as events_page reads it, bounds included.
        self.assertEqual((yield self.store.resume_page(["news"], news[2].id, 100, 10_000)), (True, news[3:]))
        self.assertEqual((yield self.store.resume_page(["news", "x"], news[2].id, 1, 10_000)), (True, news[3:4]))
        self.assertEqual((yield self.store.resume_page(["news"], news[2].id, 100, 1)), (True, news[3:4]))
        self.assertEqual((yield self.store.resume_page(["news"], news[-1].id, 100, 10_000)), (True, []))
        # Trimmed by count: told, and the page is what is kept after it.
        self.assertEqual((yield self.store.resume_page(["news"], news[0].id, 100, 10_000)), (False, news[2:]))
        # Unknown ids, and an event of a topic the stream does not follow.
        self.assertEqual((yield self.store.resume_page(["news"], "0", 100, 10_000)), (False, news[2:]))
        self.assertEqual((yield self.store.resume_page(["news"], "~nope", 100, 10_000)), (False, []))
        self.assertEqual((yield self.store.resume_page(["news"], other.id, 100, 10_000))[0], False)
        self.assertEqual((yield self.store.resume_page(["other", "news"], other.id, 100, 10_000))[0], True)

    @inlineCallbacks
    def test_replay_cursor_is_where_the_newest_count_begin(self) -> _Gen:
        events = [self.event(topic) for topic in "abcabcab"]
        yield self.publish(*events)
        a_or_b = [e for e in events if e.topic in ("a", "b")]
        for count in (1, 3, 5):
            cursor = yield self.store.replay_cursor(["a", "b"], count)
            self.assertEqual(cursor, a_or_b[-count - 1].id)
            self.assertEqual((yield self.store.events_after(["a", "b"], cursor, 100)), a_or_b[-count:])
        self.assertIsNone((yield self.store.replay_cursor(["a", "b"], len(a_or_b))))
        self.assertIsNone((yield self.store.replay_cursor(["a", "b"], 1000)))
        self.assertIsNone((yield self.store.replay_cursor(["nope"], 3)))

    @inlineCallbacks
    def test_events_after_across_topics(self) -> _Gen:
        events = [self.event(topic) for topic in "abcabcab"]
        yield self.publish(*events)
        a_or_b = [e for e in events if e.topic in ("a", "b")]

        self.assertEqual((yield self.store.events_after(["b", "a"], None, 100)), a_or_b)
        self.assertEqual((yield self.store.events_after(["a", "b"], None, 3)), a_or_b[:3])
        self.assertEqual(
            (yield self.store.events_after(["a", "b"], a_or_b[2].id, 100)), a_or_b[3:]
        )
        self.assertEqual(
            (yield self.store.events_after(["a", "b"], a_or_b[2].id, 2)), a_or_b[3:5]
        )
        self.assertEqual(
            (yield self.store.events_after(["a", "b"], a_or_b[-1].id, 100)), []
        )
        # An id from another topic is still a position in time.
        self.assertEqual(
            (yield self.store.events_after(["a"], events[5].id, 100)),
            [events[6]],
        )
        self.assertEqual((yield self.store.events_after([], None, 100)), [])
        self.assertEqual((yield self.store.events_after(["nope"], None, 100)), [])

    @inlineCallbacks
    def test_last_events_across_topics(self) -> _Gen:
        events = [self.event(topic) for topic in "abcabcab"]
        yield self.publish(*events)
        a_or_b = [e for e in events if e.topic in ("a", "b")]
        self.assertEqual((yield self.store.last_events(["a", "b"], 3)), a_or_b[-3:])
        self.assertEqual((yield self.store.last_events(["c"], 100)), events[2::3])
        self.assertEqual((yield self.store.last_events(["a", "b", "c"], 100)), events)
        self.assertEqual((yield self.store.last_events(["nope"], 5)), [])

    @inlineCallbacks
    def test_list_topics(self) -> _Gen:
        yield self.publish(self.event("a"), self.event("a"), self.event("d"))
        for sub in (
            self.subscription("a", "https://one/", expires_at=FAR_FUTURE),
            self.subscription("a", "https://two/", expires_at=LONG_AGO),
            self.subscription("b", "https://one/", expires_at=FAR_FUTURE),
            self.subscription("c", "https://one/", expires_at=LONG_AGO),
        ):
            yield self.store.put_subscription(sub)
        topics = yield self.store.list_topics()
        self.assertEqual(sorted(topics), [("a", 2, 1), ("b", 0, 1), ("d", 1, 0)])

    # -- subscriptions -------------------------------------------------------------

    @inlineCallbacks
    def test_subscription_roundtrip_and_replace(self) -> _Gen:
        sub = self.subscription("news", "https://cb/", secret="s3cret", lease_seconds=600,
                                created_at=T0, expires_at=T0 + 600,
                                hub_url="https://hub.example:8443/hub/")
        yield self.store.put_subscription(sub)
        self.assertEqual((yield self.store.get_subscription("news", "https://cb/")), sub)

        renewed = attr.evolve(sub, secret=None, lease_seconds=900, created_at=T0 + 100,
                              expires_at=T0 + 1000, hub_url=None)
        yield self.store.put_subscription(renewed)
        self.assertEqual((yield self.store.get_subscription("news", "https://cb/")), renewed)
        self.assertEqual((yield self.store.list_subscriptions(None)), [renewed])
        self.assertEqual((yield self.store.active_subscriptions("news", T0)), [renewed])

    @inlineCallbacks
    def test_get_missing_subscription(self) -> _Gen:
        yield self.store.put_subscription(self.subscription("news", "https://cb/"))
        self.assertIsNone((yield self.store.get_subscription("news", "https://other/")))
        self.assertIsNone((yield self.store.get_subscription("other", "https://cb/")))

    @inlineCallbacks
    def test_remove_subscription(self) -> _Gen:
        keep = self.subscription("news", "https://keep/")
        yield self.store.put_subscription(keep)
        yield self.store.put_subscription(self.subscription("news", "https://cb/"))
        self.assertTrue((yield self.store.remove_subscription("news", "https://cb/")))
        self.assertFalse((yield self.store.remove_subscription("news", "https://cb/")))
        self.assertFalse((yield self.store.remove_subscription("other", "https://keep/")))
        self.assertIsNone((yield self.store.get_subscription("news", "https://cb/")))
        self.assertEqual((yield self.store.list_subscriptions(None)), [keep])

    @inlineCallbacks
    def test_active_subscriptions_exclude_expired(self) -> _Gen:
        subs = [
            self.subscription("news", "https://a/", expires_at=T0 + 1),
            self.subscription("news", "https://b/", expires_at=T0),
            self.subscription("news", "https://c/", expires_at=T0 - 1),
            self.subscription("news", "https://d/", expires_at=T0 + 500),
            self.subscription("sport", "https://a/", expires_at=T0 + 500),
        ]
        for sub in subs:
            yield self.store.put_subscription(sub)
        active = yield self.store.active_subscriptions("news", T0)
        self.assertEqual(sorted(s.callback for s in active), ["https://a/", "https://d/"])
        self.assertEqual((yield self.store.active_subscriptions("weather", T0)), [])

    @inlineCallbacks
    def test_list_subscriptions(self) -> _Gen:
        subs = [
            self.subscription("news", "https://a/"),
            self.subscription("sport", "https://a/"),
            self.subscription("news", "https://b/", expires_at=LONG_AGO),
        ]
        for sub in subs:
            yield self.store.put_subscription(sub)

        def key(s: Subscription) -> tuple:
            return (s.topic, s.callback)

        everything = yield self.store.list_subscriptions(None)
        self.assertEqual(sorted(everything, key=key), sorted(subs, key=key))
        news = yield self.store.list_subscriptions("news")
        self.assertEqual(sorted(news, key=key), [subs[0], subs[2]])
        self.assertEqual((yield self.store.list_subscriptions("weather")), [])

    @inlineCallbacks
    def test_purge_expired(self) -> _Gen:
        subs = [
            self.subscription("news", "https://a/", expires_at=T0 - 1),
            self.subscription("news", "https://b/", expires_at=T0),
            self.subscription("news", "https://c/", expires_at=T0 + 1),
            self.subscription("sport", "https://a/", expires_at=T0 - 100),
        ]
        for sub in subs:
            yield self.store.put_subscription(sub)
        queued_expired = self.notification("news", "https://a/")
        queued_active = self.notification("news", "https://c/")
        yield self.store.add_deliveries([queued_expired, queued_active])
        removed = yield self.store.purge_expired(T0)
        self.assertEqual(
            sorted(removed), [("news", "https://a/"), ("news", "https://b/"), ("sport", "https://a/")]
        )
        self.assertEqual((yield self.store.list_subscriptions(None)), [subs[2]])
        self.assertEqual((yield self.store.purge_expired(T0)), [])
        # Their queued notifications are cancelled with them, the others' not.
        self.assertCancelled((yield self.store.get_delivery(queued_expired.id)), queued_expired, CANCELLED_EXPIRED)
        self.assertEqual((yield self.store.get_delivery(queued_active.id)), queued_active)
