"""
Lease renewal: a live node keeps the claims it holds.

On a store several nodes share, a claim is a short lease (``--claim-lease``)
so that a dead node's deliveries come back quickly. A live node renews the
leases of everything it holds (in flight, or waiting for a slot to its host)
every third of the lease, in one statement; a claim reported lost was taken
over by another node, whose outcome will stand (ours is then refused when
written: ``ClaimLost``).

A claim the store no longer has is not always lost: the dispatcher's own
outcome or hand-back may have ended it while the renewal was out (its
write commits before its answer reaches the dispatcher, which lists the
claim until then; on a loaded node, or one whose writes are grouped, that
is often). Only the claims the dispatcher still holds once the answer is
in (``Dispatcher.still_holds``) are reported lost.
"""

from __future__ import annotations

from typing import Any, List

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from hookah.delivery.dispatcher import Dispatcher
from hookah.storage.interface import IStore

log = Logger()


class LeaseRenewer(TimerService):
    """Renews the dispatcher's claims every ``lease / 3`` seconds."""

    name = "lease-renewer"

    def __init__(self, store: IStore, dispatcher: Dispatcher, clock: Any, lease: float) -> None:
        super().__init__(lease / 3.0, self.renew)
        self.clock = clock  # TimerService's LoopingCall runs on it
        self.now = clock.seconds
        self.store = store
        self.dispatcher = dispatcher
        self.lease = lease
        self.lost = 0

    def renew(self) -> Deferred:
        claims = self.dispatcher.claims()
        if not claims:
            return succeed(None)
        now = self.now()
        tokens = dict(claims)
        d = self.store.renew_claims(claims, now, now + self.lease)

        def renewed(gone: List[str]) -> None:
            lost = [i for i in gone if self.dispatcher.still_holds(i, tokens[i])]
            if lost:
                self.lost += len(lost)
                log.warn("{count} claims were lost before they could be renewed: {ids}",
                         count=len(lost), ids=", ".join(lost[:10]))

        d.addCallback(renewed)
        d.addErrback(lambda f: log.warn("renewing claims failed: {error}", error=f.getErrorMessage()))
        return d
