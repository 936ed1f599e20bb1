"""
The subscription side of the WebSub hub: verification of intent, leases,
denial, and the end of subscriptions (expiry, ``410 Gone``).

It owns one promise of the W3C WebSub Recommendation (5.1, 5.3): the state
of a (topic, callback) pair changes only after the subscriber has confirmed,
by echoing an unguessable challenge, that it asked for that change. A
request whose verification fails leaves the previous state exactly as it
was, and when requests for one pair race, the most recent request that was
verified wins, whatever order the verifications finish in.

When a subscription ends (verified unsubscribe, ``410 Gone``, lease
expiry), the notifications still queued for it are cancelled in storage
(``IStore.cancel_deliveries``), so a gone subscriber is not retried for a
day. A notification whose attempt was in flight at that moment finishes
that attempt; if it was then scheduled for a retry, a second cancellation,
one ``settle`` period later (on the next purge pass), ends it. Expired
leases are purged, and their notifications cancelled, every
``purge_interval`` seconds (60): that is how long a notification queued
for a subscription whose lease just ended can still be attempted.

The hub's background work is bounded: at most ``max_verifications`` (64)
verification or denial requests are in flight at once, and at most
``backlog`` (1024) more accepted requests wait for a turn or for a retry;
beyond that ``submit`` raises ``HubBusy`` (the web layer answers ``503``).

HTTP parsing lives in ``hookah.web.hub``; content distribution in
``hookah.websub.distributor`` and topic fetching in
``hookah.websub.publisher``. Every timer here runs on the injected clock,
so leases, retries and purges are tested with ``task.Clock``.
"""

from __future__ import annotations

import fnmatch
import re
import secrets
import string
from typing import Any, Coroutine, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlencode, urlsplit

import attr
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    ensureDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hookah import defaults
from hookah.listeners import IDeliveryOutcomeListener
from hookah.delivery.lease import lease_seconds
from hookah.outbound.outcome import describe_failure
from hookah.outbound.interface import IHTTPClient
from hookah.urls import AddressPolicy
from hookah.metrics import Metrics
from hookah.model import (
    CANCELLED_EXPIRED,
    CANCELLED_GONE,
    CANCELLED_UNSUBSCRIBED,
    TextEnum,
    KIND_WEBSUB,
    Attempt,
    Delivery,
    Subscription,
)
from hookah.urls import TargetRefused
from hookah.storage.interface import IStore

log = Logger()



class Mode(TextEnum):
    """The ``hub.mode`` of a request the hub verifies, or of a denial it sends (5.2)."""

    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    DENIED = "denied"


SUBSCRIBE = Mode.SUBSCRIBE
UNSUBSCRIBE = Mode.UNSUBSCRIBE
DENIED = Mode.DENIED


class Outcome(TextEnum):
    """What came of a request the hub handled (also the ``outcome`` label of the metric)."""

    VERIFIED = "verified"
    REJECTED = "rejected"  # the subscriber answered, and did not confirm
    UNREACHABLE = "unreachable"  # no answer, or one that says "try later"
    DENIED = "denied"  # refused by --topic-allow; the subscriber was told
    SENT = "sent"  # a denial reached the subscriber


VERIFIED = Outcome.VERIFIED
REJECTED = Outcome.REJECTED
UNREACHABLE = Outcome.UNREACHABLE

# Async verifications that got no usable answer are tried again after these
# many seconds (then given up): a subscriber restarting, or briefly
# overloaded, still gets its subscription.
VERIFY_RETRIES: Tuple[float, ...] = (5.0, 60.0, 300.0)

# ``hub.secret`` must be under 200 bytes (5.1).
MAX_SECRET_BYTES = 199

