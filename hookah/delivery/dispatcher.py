"""
The dispatcher: claims due deliveries, sends them, and records what came of it.

It owns the delivery lifecycle after storage has accepted a delivery:
attempts, the retry decision (``hookah.delivery.retry``), and the follow-up reports
(errback on final failure, callback with the target's response on success),
which are deliveries of their own. It keeps no queue in memory: storage is
the queue, so a killed process loses nothing but the attempts in flight,
whose claims expire and are taken up again.
"""

from __future__ import annotations

import base64
import json
import os
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hookah import defaults
from hookah.listeners import IDeliveryOutcomeListener, IDueDeliveryListener
from hookah.outbound.outcome import Response, describe_failure
from hookah.outbound.interface import IHTTPClient
from hookah.metrics import Metrics, result_class
from hookah.model import (
    DELIVERED,
    DELIVERING,
    FAILED,
    KIND_CALLBACK,
    KIND_DISPATCH,
    KIND_ERRBACK,
    SCHEDULED,
    Attempt,
    Delivery,
    DeliveryKind,
)
from hookah.delivery.hosts import BUSY, DEFER, GO, PAUSED, WAIT, HostGate
from hookah.delivery.lease import covers, lease_until
from hookah.delivery.outage import log_store_failure
from hookah.delivery.waiting import why_waiting
from hookah.delivery.retry import Decision, decide
from hookah.delivery.signing import Signer
from hookah.urls import TargetRefused, host_key
from hookah.storage.interface import ClaimLost, IStore

log = Logger()

_NEVER = float("inf")
# Intake.when_stored's default result: the deliveries stored.
_DELIVERIES = object()


def _tell(_: object, listener: IDeliveryOutcomeListener, delivery: Delivery) -> Any:
    return listener.delivery_finished(delivery)


@attr.s(auto_attribs=True, frozen=True, eq=False)
class Intake:
    """
    New deliveries as the dispatcher wants them stored (``Dispatcher.intake``),
    and what it does once the caller's write of them is done.

    ``deliveries`` holds the given ones in order, those due now claimed by
    this dispatcher (``delivering``, with a lease) and those of a busy host
    pushed back. The caller stores exactly these, in its own transaction
    (an event with its notifications, an attempt's outcome with its
    report), and hands that write's Deferred to ``when_stored``.
    """

    deliveries: List[Delivery]
    _dispatcher: Dispatcher
    # (delivery, its slot, its host) for each claimed one.
    _claimed: List[Tuple[Delivery, Deferred, str]]

    def when_stored(self, write: Deferred, result: Any = _DELIVERIES) -> Deferred:
        """
        Once ``write`` succeeds, send the claimed deliveries at once (no
        round trip through the due-queue); if it fails, free their slots
        and pass the failure on. Deferred[List[Delivery]]: ``deliveries``,
        or ``result`` when given (a caller's answer, without a callback of
        its own to make it).
        """
        return write.addCallbacks(self._stored, self._not_stored, callbackArgs=(result,))

    def _stored(self, _: object, result: Any) -> Any:
        self._dispatcher._stored(self._claimed, self.deliveries)
        return self.deliveries if result is _DELIVERIES else result

    def _not_stored(self, failure: Failure) -> Failure:
        self._dispatcher._not_stored(self._claimed)
        return failure


