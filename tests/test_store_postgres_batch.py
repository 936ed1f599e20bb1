"""
``PostgresStore``'s group commit: the writes queued while a transaction is
in flight (here: queued in one turn of the reactor) share the next one, and
each still gets its own outcome. Through the store's interface, on a fresh
database of the throwaway cluster (``tests/pgsupport.py``).
"""

from __future__ import annotations

import time
from typing import Any, Generator, List, Tuple

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks

from hookah.model import DELIVERED, DELIVERING, FAILED, KIND_ERRBACK, SCHEDULED, Attempt, Delivery
from hookah.storage.interface import ClaimLost
from hookah.storage.postgres.store import PostgresStore
from tests.pgstoresupport import PostgresStoreCase
from tests.storecontract import T0

_Gen = Generator[Deferred[Any], Any, None]


def outcomes(ds: List[Deferred[Any]]) -> Deferred[List[Tuple[bool, Any]]]:
    """Each Deferred's (succeeded, result or failure), in order."""
    return DeferredList(ds, consumeErrors=True)


class SkewedReactor:
    """The real reactor, but for a clock ``skew`` seconds off."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def seconds(self) -> float:
        return float(reactor.seconds()) + self.skew  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class PostgresBatchTests(PostgresStoreCase):
    def transactions(self, table: str, column: str, ids: List[str]) -> set:
        """The transactions that last wrote these rows (their ``xmin``)."""
        found = self.admin(f"SELECT xmin::text FROM {table} WHERE {column} IN ({', '.join(repr(i) for i in ids)})")
        self.assertTrue(found)
        return {row[0] for row in found}

    @inlineCallbacks
    def claimed(self, store: PostgresStore, count: int) -> Generator[Deferred[Any], Any, List[Delivery]]:
        """``count`` new deliveries, claimed (each with its token)."""
        yield store.add_deliveries([self.delivery() for _ in range(count)])
        claims = yield store.claim_due(T0, count, T0 + 60)
        self.assertEqual(len(claims), count)
        return claims

    @inlineCallbacks
    def test_outcomes_queued_together_share_one_transaction_each_with_its_own_result(self) -> _Gen:
        store = yield self.openStore()
        lost, *held = yield self.claimed(store, 5)
        # The first claim ran out and another deliverer took it over.
        yield store.reschedule(lost.id, T0, claim_token=lost.claim_token)
        (taken,) = yield store.claim_due(T0 + 1, 1, T0 + 61)
        self.assertNotEqual(taken.claim_token, lost.claim_token)
        ok = Attempt(at=T0 + 2, status_code=200, duration_ms=5)
        results = yield outcomes(
            [store.finish_attempt(lost.id, ok, DELIVERED, None, claim_token=lost.claim_token)]
            + [store.finish_attempt(d.id, ok, DELIVERED, None, claim_token=d.claim_token) for d in held]
            + [store.finish_attempt("01NOSUCHDELIVERY", ok, DELIVERED, None, claim_token="t")]
        )
        # One transaction wrote them all.
        self.assertEqual(len(self.transactions("attempts", "delivery_id", [d.id for d in held])), 1)
        (lost_ok, lost_failure), *rest, (unknown_ok, unknown_failure) = results
        self.assertFalse(lost_ok)
        lost_failure.trap(ClaimLost)
        self.assertFalse(unknown_ok)
        unknown_failure.trap(KeyError)
        self.assertEqual(rest, [(True, None)] * len(held))
        for d in held:
            got = yield store.get_delivery(d.id)
            self.assertEqual((got.status, got.attempts, got.claim_token), (DELIVERED, (ok,), None))
        # The lost claim's outcome wrote nothing: the new holder's claim stands.
        got = yield store.get_delivery(lost.id)
        self.assertEqual((got.status, got.attempts, got.claim_token), (DELIVERING, (), taken.claim_token))
        self.assertEqual(store.claims_lost, 1)

    @inlineCallbacks
    def test_a_failed_commit_fails_every_write_of_its_batch(self) -> _Gen:
        store = yield self.openStore()
        a, b = yield self.claimed(store, 2)
        # A check the database makes at COMMIT only: an attempt whose error
        # says "poison" cannot commit, nor can anything sharing its transaction.
        self.admin(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.error = 'poison' THEN RAISE EXCEPTION 'poisoned attempt'; END IF; RETURN NEW; END $$;"
            " CREATE CONSTRAINT TRIGGER refuse_poison AFTER INSERT ON attempts"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
        )
        fresh = self.delivery()
        ok = Attempt(at=T0 + 1, status_code=200)
        results = yield outcomes([
            store.finish_attempt(a.id, ok, DELIVERED, None, claim_token=a.claim_token),
            store.finish_attempt(b.id, Attempt(at=T0 + 1, error="poison"), FAILED, None, claim_token=b.claim_token),
            store.add_deliveries([fresh]),
            store.claim_due(T0, 10, T0 + 60),
        ])
        self.assertEqual([ok for ok, _ in results], [False] * 4)
        self.assertTrue(all("poisoned attempt" in str(failure.value) for _, failure in results), results)
        # Nothing of it is stored: both claims still held, the new delivery absent.
        for d in (a, b):
            got = yield store.get_delivery(d.id)
            self.assertEqual((got.status, got.attempts, got.claim_token), (DELIVERING, (), d.claim_token))
        self.assertIsNone((yield store.get_delivery(fresh.id)))
        # The next batch is on its own.
        yield store.finish_attempt(a.id, ok, DELIVERED, None, claim_token=a.claim_token)
        self.assertEqual((yield store.get_delivery(a.id)).status, DELIVERED)

    @inlineCallbacks
    def test_a_failing_write_fails_alone_and_the_rest_of_its_batch_commits(self) -> _Gen:
        store = yield self.openStore()
        existing = self.delivery()
        yield store.add_deliveries([existing])
        (claim,) = yield store.claim_due(T0, 1, T0 + 60)
        fresh = [self.delivery() for _ in range(3)]
        report = self.delivery(kind=KIND_ERRBACK, url="https://example.com/errors", idempotency_key="report-1")
        failed = Attempt(at=T0 + 1, status_code=500, error="HTTP 500")
        results = yield outcomes([
            store.add_deliveries([fresh[0]]),
            # A duplicate id: this one write fails, with the new row beside it.
            store.add_deliveries([fresh[1], attr.evolve(existing, url="https://other/")]),
            store.finish_attempt(claim.id, failed, FAILED, None, [report], claim_token=claim.claim_token),
            store.add_deliveries([fresh[2]]),
        ])
        # Queued in one turn, they share a batch: its statement failed, and it
        # ran again one write at a time, each in a savepoint of its own.
        self.assertEqual([ok for ok, _ in results], [True, False, True, True])
        self.assertIsNotNone((yield store.get_delivery(fresh[0].id)))
        self.assertIsNone((yield store.get_delivery(fresh[1].id)))
        self.assertIsNotNone((yield store.get_delivery(fresh[2].id)))
        self.assertEqual((yield store.get_delivery(existing.id)).attempts, (failed,))
        self.assertEqual((yield store.get_delivery(report.id)), report)
        self.assertEqual((yield store.find_idempotency_key("report-1", None)), report.id)

    @inlineCallbacks
    def test_a_duplicate_among_concurrent_dispatches_fails_alone(self) -> _Gen:
        store = yield self.openStore()
        existing = self.delivery()
        yield store.add_deliveries([existing])
        fresh = [self.delivery(idempotency_key=f"k{i}") for i in range(3)]
        results = yield outcomes([
            store.add_deliveries([fresh[0]]),
            store.add_deliveries([fresh[1], attr.evolve(existing, url="https://other/")]),
            store.add_deliveries([fresh[2]]),
        ])
        self.assertEqual([ok for ok, _ in results], [True, False, True])
        self.assertIsNotNone((yield store.get_delivery(fresh[0].id)))
        self.assertIsNone((yield store.get_delivery(fresh[1].id)))
        self.assertIsNone((yield store.find_idempotency_key("k1", None)))
        self.assertEqual((yield store.find_idempotency_key("k2", None)), fresh[2].id)
        self.assertEqual((yield store.get_delivery(existing.id)), existing)

    @inlineCallbacks
    def test_writes_to_one_delivery_in_one_batch_apply_in_the_order_queued(self) -> _Gen:
        store = yield self.openStore()
        (d,) = yield self.claimed(store, 1)
        retry = Attempt(at=T0 + 1, status_code=503, error="HTTP 503")
        ok = Attempt(at=T0 + 2, status_code=200)
        results = yield outcomes([
            store.finish_attempt(d.id, retry, SCHEDULED, T0 + 5, claim_token=d.claim_token),
            # The same claim again: it was released by the outcome before.
            store.finish_attempt(d.id, ok, DELIVERED, None, claim_token=d.claim_token),
            # Without a token (a store of one deliverer): after the first.
            store.finish_attempt(d.id, ok, DELIVERED, None),
        ])
        self.assertEqual(results[0], (True, None))
        self.assertFalse(results[1][0])
        results[1][1].trap(ClaimLost)
        self.assertEqual(results[2], (True, None))
        got = yield store.get_delivery(d.id)
        self.assertEqual((got.status, got.attempts), (DELIVERED, (retry, ok)))

    @inlineCallbacks
    def test_a_claim_queued_with_an_outcome_sees_it(self) -> _Gen:
        store = yield self.openStore()
        (d,) = yield self.claimed(store, 1)
        retry = Attempt(at=T0 + 1, status_code=503, error="HTTP 503")
        finished = store.finish_attempt(d.id, retry, SCHEDULED, T0 + 2, claim_token=d.claim_token)
        claim = store.claim_due(T0 + 2, 10, T0 + 60)
        yield finished
        (again,) = yield claim
        # Claimed again in the transaction that stored the attempt, with it.
        self.assertEqual(
            self.transactions("attempts", "delivery_id", [d.id]) | self.transactions("deliveries", "id", [d.id]),
            self.transactions("attempts", "delivery_id", [d.id]),
        )
        self.assertEqual((again.id, again.attempts, again.status), (d.id, (retry,), DELIVERING))
        self.assertNotEqual(again.claim_token, d.claim_token)

    @inlineCallbacks
    def test_many_concurrent_dispatches_take_few_transactions(self) -> _Gen:
        store = yield self.openStore()
        deliveries = [self.delivery(idempotency_key=f"k{i}") for i in range(300)]
        yield outcomes([store.add_deliveries([d]) for d in deliveries])
        self.assertEqual(len(self.transactions("deliveries", "id", [d.id for d in deliveries])), 1)
        counts = yield store.count_deliveries()
        self.assertEqual(counts[SCHEDULED], 300)
        self.assertEqual((yield store.find_idempotency_key("k299", None)), deliveries[299].id)

    @inlineCallbacks
    def test_a_delivery_inserted_claimed_gets_its_lease_on_the_database_clock(self) -> _Gen:
        # A node whose clock is an hour fast inserts a delivery it claims
        # for 60 s: the lease ends 60 s from the database's now.
        skewed = SkewedReactor(3600.0)
        store = yield self.openStore(clock="database", reactor=skewed)
        d = self.delivery(status=DELIVERING, claimed_until=skewed.seconds() + 60, claim_token="mine")
        yield store.add_deliveries([d])
        now = time.time()
        got = yield store.get_delivery(d.id)
        self.assertGreater(got.claimed_until, now + 30)
        self.assertLess(got.claimed_until, now + 90)
