"""
Lease renewal (``hookah.delivery.renewal.LeaseRenewer``) over a dispatcher,
each test on every store flavour: the leases of the claims the dispatcher
holds are extended, and a claim is reported lost only when another
deliverer took it, not when this dispatcher's own outcome or hand-back ended
it while the renewal was out.
"""

from __future__ import annotations

from typing import Any, List

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from hookah.delivery.hosts import HostGate
from hookah.delivery.renewal import LeaseRenewer
from hookah.model import DELIVERED, DELIVERING, SCHEDULED
from tests.storeflavours import LaterFlavour, SQLiteFlavour, run_on
from tests.support import FakeClient
from tests.test_dispatcher import DispatcherTestCase, HoldingStore

LEASE = 30.0


class RenewalTests(DispatcherTestCase):
    def warnings(self) -> List[str]:
        events: List[str] = []

        def observe(event: Any) -> None:
            if event.get("log_level") == LogLevel.warn and event.get("log_namespace") == "hookah.delivery.renewal":
                events.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    def setup(self, limit: int = 16, max_waiting: int = 16) -> Any:
        """A dispatcher on a shared store's terms (a lease), whose attempts wait for the test to answer them."""
        clock = self.clock()
        store = HoldingStore(clock)
        client = FakeClient(clock, lambda sent: None)
        dispatcher = self.dispatcher(
            clock, client, store=self.make_store(clock, store), lease=LEASE,
            hosts=HostGate(clock, limit=limit, max_waiting=max_waiting),
        )
        renewer = LeaseRenewer(dispatcher.store, dispatcher, clock, LEASE)

        def answer_all() -> None:
            # Before the dispatcher stops (cleanups run last first): every
            # attempt answered, every held write done, so it can.
            store.release()
            for _ in range(10):
                for sent in client.outstanding():
                    sent.respond(200)
                self.settle()

        self.addCleanup(answer_all)
        return clock, store, client, dispatcher, renewer

    def test_held_claims_are_extended(self) -> None:
        clock, store, client, dispatcher, renewer = self.setup(limit=1, max_waiting=4)
        warnings = self.warnings()
        self.submit(dispatcher, self.delivery("WIRE"), self.delivery("HELD"))
        self.assertEqual(len(client.sent), 1)  # HELD waits for the host's only slot
        clock.advance(LEASE / 2)
        renewer.renew()
        self.settle()
        for delivery_id in ("WIRE", "HELD"):
            renewed = self.get(dispatcher, delivery_id)
            self.assertEqual(renewed.status, DELIVERING)
            self.assertGreaterEqual(renewed.claimed_until, clock.seconds() + LEASE)
        self.assertEqual((renewer.lost, warnings), (0, []))

    def test_an_outcome_written_while_the_renewal_is_out_is_no_loss(self) -> None:
        clock, store, client, dispatcher, renewer = self.setup()
        warnings = self.warnings()
        self.submit(dispatcher, self.delivery("DONE"))
        # The outcome is stored, its answer not back yet (a group commit
        # answers later): the dispatcher still lists the claim, the store no
        # longer has it.
        store.late_answers.add("finish_attempt")
        client.sent[0].respond(200)
        self.settle()
        self.assertEqual(self.get(dispatcher, "DONE").status, DELIVERED)
        self.assertEqual([i for i, _ in dispatcher.claims()], ["DONE"])
        renewer.renew()
        self.settle()
        self.assertEqual((renewer.lost, warnings), (0, []))
        store.release()
        self.settle()
        self.assertEqual((dispatcher.claims(), renewer.lost, warnings), ([], 0, []))

    def test_a_hand_back_written_while_the_renewal_is_out_is_no_loss(self) -> None:
        clock, store, client, dispatcher, renewer = self.setup(limit=1, max_waiting=0)
        warnings = self.warnings()
        self.submit(dispatcher, self.delivery("FIRST"))
        # The host is busy: SECOND is put back, and the answer to that
        # hand-back is held while the renewal runs.
        store.late_answers.add("reschedule")
        self.submit(dispatcher, self.delivery("SECOND"))
        # Stored pushed back a moment, then claimed by a poll and put back.
        for _ in range(100):
            if store.held():
                break
            clock.advance(0.001)
        self.assertEqual(store.held(), 1)
        self.assertEqual(self.get(dispatcher, "SECOND").status, SCHEDULED)
        self.assertIn("SECOND", [i for i, _ in dispatcher.claims()])
        renewer.renew()
        self.settle()
        self.assertEqual((renewer.lost, warnings), (0, []))
        store.release()
        self.settle()
        self.assertEqual([i for i, _ in dispatcher.claims()], ["FIRST"])

    def test_a_claim_another_deliverer_took_is_reported_lost(self) -> None:
        clock, store, client, dispatcher, renewer = self.setup()
        warnings = self.warnings()
        self.submit(dispatcher, self.delivery("TAKEN"))
        # Its lease ran out unrenewed (this node stalled) and another
        # deliverer claimed it.
        self.successResultOf(store.release_claims(clock.seconds()))
        other = self.successResultOf(store.claim_due(clock.seconds(), 10, clock.seconds() + LEASE))
        self.assertEqual([d.id for d in other], ["TAKEN"])
        renewer.renew()
        self.settle()
        self.assertEqual(renewer.lost, 1)
        self.assertEqual(len(warnings), 1)
        self.assertIn("TAKEN", warnings[0])
        self.assertEqual(self.get(dispatcher, "TAKEN").claim_token, other[0].claim_token)


run_on(globals(), LaterFlavour, SQLiteFlavour)
