"""
``PostgresStore``'s claims under group commit: with claims, hand-backs and
outcomes queued at once and two transactions in flight, every row the
database shows as claimed was returned to exactly one ``claim_due`` caller
(a claim whose rows reach nobody leaves them stuck until the lease runs out).
Through the store's interface, on a fresh database of the throwaway cluster.
"""

from __future__ import annotations

from typing import Any, Dict, Generator, List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks

from hookah.model import DELIVERED, Attempt, Delivery
from tests.pgstoresupport import PostgresStoreCase
from tests.storecontract import T0

_Gen = Generator[Deferred[Any], Any, None]


class PostgresClaimTests(PostgresStoreCase):
    def claimedInDatabase(self) -> Dict[str, str]:
        """Every row the database shows as claimed: id -> claim token."""
        found = self.admin("SELECT id, claim_token FROM deliveries WHERE status = 'delivering'")
        return {row[0]: row[1] for row in found}

    @inlineCallbacks
    def test_every_claimed_row_reaches_exactly_one_caller(self) -> _Gen:
        store = yield self.openStore(clock="database")
        yield store.add_deliveries([self.delivery() for _ in range(300)])
        # id -> token of the claims callers hold (each returned once).
        held: Dict[str, str] = {}
        returned: List[Tuple[str, str]] = []
        ok = Attempt(at=T0 + 1, status_code=200, duration_ms=1)

        def took(claims: List[Delivery]) -> None:
            for d in claims:
                assert d.claim_token is not None
                returned.append((d.id, d.claim_token))
                held[d.id] = d.claim_token

        for round in range(60):
            ds: List[Deferred[Any]] = []
            # Hand back (busy host) or finish what is held, and claim again,
            # all queued in one turn: they share the batches in flight.
            for i, (id, token) in enumerate(sorted(held.items())):
                del held[id]
                if (i + round) % 3:
                    ds.append(store.reschedule(id, T0, "host_busy", claim_token=token))
                else:
                    ds.append(store.finish_attempt(id, ok, DELIVERED, None, claim_token=token))
            for _ in range(4):
                ds.append(store.claim_due(T0 + 1, 7, T0 + 60).addCallback(took))
            results = yield DeferredList(ds, consumeErrors=True)
            failures = [r for success, r in results if not success]
            self.assertEqual(failures, [])
        ids = [i for i, _ in returned]
        self.assertEqual(len(ids), len(set(returned)))
        # The database's claims are exactly the ones callers still hold.
        self.assertEqual(self.claimedInDatabase(), held)

    @inlineCallbacks
    def test_a_claim_reports_a_row_only_after_its_hand_back_reported(self) -> _Gen:
        """
        A claim in one transaction takes a row the other transaction in
        flight handed back, as soon as that one commits; here the claim's
        thread reports first. Its caller must hear of the hand-back first:
        a dispatcher still holding the row until then takes the claim for
        its own, drops it, and the row waits out the lease.
        """
        # Held: the reports of the three hand-backs' batch and the claim's
        # (not those of a batch of NOTIFY, say).
        gated = GatedReactor(lambda outcomes: len(outcomes) == 3 or isinstance(outcomes[0][1], list))
        store = yield self.openStore(clock="database", reactor=gated, notify_interval=3600)
        yield store.add_deliveries([self.delivery() for _ in range(3)])
        claims = yield store.claim_due(T0, 3, T0 + 60)
        order: List[str] = []
        gated.gate = True
        for d in claims:
            store.reschedule(d.id, T0, "host_busy", claim_token=d.claim_token).addCallback(
                lambda _, id=d.id: order.append("handed back " + id)
            )
        # The hand-backs' transaction committed; its thread's report held.
        yield gated.held(1)
        # The claim's transaction, in flight beside it, takes those rows.
        claimed = store.claim_due(T0, 3, T0 + 60)
        claimed.addCallback(lambda ds: order.extend("claimed " + d.id for d in ds))
        yield gated.held(2)
        gated.release(reversed)
        yield claimed
        ids = sorted(d.id for d in claims)
        self.assertEqual(
            order, ["handed back " + id for id in ids] + ["claimed " + id for id in ids]
        )
        found = yield store.get_delivery(ids[0])
        self.assertEqual(found.deferred, "host_busy")


class GatedReactor:
    """
    The real reactor, but while ``gate`` is set the store's threads'
    reports of the batches ``hold`` picks (by their outcomes) are held
    until ``release``.
    """

    def __init__(self, hold: Any) -> None:
        self.hold = hold
        self.gate = False
        self.calls: List[Tuple[Any, Any, Any]] = []
        self.waiting: List[Tuple[int, Deferred[None]]] = []

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        if not (self.gate and args and isinstance(args[0], list) and args[0] and self.hold(args[0])):
            reactor.callFromThread(f, *args, **kwargs)  # type: ignore[attr-defined]
            return
        self.calls.append((f, args, kwargs))
        reactor.callFromThread(self.arrived)  # type: ignore[attr-defined]

    def arrived(self) -> None:
        for count, d in list(self.waiting):
            if len(self.calls) >= count:
                self.waiting.remove((count, d))
                d.callback(None)

    def held(self, count: int) -> Deferred[None]:
        """Fires once ``count`` reports are held."""
        d: Deferred[None] = Deferred()
        self.waiting.append((count, d))
        self.arrived()
        return d

    def release(self, order: Any) -> None:
        """Stop holding; deliver the held reports in ``order(held)``."""
        self.gate = False
        calls, self.calls = self.calls, []
        for f, args, kwargs in order(calls):
            f(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)