# Verification and denial requests in flight at once, and accepted requests
# allowed to wait beyond those (for a turn, or for a retry).
MAX_VERIFICATIONS = 64
VERIFY_BACKLOG = 1024
# What a refused (busy) subscriber is told to wait, in seconds.
BUSY_RETRY_AFTER = 30

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def decode_unreserved(url: str) -> str:
    """
    Decode the percent-escapes of unreserved characters (``%7E`` → ``~``),
    leaving reserved ones (``%2F``, ``%3F``...) escaped: 5.1.1 requires it,
    and it makes ``/a%7Eb`` and ``/a~b`` the same topic, as they are the
    same URL, while ``/a%2Fb`` stays distinct from ``/a/b``.
    """
    if "%" not in url:
        return url

    def replace(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else match.group(0)

    return _ESCAPE.sub(replace, url)


def clamp_lease(requested: Optional[int], bounds: Tuple[int, int, int]) -> int:
    """The lease granted: the default when none is asked, else within [min, max]."""
    minimum, default, maximum = bounds
    if requested is None:
        return default
    return max(minimum, min(maximum, requested))


def verification_url(callback: str, params: Sequence[Tuple[str, str]]) -> str:
    """
    The callback with ``params`` appended to its own query string with
    ``&`` (5.1.1: its parameters are kept, and never overwritten). A
    fragment is dropped: it is never sent in a request anyway.
    """
    base = callback.split("#", 1)[0]
    if "?" not in base:
        joiner = "?"
    elif base.endswith(("?", "&")):
        joiner = ""
    else:
        joiner = "&"
    return base + joiner + urlencode(list(params))


def new_challenge() -> str:
    """
    A single-use, unguessable challenge (32 bytes from ``secrets``). Its
    URL-safe base64 alphabet lies within the characters 5.3 allows.
    """
    return secrets.token_urlsafe(32)


class TopicPolicy:
    """
    Which topics the hub accepts (``--topic-allow``); all when empty.

    Each entry is a prefix, or a shell-style pattern when it contains ``*``,
    ``?`` or ``[`` (``https://*.example.com/*``). A prefix that is a bare
    origin (``https://example.com``, no path) matches that origin only, not
    ``https://example.com.evil.test/``, since that is what an operator who
    writes it means.
    """

    def __init__(self, allowed: Sequence[str] = ()) -> None:
        self.allowed = tuple(allowed)

    def refusal(self, topic: str) -> Optional[str]:
        """Why ``topic`` is refused, or ``None`` when it is allowed."""
        if not self.allowed:
            return None
        for entry in self.allowed:
            if any(c in entry for c in "*?["):
                if fnmatch.fnmatchcase(topic, entry):
                    return None
            elif topic.startswith(entry):
                rest = topic[len(entry):]
                bare_origin = urlsplit(entry).path == "" and "?" not in entry
                if not bare_origin or rest == "" or rest[0] in "/?#":
                    return None
        return "This hub does not accept subscriptions to this topic."


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SubscriptionRequest:
    """A checked (un)subscription request, URLs already percent-normalized."""

    mode: Mode = attr.ib(converter=Mode)
    topic: str = attr.ib()
    callback: str = attr.ib()
    lease_seconds: Optional[int] = None
    secret: Optional[str] = None
    verify_token: Optional[str] = None  # PubSubHubbub 0.3, echoed back
    # The hub URL this subscriber sent its request to (``Subscription.hub_url``).
    hub_url: Optional[str] = None


class HubBusy(Exception):
    """
    The hub's bound on background work is reached: too many (un)subscription
    requests, or (``Publisher``) too many topic fetches. The web layer
    answers ``503`` with ``Retry-After: retry_after`` and the message.
    """

    def __init__(
        self,
        retry_after: int = BUSY_RETRY_AFTER,
        reason: str = "The hub is handling too many subscription requests; try again later.",
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class BackgroundTasks:
    """
    Work that outlives the request that started it (verifications after a
    ``202``, topic fetches), tracked so that stopping the service cancels it
    instead of leaving it to write to a closed store.
    """

    def __init__(self) -> None:
        self._running: Set[Deferred] = set()

    def __len__(self) -> int:
        return len(self._running)

    def run(self, work: Coroutine[Any, Any, Any], what: str) -> Deferred:
        d = ensureDeferred(work)

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                log.failure("background task failed: {what}", failure, what=what)

        d.addErrback(failed)
        if not d.called:
            self._running.add(d)

            def done(result: Any) -> Any:
                self._running.discard(d)
                return result

            d.addBoth(done)
        return d

    def cancel_all(self) -> Deferred:
        running = list(self._running)
        for d in running:
            d.cancel()
        return DeferredList(running, consumeErrors=True).addCallback(lambda _: None)


@implementer(IDeliveryOutcomeListener)
class WebSubHub(Service):
    """
    Verifies (un)subscription requests and keeps subscriptions in ``store``.

    ``submit`` handles a WebSub (or PuSH 0.3 ``async``) request after its
    ``202``, retrying a verification that got no usable answer;
    ``verify_now`` is the PuSH 0.3 ``sync`` path, one attempt, whose result
    is the response. ``delivery_finished`` (``IDeliveryOutcomeListener``:
    the dispatcher tells it of finished deliveries) ends a subscription
    whose callback answered ``410 Gone``. While running, a
    loop purges expired subscriptions (they already receive nothing) and
    cancels their queued notifications; see the module docstring.
    """

    name = "websub"

    def __init__(
        self,
        store: IStore,
        client: IHTTPClient,
        clock: IReactorTime,
        lease_bounds: Tuple[int, int, int] = defaults.LEASE_BOUNDS,
        policy: Optional[TopicPolicy] = None,
        timeout: float = defaults.TIMEOUT,
        verify_retries: Sequence[float] = VERIFY_RETRIES,
        purge_interval: float = 60.0,
        metrics: Optional[Metrics] = None,
        address_policy: Optional[AddressPolicy] = None,
        max_verifications: int = MAX_VERIFICATIONS,
        backlog: int = VERIFY_BACKLOG,
        settle: Optional[float] = None,
    ) -> None:
        self.store = store
        self.address_policy = address_policy
        self.client = client
        self.clock = clock
        self.lease_bounds = lease_bounds
        self.policy = policy or TopicPolicy()
        self.timeout = timeout
        self.verify_retries = tuple(verify_retries)
        self.purge_interval = purge_interval
        self.metrics = metrics or Metrics()
        self.tasks = BackgroundTasks()
        self._purger: Optional[LoopingCall] = None
        self._purging: Optional[Deferred] = None
        # Per (topic, callback) with requests in progress: how many, and the
        # sequence number of the newest request whose outcome was applied.
        self._keys: Dict[Tuple[str, str], List[int]] = {}
        self._sequence = 0
        # Requests being handled (waiting for a turn, verifying, or waiting
        # to retry), bounded by max_verifications + backlog.
        self.max_verifications = max_verifications
        self.backlog = backlog
        self._pending = 0
        self._slots = DeferredSemaphore(max_verifications)
        # Ended (topic, callback) pairs -> (when, why), cancelled once more
        # ``settle`` seconds later: a notification in flight at the first
        # cancellation may have been scheduled for a retry since. The
        # default outlasts an attempt at the default timeout and its claim.
        self.settle = settle if settle is not None else lease_seconds(timeout)
        self._settling: Dict[Tuple[str, str], Tuple[float, str]] = {}

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._purger = LoopingCall(self.purge)
        self._purger.clock = self.clock
        self._purger.start(self.purge_interval, now=True)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        self._purger = None
        waits = [self.tasks.cancel_all()]
        if self._purging is not None:
            # Storage closes after the purge pass in progress, not under it.
            purging: Deferred = Deferred()

            def finished(result: Any) -> Any:
                purging.callback(None)
                return result

            self._purging.addBoth(finished)
            waits.append(purging)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def purge(self) -> Deferred:
        """
        Delete expired subscriptions (the store cancels their queued
        notifications with them), then cancel once more for subscriptions
        that ended at least ``settle`` seconds ago. Errors are logged so the
        loop goes on.
        """

        async def purge() -> None:
            now = self.clock.seconds()
            try:
                removed = await self.store.purge_expired(now)
            except CancelledError:
                raise
            except Exception:
                log.failure("purging expired subscriptions failed")
            else:
                if removed:
                    log.info("purged {count} expired WebSub subscriptions", count=len(removed))
                for pair in removed:
                    self._settling[pair] = (now, CANCELLED_EXPIRED)
            await self._cancel_settled(now)

        d = ensureDeferred(purge())
        if not d.called:
            self._purging = d

            def done(result: Any) -> Any:
                if self._purging is d:
                    self._purging = None
                return result

            d.addBoth(done)
        return d

    async def _cancel_settled(self, now: float) -> None:
        due = [(pair, why) for pair, (when, why) in self._settling.items() if when + self.settle <= now]
        for pair, why in due:
            del self._settling[pair]
            topic, callback = pair
            try:
                if await self.store.get_subscription(topic, callback) is None:
                    await self._cancel(topic, callback, why)
            except CancelledError:
                raise
            except Exception:
                log.failure("cancelling notifications of {callback} to {topic} failed", callback=callback, topic=topic)

    async def _cancel(self, topic: str, callback: str, why: str) -> int:
        count: int = await self.store.cancel_deliveries(topic, callback, why)
        if count:
            log.info(
                "cancelled {count} queued notifications of {callback} to {topic} ({why})",
                count=count, callback=callback, topic=topic, why=why,
            )
        return count

    def _ended(self, topic: str, callback: str, why: str) -> None:
        """
        A subscription was removed, its queued notifications cancelled with it
        (one transaction): cancel once more when settled, for a notification
        that was mid-attempt then and has been rescheduled since.
        """
        self._settling[(topic, callback)] = (self.clock.seconds(), why)

    # -- requests ----------------------------------------------------------------

    def url_refusal(self, url: str) -> Optional[str]:
        """
        Why the hub will not send requests to ``url`` (a callback, a topic),
        when that is known before connecting: an IP literal or loopback name
        the SSRF guard refuses (``hookah.urls``). Other names are checked on
        the addresses they resolve to, when connecting.
        """
        if self.address_policy is None:
            return None
        reason: Optional[str] = self.address_policy.literal_refusal(url)
        return reason

    def busy(self) -> bool:
        """Whether a new request would exceed the bound on background work."""
        return self._pending >= self.max_verifications + self.backlog

    def submit(self, request: SubscriptionRequest) -> Deferred:
        """
        Handle an accepted request in the background: deny it (policy) or
        verify it, retrying when the callback gives no usable answer.
        Deferred[Outcome], for tests; the web layer ignores it.
        Raises ``HubBusy`` (before anything starts) when the hub already
        handles as many requests as it allows.
        """
        if self.busy():
            raise HubBusy()
        return self.tasks.run(self._handle(request, self.verify_retries), f"{request.mode} {request.callback}")

    async def verify_now(self, request: SubscriptionRequest) -> bool:
        """
        One verification, applied if it succeeds (PuSH 0.3
        ``hub.verify=sync``). Raises ``HubBusy`` like ``submit``.
        """
        if self.busy():
            raise HubBusy()
        return await self._handle(request, ()) == VERIFIED

    async def _handle(self, request: SubscriptionRequest, retries: Sequence[float]) -> Outcome:
        self._pending += 1
        try:
            return await self._handle_pending(request, retries)
        finally:
            self._pending -= 1

    async def _get(self, url: str) -> Any:
        """A GET to a subscriber, waiting for one of ``max_verifications`` turns."""
        await self._slots.acquire()
        try:
            return await self.client.request("GET", url, (), None, self.timeout)
        finally:
            self._slots.release()

    async def _handle_pending(self, request: SubscriptionRequest, retries: Sequence[float]) -> Outcome:
        key = (request.topic, request.callback)
        self._sequence += 1
        sequence = self._sequence
        state = self._keys.setdefault(key, [0, 0])
        state[0] += 1
        try:
            if request.mode == SUBSCRIBE:
                reason = self.policy.refusal(request.topic)
                if reason is not None:
                    await self.deny(request.topic, request.callback, reason)
                    return Outcome.DENIED
            outcome, sent_at, lease = await self._verify(request)
            for delay in retries:
                if outcome != UNREACHABLE:
                    break
                await deferLater(self.clock, delay, lambda: None)
                outcome, sent_at, lease = await self._verify(request)
            if outcome == VERIFIED:
                if sequence > state[1]:
                    state[1] = sequence
                    await self._apply(request, sent_at, lease)
                else:
                    log.info(
                        "verified {mode} of {callback} to {topic} superseded by a newer verified request",
                        mode=request.mode, callback=request.callback, topic=request.topic,
                    )
            return outcome
        finally:
            state[0] -= 1
            if state[0] == 0:
                del self._keys[key]

    async def _verify(self, request: SubscriptionRequest) -> Tuple[Outcome, float, int]:
        """One verification GET: (outcome, when it was sent, lease offered)."""
        challenge = new_challenge()
        lease = clamp_lease(request.lease_seconds, self.lease_bounds)
        params = [("hub.mode", request.mode), ("hub.topic", request.topic), ("hub.challenge", challenge)]
        if request.mode == SUBSCRIBE:
            params.append(("hub.lease_seconds", str(lease)))
        if request.verify_token is not None:
            params.append(("hub.verify_token", request.verify_token))
        url = verification_url(request.callback, params)
        # The lease counts from here; a request that waits for a turn sends
        # a little later, so its lease ends a little early, never late.
        sent_at = self.clock.seconds()
        try:
            response = await self._get(url)
        except CancelledError:
            raise
        except TargetRefused as e:
            # The SSRF guard refused the callback's address: asking again
            # would be refused again.
            outcome, why = REJECTED, str(e)
        except Exception:
            outcome, why = UNREACHABLE, describe_failure(Failure(), self.timeout)
        else:
            if 200 <= response.code < 300 and response.body == challenge.encode("ascii"):
                outcome, why = VERIFIED, f"HTTP {response.code}"
            elif response.code >= 500 or response.code in (408, 429):
                outcome, why = UNREACHABLE, f"HTTP {response.code}"
            elif 200 <= response.code < 300:
                outcome, why = REJECTED, f"HTTP {response.code} without the challenge"
            else:
                outcome, why = REJECTED, f"HTTP {response.code}"
        self.metrics.verifications.labels(request.mode, outcome).inc()
        log.info(
            "verification of {mode} of {callback} to {topic}: {outcome} ({why})",
            mode=request.mode, callback=request.callback, topic=request.topic, outcome=outcome, why=why,
        )
        return outcome, sent_at, lease

    def _apply(self, request: SubscriptionRequest, sent_at: float, lease: int) -> Deferred:
        """
        Make the verified request the pair's state. The lease counts from the
        verification request (5.3); ``created_at`` is when this lease was
        granted, which lets a late ``410`` tell an old subscription from a
        renewed one.
        """
        if request.mode == UNSUBSCRIBE:
            d = self.store.remove_subscription(request.topic, request.callback, CANCELLED_UNSUBSCRIBED)
            d.addCallback(lambda _: self._ended(request.topic, request.callback, CANCELLED_UNSUBSCRIBED))
            return d
        return self.store.put_subscription(
            Subscription(
                topic=request.topic,
                callback=request.callback,
                secret=request.secret,
                lease_seconds=lease,
                created_at=sent_at,
                expires_at=sent_at + lease,
                hub_url=request.hub_url,
            )
        )

    async def deny(self, topic: str, callback: str, reason: str) -> bool:
        """
        Tell a subscriber its subscription is refused (5.2). Best effort, one
        attempt: the subscriber learns nothing it could act on by a retry.
        The subscription state is left as it is; only a verified request
        changes it.
        """
        url = verification_url(callback, [("hub.mode", DENIED), ("hub.topic", topic), ("hub.reason", reason)])
        try:
            response = await self._get(url)
        except CancelledError:
            raise
        except Exception:
            self.metrics.verifications.labels(DENIED, UNREACHABLE).inc()
            log.info("denial of {topic} to {callback} not delivered: {why}", topic=topic, callback=callback,
                     why=describe_failure(Failure(), self.timeout))
            return False
        self.metrics.verifications.labels(DENIED, Outcome.SENT).inc()
        log.info("denied {topic} to {callback} (HTTP {code})", topic=topic, callback=callback, code=response.code)
        return True

    # -- the end of subscriptions ------------------------------------------------

    def wants(self, delivery: Delivery, attempt: Attempt) -> bool:
        """``IDeliveryOutcomeListener``: only a WebSub notification answered ``410 Gone``."""
        return delivery.kind == KIND_WEBSUB and delivery.topic is not None and attempt.status_code == 410

    def delivery_finished(self, delivery: Delivery) -> Optional[Deferred]:
        """
        ``IDeliveryOutcomeListener``, told by the dispatcher of a delivery
        that reached a final state: a
        WebSub delivery whose callback answered ``410 Gone`` ends the
        subscription (7: the hub MAY; we do), unless the subscriber renewed
        it after that attempt. Errors are logged here, never raised into the
        dispatcher.
        """
        if delivery.kind != KIND_WEBSUB or delivery.topic is None or not delivery.attempts:
            return None
        last = delivery.attempts[-1]
        if last.status_code != 410:
            return None
        topic, callback = delivery.topic, delivery.url

        async def end() -> None:
            current = await self.store.get_subscription(topic, callback)
            if current is None or current.created_at > last.at:
                return
            await self.store.remove_subscription(topic, callback, CANCELLED_GONE)
            log.info("removed subscription of {callback} to {topic}: it answered 410 Gone", callback=callback, topic=topic)
            self._ended(topic, callback, CANCELLED_GONE)

        d = ensureDeferred(end())
        d.addErrback(lambda f: log.failure("removing a gone subscription failed", f))
        return d