@implementer(IDueDeliveryListener)
class Dispatcher(Service):
    """
    Delivers what storage holds. ``intake`` is the fast path for deliveries
    due now: their creator stores them already claimed, and they are sent
    as soon as the write commits, with no round trip through the due-queue.

    The dispatcher writes only its own work (claims, attempts, outcomes and
    the reports they promise); what new deliveries are stored, and with what
    (an event, an idempotency key), is its callers' decision.
    """

    name = "dispatcher"

    def __init__(
        self,
        store: IStore,
        client: IHTTPClient,
        clock: IReactorTime,
        new_id: Callable[[], str],
        schedule: Sequence[float],
        timeout: float = defaults.TIMEOUT,
        concurrency: int = defaults.CONCURRENCY,
        poll_interval: float = 5.0,
        signer: Optional[Signer] = None,
        rand: Callable[[], float] = random.random,
        metrics: Optional[Metrics] = None,
        hosts: Optional[HostGate] = None,
        outcome_listeners: Sequence[IDeliveryOutcomeListener] = (),
        lease: Optional[float] = None,
    ) -> None:
        self.store = store
        self.client = client
        self.clock = clock
        self.new_id = new_id
        self.schedule = tuple(schedule)
        self.timeout = timeout
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.signer = signer
        self.hosts = hosts if hosts is not None else HostGate(clock)
        self.rand = rand
        self.metrics = metrics or Metrics()
        # Told of each delivery that reached a final state, its attempts
        # included (WebSub ends a subscription on 410).
        self.outcome_listeners = tuple(outcome_listeners)
        # How long a claim lasts: ``lease`` seconds on a store several nodes
        # share (renewed all along while held, by hookah.delivery.renewal);
        # otherwise hookah.delivery.lease's rule.
        self.lease = lease
        # The claim token of each delivery in flight: outcomes are written
        # with it, so a claim another node took over is never overwritten.
        # The newest claim this dispatcher was handed on it (``_adopt``).
        self._tokens: Dict[str, Optional[str]] = {}
        self._in_flight: Dict[str, Deferred] = {}
        # Deliveries whose outcome or hand-back this dispatcher is writing:
        # the write ends the claim in the store before its answer arrives
        # here, so a renewal that finds it gone meanwhile lost nothing
        # (``still_holds``). Until ``_release``.
        self._ending: Set[str] = set()
        # Tallies of metric children by label value (attempts by status
        # code, finished deliveries by status), made once each.
        self._attempt_counters: Dict[Optional[int], Any] = {}
        self._outcome_counters: Dict[str, Any] = {}
        self._timer: Optional[IDelayedCall] = None
        self._polling = False
        self._poll_again = False
        self._starved = False
        # The earliest time a row may be due, as far as this dispatcher
        # knows: learnt from storage after a poll that left room, lowered by
        # every row it stores for later (deferrals, retries, rows it had no
        # room for). None: unknown, so a freed slot polls at once. With it, a
        # finished attempt does not cost a claim and a next-due query when
        # nothing is waiting in storage (two of the four store round trips
        # per webhook under a steady load).
        self._due_at: Optional[float] = None
        # The same, for rows stored while a poll is out (its answer may
        # predate them).
        self._due_during_poll = _NEVER
        # Fires when the poll in progress ends: stopping waits for it, so
        # storage is not closed under a claim.
        self._poll_finished: Optional[Deferred] = None

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._wake()

    def stopService(self) -> Deferred:
        """Stop claiming; let attempts in flight finish and record their outcome."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        now = self.clock.seconds()
        for delivery, slot in self.hosts.drain_waiting():
            self._defer(delivery, slot, now, None)
        waits = list(self._in_flight.values())
        if self._poll_finished is not None:
            waits.append(self._poll_finished)
        return DeferredList(waits, consumeErrors=True).addCallback(
            lambda _: None
        )

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def waiting(self, delivery: Delivery) -> Optional[Dict[str, Any]]:
        """Why a scheduled delivery is not attempted yet (``hookah.delivery.waiting``)."""
        return why_waiting(delivery, self.clock.seconds(), self.hosts)

    def _lease_from(self, now: float, timeout: Optional[float]) -> float:
        """The end of a claim taken at ``now`` for an attempt with this timeout (the default: ``None``)."""
        if self.lease is not None:
            return now + self.lease
        return lease_until(now, timeout or self.timeout)

    def claims(self) -> List[Any]:
        """(delivery id, claim token) of every claim held now, for lease renewal."""
        return [(i, t) for i, t in self._tokens.items() if t is not None]

    def still_holds(self, delivery_id: str, token: str) -> bool:
        """
        Whether the claim ``token`` on the delivery is still this
        dispatcher's to keep: not ended by its own outcome or hand-back
        (written, or being written), nor replaced by a newer claim it
        adopted. A renewal that finds such a claim gone in the store lost
        nothing; one that finds a claim held this way gone, lost it to
        another deliverer.
        """
        return self._tokens.get(delivery_id) == token and delivery_id not in self._ending

    def wake(self) -> None:
        """Look for due work now (another node announced some)."""
        self._wake()

    # -- intake ----------------------------------------------------------------

    def intake(self, deliveries: Sequence[Delivery]) -> Intake:
        """
        Take new ``deliveries`` about to be stored: claim those due now
        (within the concurrency limit and their host's room) and push back
        those of a busy host. The caller stores ``Intake.deliveries`` and
        passes its write to ``Intake.when_stored``.
        """
        now = self.clock.seconds()
        room = self.concurrency - len(self._in_flight) if self.running else 0
        stored: List[Delivery] = []
        start_now: List[Tuple[Delivery, str]] = []
        # An event's notifications come in hundreds, often to few hosts: each
        # host's room is asked once and counted down here (each place taken
        # lowers it by one), the lease is reckoned once for the default
        # timeout, and the claim tokens come from one draw of randomness.
        rooms: Dict[str, int] = {}
        reserved: Dict[str, int] = {}
        lease = self._lease_from(now, None)
        tokens = os.urandom(16 * min(room, len(deliveries))).hex() if room > 0 else ""
        for delivery in deliveries:
            due = delivery.next_attempt_at is None or delivery.next_attempt_at <= now
            if due and room > 0 and delivery.status == SCHEDULED:
                host = host_key(delivery.url)
                left = rooms.get(host)
                if left is None:
                    left = self.hosts.room(host)
                if left > 0:
                    # Its place at the host is held from now until the write
                    # commits and it starts (or waits): the intakes of a burst
                    # that are still being written count against the host's
                    # room, so none is claimed only to find the host full.
                    rooms[host] = left - 1
                    reserved[host] = reserved.get(host, 0) + 1
                    taken = 32 * len(start_now)
                    delivery = delivery.replace(
                        status=DELIVERING,
                        claimed_until=lease if delivery.timeout is None else self._lease_from(now, delivery.timeout),
                        claim_token=tokens[taken : taken + 32],
                    )
                    start_now.append((delivery, host))
                    room -= 1
                else:
                    # Its host is busy or paused: stored already pushed back,
                    # rather than claimed now only to be put back at once.
                    rooms[host] = left
                    at, why = self._deferral(host)
                    delivery = delivery.replace(next_attempt_at=at, deferred=why)
            stored.append(delivery)
        for host, count in reserved.items():
            self.hosts.reserve(host, count)
        return Intake(stored, self, [(d, self._reserve(d.id), host) for d, host in start_now])

    def _stored(self, claimed: List[Tuple[Delivery, Deferred, str]], deliveries: List[Delivery]) -> None:
        for delivery, slot, host in claimed:
            self._dispatch(delivery, slot, host, reserved=True)
        if len(claimed) < len(deliveries):
            started = {d.id for d, _, _ in claimed}
            now = self.clock.seconds()
            self._note_due(min(
                now if d.next_attempt_at is None else d.next_attempt_at for d in deliveries if d.id not in started
            ))

    def _not_stored(self, claimed: List[Tuple[Delivery, Deferred, str]]) -> None:
        for delivery, slot, host in claimed:
            self.hosts.unreserve(host)
            self._release(delivery.id, slot)

    def deliveries_due(self) -> None:
        """``IDueDeliveryListener``: a delivery became due outside the claim loop."""
        self._wake()

    def _reserve(self, delivery_id: str) -> Deferred:
        slot: Deferred = Deferred()
        self._in_flight[delivery_id] = slot
        self._ending.discard(delivery_id)
        return slot

    def _release(self, delivery_id: str, slot: Deferred, wake: bool = True) -> None:
        if self._in_flight.get(delivery_id) is slot:
            del self._in_flight[delivery_id]
            self._tokens.pop(delivery_id, None)
            self._ending.discard(delivery_id)
        slot.callback(None)
        if self._starved:
            # A poll that found no room armed no timer: the first slot
            # freed afterwards, of whatever kind, must restart the loop.
            self._starved = False
            self._wake()
        elif wake:
            self._resume()

    # -- the claim loop --------------------------------------------------------

    def _wake(self) -> None:
        """
        Look for due work soon; many wake-ups in one turn make one poll.
        What was known about due rows is forgotten: a wake-up from outside
        (a retry asked for, another node's rows) may mean anything.
        """
        self._due_at = None
        self._set_timer(self.clock.seconds())

    def _resume(self) -> None:
        """A slot is free: poll at once only if a row may be due by now."""
        if self._due_at is None:
            self._wake()
        else:
            self._set_timer(min(self._due_at, self.clock.seconds() + self.poll_interval))

    def _stored_for(self, result: Any, at: float) -> Any:
        self._note_due(at)
        return result

    def _note_due(self, at: float) -> None:
        """A row this dispatcher stored becomes due at ``at``."""
        self._due_during_poll = min(self._due_during_poll, at)
        if self._due_at is not None:
            self._due_at = min(self._due_at, at)
        self._set_timer(at)

    def _set_timer(self, at: float) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= at:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._poll)

    def _poll(self) -> None:
        self._timer = None
        if self._polling:
            self._poll_again = True
            return
        room = self.concurrency - len(self._in_flight)
        if not self.running:
            return
        if room <= 0:
            self._starved = True
            return
        self._polling = True
        self._poll_finished = Deferred()
        self._due_during_poll = _NEVER
        now = self.clock.seconds()
        # Claimed for an attempt at the default timeout; one with a longer
        # timeout of its own has its claim renewed before it is sent (or,
        # on a shared store, all along by the lease renewer).
        d = self.store.claim_due(now, room, now + self.lease if self.lease is not None else lease_until(now, self.timeout))
        d.addCallback(self._claimed, room)
        d.addErrback(lambda f: log_store_failure(log, f, "claiming due deliveries failed"))
        d.addBoth(self._polled)

    def _claimed(self, deliveries: List[Delivery], room: int) -> Deferred:
        fresh = []
        for delivery in deliveries:
            if delivery.id in self._in_flight:
                self._adopt(delivery)
            else:
                fresh.append(delivery)
        if not self.running:
            # Stopped while claiming: hand the claims back, start nothing.
            now = self.clock.seconds()
            return DeferredList(
                [self.store.reschedule(d.id, now, claim_token=d.claim_token) for d in fresh],
                consumeErrors=True,
            )
        for delivery in fresh:
            if self._dispatch(delivery, self._reserve(delivery.id)) == DEFER:
                # Rows of a busy or paused host came first: claim the next
                # ones at once rather than leave other hosts' rows waiting
                # behind its backlog (each deferred row is out of the way).
                self._poll_again = True
        if len(deliveries) >= room:
            # More may be due: the next free slot polls again.
            self._due_at = None
            return succeed(None)
        return self.store.next_due().addCallback(self._sleep_until)

    def _adopt(self, claimed: Delivery) -> None:
        """
        The store handed us a new claim on a delivery we still hold: our
        claim ran out while its attempt was in flight (or held for its
        host), or the answer to our hand-back arrived after the claim that
        followed it. The store now knows only the new claim, and it is ours:
        the old token's writes are refused (``finish_attempt`` fails with
        ``ClaimLost``, ``reschedule`` does nothing, in every store), and no
        one else will attempt the delivery before the new lease runs out.

        So the work in flight carries on under the new claim rather than
        starting a second attempt or handing the claim back: handed back,
        it would be claimed again at once (a spin for as long as the attempt
        lasts), the attempt's outcome would be refused, and the delivery
        sent twice. Each write reads the token when it is made (``_finish``,
        ``_reschedule``); one made under the old token before this claim
        arrived is made again under the new one if the store refused it, or
        the new claim is handed back if the old write was stored first (its
        row came due again and was claimed after it).
        """
        self._tokens[claimed.id] = claimed.claim_token
        log.warn(
            "{id} was claimed again while its attempt was in flight (its claim ran out):"
            " the attempt carries on under the new claim",
            id=claimed.id,
        )

    def _sleep_until(self, due: Optional[float]) -> None:
        self._due_at = min(_NEVER if due is None else due, self._due_during_poll)
        self._set_timer(min(self._due_at, self.clock.seconds() + self.poll_interval))

    def _polled(self, _: object) -> None:
        self._polling = False
        finished, self._poll_finished = self._poll_finished, None
        if finished is not None:
            finished.callback(None)
        if self._poll_again:
            self._poll_again = False
            self._wake()
        elif self.running and self._timer is None and len(self._in_flight) < self.concurrency:
            self._set_timer(self.clock.seconds() + self.poll_interval)

    # -- one attempt -----------------------------------------------------------

    def _dispatch(self, delivery: Delivery, slot: Deferred, host: Optional[str] = None, reserved: bool = False) -> str:
        """
        Send now, hold for a free slot to its host (``host_key``, when not
        given), or push back in storage. ``reserved``: claimed at intake,
        with a place at its host held since (``HostGate.reserve``).
        """
        # A newer claim adopted while its intake was being written stands.
        self._tokens.setdefault(delivery.id, delivery.claim_token)
        if host is None:
            host = host_key(delivery.url)
        if delivery.deferred == PAUSED:
            # Held by a pause, perhaps one from before a restart: a host
            # this process has not seen yet is probed before the rest go.
            self.hosts.resume(host)
        verdict = self.hosts.admit(host, reserved)
        if verdict == GO:
            self._send(delivery, slot, host)
        elif verdict == WAIT:
            self.hosts.hold(host, (delivery, slot))
        else:
            self._defer(delivery, slot, *self._deferral(host))
        return verdict

    def _defer(self, delivery: Delivery, slot: Deferred, at: float, why: Optional[str]) -> None:
        """
        Put a claimed delivery back in storage until ``at``. The freed slot
        does not wake the claim loop: the rows due next are likely the same
        busy host's, and claiming them only to put them back would spin.
        """
        d = self._reschedule(delivery.id, at, why)
        d.addCallback(lambda _: self._note_due(at))
        d.addErrback(lambda f: log_store_failure(log, f, "deferring {id} failed", id=delivery.id))
        d.addBoth(lambda _: self._release(delivery.id, slot, wake=False))

    def _reschedule(self, delivery_id: str, at: float, why: Optional[str]) -> Deferred:
        """
        Hand back the claim held on a delivery in flight, until ``at``. A
        newer claim adopted while the store wrote it (``_adopt``) is handed
        back the same way: the old token's hand-back either did nothing
        (the new claim came first) or was stored before the row was claimed
        again; either way the store holds the newer claim now.
        """
        token = self._tokens.get(delivery_id)
        self._ending.add(delivery_id)
        d = self.store.reschedule(delivery_id, at, why, claim_token=token)
        d.addCallback(self._rescheduled, delivery_id, at, why, token)
        return d

    def _rescheduled(self, _: object, delivery_id: str, at: float, why: Optional[str], token: Optional[str]) -> Any:
        if self._tokens.get(delivery_id, token) != token:
            return self._reschedule(delivery_id, at, why)
        return None

    def _finish(
        self, delivery_id: str, attempt: Attempt, status: str, next_attempt_at: Optional[float], follow_ups: Sequence[Delivery]
    ) -> Deferred:
        """
        Write an attempt's outcome under the claim held on its delivery. If
        a newer claim was adopted while the store wrote it (``_adopt``): an
        outcome refused as the old claim's is written again under the new
        one; one stored first (so the row came due again and was claimed
        after it) leaves the new claim to hand back, due now.
        """
        token = self._tokens.get(delivery_id)
        self._ending.add(delivery_id)
        d = self.store.finish_attempt(delivery_id, attempt, status, next_attempt_at, follow_ups, claim_token=token)
        d.addCallbacks(
            self._finished, self._finish_refused,
            callbackArgs=(delivery_id, token),
            errbackArgs=(delivery_id, attempt, status, next_attempt_at, follow_ups, token),
        )
        return d

    def _finished(self, _: object, delivery_id: str, token: Optional[str]) -> Optional[Deferred]:
        if self._tokens.get(delivery_id, token) == token:
            return None
        now = self.clock.seconds()
        d = self._reschedule(delivery_id, now, None)
        d.addCallback(lambda _: self._note_due(now))
        # The outcome is stored: a failed hand-back is logged as such (the
        # claim then runs out), not as a failed outcome. The slot is held
        # until the hand-back is written, so a stop waits for it.
        d.addErrback(lambda f: log_store_failure(log, f, "handing back {id} failed", id=delivery_id))
        return d

    def _finish_refused(
        self, failure: Failure, delivery_id: str, attempt: Attempt, status: str, next_attempt_at: Optional[float],
        follow_ups: Sequence[Delivery], token: Optional[str],
    ) -> Any:
        if failure.check(ClaimLost) and self._tokens.get(delivery_id, token) != token:
            return self._finish(delivery_id, attempt, status, next_attempt_at, follow_ups)
        return failure

    def _deferral(self, host: str) -> Tuple[float, str]:
        """
        When a delivery its host cannot take now should come back, and why:
        the end of its host's pause (``PAUSED``), or its turn in a busy
        host's backlog (``BUSY``), which ``HostGate.retry_at`` spreads at
        the host's pace.
        """
        if self.hosts.paused_until(host) is not None:
            return self._pause_end(host), PAUSED
        return self.hosts.retry_at(host), BUSY

    def _pause_end(self, host: str) -> float:
        paused_until = self.hosts.paused_until(host)
        if paused_until is not None and paused_until > self.clock.seconds():
            # Spread over a second so a host that comes back is not met by
            # its whole backlog at once.
            return paused_until + self.rand()
        # Its probe is out: back shortly after it should have answered.
        return self.hosts.retry_at(host)

    def _send(self, delivery: Delivery, slot: Deferred, host: str) -> None:
        self.hosts.started(host)
        timeout = delivery.timeout or self.timeout
        started = self.clock.seconds()
        if self.lease is None and not covers(delivery.claimed_until, started, timeout):
            # Renewed before the attempt can outlast it, so no one claims it
            # again while it is in flight (the renewal commits long before
            # the old claim runs out).
            renewed = self.store.renew_claim(delivery.id, lease_until(started, timeout))
            renewed.addErrback(lambda f: log_store_failure(log, f, "renewing the claim on {id} failed", id=delivery.id))
        headers: List[Any] = []
        if delivery.content_type:
            headers.append(("Content-Type", delivery.content_type))
        headers.extend(delivery.headers)
        if self.signer is not None and delivery.kind == KIND_DISPATCH:
            headers.extend(self.signer.headers(delivery.id, started, delivery.body))
        # A client that raises instead of failing its Deferred must still
        # end the attempt and free the slot and host counter.
        try:
            d = self.client.request("POST", delivery.url, headers, delivery.body, timeout)
        except Exception:
            d = fail()
        # One callback for the whole outcome (rather than a chain of four):
        # this runs once per webhook.
        d.addBoth(self._outcome, delivery, slot, host, started, timeout)

    def _outcome(self, outcome: Any, delivery: Delivery, slot: Deferred, host: str, started: float, timeout: float) -> None:
        """
        An attempt came back: free its host's slot, record the outcome,
        then free the dispatcher's slot once the record is written (or
        failed). A bug in tallying the host makes the attempt a failure,
        as a failed request would be.
        """
        try:
            self._host_finished(outcome, host, started)
        except Exception:
            outcome = Failure()
        try:
            recorded = self._attempted(outcome, delivery, started, timeout)
        except Exception:
            self._not_recorded(Failure(), delivery, slot)
            return None
        recorded.addCallbacks(self._recorded, self._not_recorded, callbackArgs=(delivery, slot), errbackArgs=(delivery, slot))
        return None

    def _recorded(self, _: object, delivery: Delivery, slot: Deferred) -> None:
        self._release(delivery.id, slot)

    def _not_recorded(self, failure: Failure, delivery: Delivery, slot: Deferred) -> None:
        try:
            log_store_failure(log, failure, "recording an attempt of {id} failed", id=delivery.id)
        finally:
            self._release(delivery.id, slot)

    def _host_finished(self, outcome: Any, host: str, started: float) -> Any:
        if isinstance(outcome, Failure):
            healthy = bool(outcome.check(TargetRefused))
        else:
            healthy = outcome.code < 500 and outcome.code != 429
        self.hosts.finished(host, healthy, started)
        if self.hosts.paused_until(host) is not None:
            for delivery, slot in self.hosts.drain_waiting(host):
                self._defer(delivery, slot, self._pause_end(host), PAUSED)
        else:
            held = self.hosts.next_waiting(host)
            if held is not None:
                waiting_delivery, waiting_slot = held
                if self.running:
                    self._send(waiting_delivery, waiting_slot, host)
                else:
                    self._defer(waiting_delivery, waiting_slot, self.clock.seconds(), None)
        return outcome

    def _attempted(self, outcome: Any, delivery: Delivery, started: float, timeout: float) -> Deferred:
        now = self.clock.seconds()
        duration_ms = int(round((now - started) * 1000))
        refused = isinstance(outcome, Failure) and outcome.check(TargetRefused)
        if isinstance(outcome, Failure):
            response = None
            error: Optional[str] = str(outcome.value) if refused else describe_failure(outcome, timeout)
            attempt = Attempt(started, None, error, duration_ms)
        else:
            response = outcome
            error = None if 200 <= response.code < 300 else f"HTTP {response.code}"
            attempt = Attempt(started, response.code, error, duration_ms)
        retries = delivery.retries if delivery.retries is not None else len(self.schedule)
        decision = Decision(FAILED, reason=attempt.error or "") if refused else decide(
            status_code=attempt.status_code,
            # Only a 429 or a 503 reads it: no header scan per success.
            retry_after=response.header("Retry-After") if response is not None and response.code in (429, 503) else None,
            attempts_made=len(delivery.current_attempts) + 1,
            retries=retries,
            schedule=self.schedule,
            now=now,
            rand=self.rand,
        )
        # prometheus_client's labels() hashes and locks on every call; the
        # few label values there are are looked up once.
        attempts = self._attempt_counters.get(attempt.status_code)
        if attempts is None:
            attempts = self._attempt_counters[attempt.status_code] = self.metrics.tally(
                self.metrics.attempts.labels(result_class(attempt.status_code))
            )
        attempts.inc()
        self.metrics.attempt_timings.observe(now - started)
        if decision.final:
            finished_counter = self._outcome_counters.get(decision.status)
            if finished_counter is None:
                finished_counter = self._outcome_counters[decision.status] = self.metrics.tally(
                    self.metrics.deliveries.labels(decision.status)
                )
            finished_counter.inc()
        if decision.status != DELIVERED:
            # Successes are counted in the metrics and kept in storage; a log
            # line each would cost more than the rest of the bookkeeping.
            log.info(
                "attempt of {id} to {url}: {outcome} in {ms}ms, now {status}",
                id=delivery.id,
                url=delivery.url,
                outcome=attempt.status_code or attempt.error,
                ms=duration_ms,
                status=decision.status,
            )
        told = [listener for listener in self.outcome_listeners if listener.wants(delivery, attempt)] if decision.final else []
        report_response = decision.status == DELIVERED and bool(delivery.callback) and response is not None
        report_failure = decision.status == FAILED and bool(delivery.errback)
        follow_ups: List[Delivery] = []
        if told or report_response or report_failure:
            # The finished record only for whoever reads it (one per
            # delivery cost 6 % of the reactor thread in a WebSub fan-out).
            finished = delivery.replace(attempts=delivery.attempts + (attempt,), status=decision.status, deferred=None)
            if report_response and response is not None:
                follow_ups.append(self._callback_delivery(finished, response))
            elif report_failure:
                follow_ups.append(self._errback_delivery(finished, decision.reason))
        if follow_ups:
            # The report is stored with the outcome, in one transaction: a
            # kill cannot leave a failed delivery whose errback was never
            # queued. It is sent at once, like any new delivery.
            intake = self.intake(follow_ups)
            d: Deferred = intake.when_stored(
                self._finish(delivery.id, attempt, decision.status, decision.next_attempt_at, intake.deliveries)
            )
        else:
            d = self._finish(delivery.id, attempt, decision.status, decision.next_attempt_at, ())
        if decision.next_attempt_at is not None:
            d.addCallback(self._stored_for, decision.next_attempt_at)
        for listener in told:
            d.addCallback(_tell, listener, finished)
        d.addErrback(self._claim_lost, delivery)
        return d

    def _claim_lost(self, failure: Failure, delivery: Delivery) -> None:
        """Another deliverer took this delivery over: its outcome stands, ours was a duplicate."""
        failure.trap(ClaimLost)
        self.metrics.claims_lost.inc()
        log.warn(
            "attempt of {id} to {url} was a duplicate: its claim was taken over (lease ran out)",
            id=delivery.id, url=delivery.url,
        )

    # -- reports: errback and callback -----------------------------------------

    def _follow_up(self, parent: Delivery, kind: DeliveryKind, url: str, body: bytes, content_type: str, headers: Sequence[Any]) -> Delivery:
        return Delivery(
            id=self.new_id(),
            url=url,
            body=body,
            content_type=content_type,
            headers=tuple(headers) + (("X-Hookah-Delivery-Id", parent.id),),
            created_at=self.clock.seconds(),
            next_attempt_at=self.clock.seconds(),
            kind=kind,
            parent_id=parent.id,
            timeout=parent.timeout,
        )

    def _errback_delivery(self, failed: Delivery, reason: str) -> Delivery:
        report = {
            "id": failed.id,
            "url": failed.url,
            "status": FAILED,
            "reason": reason,
            "kind": failed.kind,
            "topic": failed.topic,
            "event_id": failed.event_id,
            "attempts": [a.to_json() for a in failed.attempts],
        }
        body = json.dumps(report).encode()
        return self._follow_up(failed, KIND_ERRBACK, failed.errback or "", body, "application/json", ())

    def _callback_delivery(self, delivered: Delivery, response: Response) -> Delivery:
        """
        The target's response as JSON: its content type is a field, and the
        body travels as text when it is UTF-8 and as base64 otherwise, so any
        response reaches the callback intact and self-describing.
        """
        try:
            body, encoding = response.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(response.body).decode("ascii"), "base64"
        report = {
            "id": delivered.id,
            "url": delivered.url,
            "status_code": response.code,
            "headers": [list(h) for h in response.headers],
            "content_type": response.header("Content-Type"),
            "body": body,
            "encoding": encoding,
            "truncated": response.truncated,
        }
        return self._follow_up(
            delivered, KIND_CALLBACK, delivered.callback or "", json.dumps(report).encode(), "application/json", ()
        )
