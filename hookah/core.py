"""
The core the web layer talks to: turn accepted requests into stored
deliveries and events.

``HookahCore`` holds the rules that are not HTTP (idempotency, topic fan-out
into deliveries), so that every door into Hookah (``/dispatch``, the hub's
publish, a retry) applies them the same way. Assembling the running service
and its start-up order is ``hookah.app``'s work (``HookahService``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

from urllib.parse import quote

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hookah import defaults
from hookah.delivery.dispatcher import Dispatcher
from hookah.metrics import Metrics
from hookah.urls import AddressPolicy
from hookah.storage.interface import IStore
from hookah.listeners import IEventListener
from hookah.model import SCHEDULED, Delivery, DeliveryStatus, Event, Headers

log = Logger()


class EventHistory(Protocol):
    """
    The reads of a topic's history that a stream's replay makes.
    ``HookahCore`` answers them in the server; every ``IStore`` has them
    too, so a stream's tests may hand it a store.
    """

    def events_page(self, topics: Sequence[str], after: Optional[str], limit: int, max_bytes: int) -> Deferred: ...

    def resume_page(self, topics: Sequence[str], after: str, limit: int, max_bytes: int) -> Deferred: ...

    def replay_cursor(self, topics: Sequence[str], count: int) -> Deferred: ...


class DeliveryPages(Protocol):
    """Pages of deliveries by id (``HookahCore``, or any ``IStore``)."""

    def list_deliveries(self, status: Optional[DeliveryStatus], limit: int, after: Optional[str]) -> Deferred: ...


# Turns an event into its deliveries, one per subscriber whose lease runs
# at the given time (``hookah.websub.distributor.Distributor``).
Distribution = Callable[[Event, float], "Deferred[List[Delivery]]"]


@attr.s(auto_attribs=True, frozen=True)
class DispatchRequest:
    """A checked ``/dispatch`` request: exactly one of ``url`` and ``topic``."""

    url: Optional[str]
    topic: Optional[str]
    body: bytes
    content_type: Optional[str]
    headers: Headers = ()
    errback: Optional[str] = None
    callback: Optional[str] = None
    retries: Optional[int] = None
    delay: float = 0.0
    timeout: Optional[float] = None
    idempotency_key: Optional[str] = None


@attr.s(auto_attribs=True, frozen=True)
class Accepted:
    """
    What a dispatch became. For an event on a topic (``topic`` set),
    ``subscribers`` is the number of deliveries it fanned out to; a
    duplicate answers ``None`` there (the first request's count is not kept),
    the same whether the first is stored or still being stored.
    """

    id: str
    location: str
    subscribers: Optional[int] = None
    duplicate: bool = False
    topic: Optional[str] = None


def _has_options(request: DispatchRequest) -> bool:
    """Whether a dispatch asks for anything other than an attempt now with the default retries and timeout."""
    return bool(
        request.delay or request.retries is not None or request.timeout is not None or request.errback or request.callback
    )


class HookahCore:
    """
    What the web layer talks to: it accepts dispatches and events, decides
    what is stored for them (a delivery, an event with one notification per
    subscriber, an idempotency key) and writes it, hands the dispatcher what
    is due, tells its ``IEventListener``s of each stored event, and answers
    the web layer's reads, so that no resource touches storage itself.
    """

    def __init__(
        self,
        store: IStore,
        dispatcher: Dispatcher,
        clock: IReactorTime,
        new_id: Callable[[], str],
        idempotency_window: float = defaults.IDEMPOTENCY_WINDOW,
        history_count: int = defaults.HISTORY_COUNT,
        history_age: float = defaults.HISTORY_AGE,
        metrics: Optional[Metrics] = None,
        address_policy: Optional[AddressPolicy] = None,
        distribution: Optional[Distribution] = None,
        event_listeners: Sequence[IEventListener] = (),
    ) -> None:
        self.store = store
        self.address_policy = address_policy or AddressPolicy(allow_private=True)
        self.dispatcher = dispatcher
        self.clock = clock
        self.new_id = new_id
        self.idempotency_window = idempotency_window
        self.history_count = history_count
        self.history_age = history_age
        self.metrics = metrics or Metrics()
        self._url_dispatches = self.metrics.tally(self.metrics.dispatches.labels("url"))
        self._topic_dispatches = self.metrics.tally(self.metrics.dispatches.labels("topic"))
        # Requests whose idempotency key is being stored right now: a
        # concurrent repeat waits for the first instead of queueing twice.
        self._pending_keys: Dict[str, List[Deferred]] = {}
        # Told of each stored event: live streams, other nodes.
        self.event_listeners = tuple(event_listeners)
        # Turns an event and a topic's subscriptions into deliveries (WebSub).
        self.distribution = distribution

    def refusal(self, request: DispatchRequest) -> Optional[str]:
        """Why a target of ``request`` is refused at submission (an IP literal or loopback name the SSRF guard forbids)."""
        for url in (request.url, request.errback, request.callback):
            if url is not None:
                reason = self.address_policy.literal_refusal(url)
                if reason is not None:
                    return f"{url} is refused: {reason}; allow it with --allow-private-targets or --allowed-networks"
        return None

    def dispatch(self, request: DispatchRequest) -> Deferred:
        """
        Deferred[Accepted], fired once the request is durable. The common
        case (no idempotency key) stays on plain Deferred callbacks: a
        coroutine per request is a measurable share of a dispatch's cost.
        """
        if request.idempotency_key is None:
            return self._accept(request)
        return ensureDeferred(self._dispatch_once(request, request.idempotency_key))

    async def _dispatch_once(self, request: DispatchRequest, key: str) -> Accepted:
        if key not in self._pending_keys:
            since = self.clock.seconds() - self.idempotency_window
            existing = await self.store.find_idempotency_key(key, since)
            if existing is not None:
                return Accepted(existing, _location(request, existing), duplicate=True, topic=request.topic)
        if key in self._pending_keys:
            waiter: Deferred = Deferred()
            self._pending_keys[key].append(waiter)
            first = await waiter
            return attr.evolve(first, duplicate=True, subscribers=None)
        self._pending_keys[key] = []
        try:
            accepted = await self._accept(request)
        except BaseException:
            for waiter in self._pending_keys.pop(key):
                waiter.errback()
            raise
        for waiter in self._pending_keys.pop(key):
            waiter.callback(accepted)
        return accepted

    def _accept(self, request: DispatchRequest) -> Deferred:
        now = self.clock.seconds()
        if request.topic is not None:
            self._topic_dispatches.inc()
            return ensureDeferred(self._publish(request, now))
        self._url_dispatches.inc()
        delivery = Delivery(
            id=self.new_id(),
            url=request.url or "",
            body=request.body,
            content_type=request.content_type,
            headers=request.headers,
            status=SCHEDULED,
            created_at=now,
            next_attempt_at=now + request.delay,
            retries=request.retries,
            timeout=request.timeout,
            errback=request.errback,
            callback=request.callback,
            idempotency_key=request.idempotency_key,
        )
        accepted = Accepted(delivery.id, f"/dispatch/{delivery.id}")
        intake = self.dispatcher.intake([delivery])
        return intake.when_stored(self.store.add_deliveries(intake.deliveries), accepted)

    async def _publish(self, request: DispatchRequest, now: float) -> Accepted:
        event = Event(
            id=self.new_id(),
            topic=request.topic or "",
            body=request.body,
            content_type=request.content_type,
            headers=request.headers,
            created_at=now,
            idempotency_key=request.idempotency_key,
        )
        deliveries = await self.publish(event, request)
        return Accepted(event.id, _location(request, event.id), subscribers=len(deliveries), topic=event.topic)

    async def publish(self, event: Event, request: Optional[DispatchRequest] = None) -> List[Delivery]:
        """
        Store ``event`` in its topic's history together with one delivery per
        active subscriber (atomically), then hand it to live listeners.
        """
        deliveries: List[Delivery] = []
        if self.distribution is not None:
            deliveries = await self.distribution(event, self.clock.seconds())
        if request is not None and _has_options(request):
            # The distribution's deliveries are due at once with the default
            # retries and timeout and no reports: a copy each only when the
            # request asks for something else (a copy per notification costs
            # as much as building it, on the way to the first send).
            changes = {
                "retries": request.retries,
                "timeout": request.timeout,
                "errback": request.errback,
                "callback": request.callback,
                "next_attempt_at": event.created_at + request.delay,
            }
            deliveries = [d.replace(**changes) for d in deliveries]
        keep_after = event.created_at - self.history_age
        intake = self.dispatcher.intake(deliveries)
        await intake.when_stored(self.store.add_event(event, intake.deliveries, self.history_count, keep_after))
        self.metrics.events.inc()
        for listener in self.event_listeners:
            try:
                listener.publish(event)
            except Exception:
                log.failure("event listener failed for {id}", id=event.id)
        return deliveries

    async def retry(self, delivery_id: str) -> Optional[Delivery]:
        """Make a finished delivery due now with a fresh retry budget; ``None`` when there is no finished one."""
        delivery = await self.store.requeue(delivery_id, self.clock.seconds())
        if delivery is not None:
            self.dispatcher.deliveries_due()
        return delivery

    # -- what the web layer reads ------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Delivery attempts in flight on this node."""
        return self.dispatcher.in_flight

    def waiting(self, delivery: Delivery) -> Optional[Dict[str, Any]]:
        """Why a scheduled delivery is not attempted yet (``hookah.delivery.waiting``)."""
        return self.dispatcher.waiting(delivery)

    def delivery_json(self, delivery: Delivery) -> Dict[str, Any]:
        """A delivery as the API shows it: its record, and why it waits."""
        shown = delivery.to_json()
        shown["waiting"] = self.waiting(delivery)
        return shown

    @property
    def running(self) -> bool:
        """Whether deliveries are being claimed and sent (not starting or stopping)."""
        return bool(self.dispatcher.running)

    def ping(self) -> Deferred:
        """Deferred[None] once storage answered a round trip (health checks)."""
        return self.store.ping()

    def get_delivery(self, delivery_id: str) -> Deferred:
        """Deferred[Optional[Delivery]], attempts included."""
        return self.store.get_delivery(delivery_id)

    def list_deliveries(self, status: Optional[DeliveryStatus], limit: int, after: Optional[str]) -> Deferred:
        """Deferred[List[Delivery]]: a page by id, after ``after``, of ``status`` when given."""
        return self.store.list_deliveries(status, limit, after)

    def count_deliveries(self) -> Deferred:
        """Deferred[Dict[str, int]]: deliveries per status."""
        return self.store.count_deliveries()

    def list_topics(self) -> Deferred:
        """Deferred[List[(topic, events, subscribers)]]."""
        return self.store.list_topics()

    def events_page(self, topics: Sequence[str], after: Optional[str], limit: int, max_bytes: int) -> Deferred:
        """Deferred[List[Event]]: history of ``topics`` after the event ``after``, oldest first, bounded in count and bytes."""
        return self.store.events_page(topics, after, limit, max_bytes)

    def resume_page(self, topics: Sequence[str], after: str, limit: int, max_bytes: int) -> Deferred:
        """Deferred[(kept, page)]: the first page after ``after``, and whether ``after`` is still in the history."""
        return self.store.resume_page(topics, after, limit, max_bytes)

    def replay_cursor(self, topics: Sequence[str], count: int) -> Deferred:
        """Deferred[Optional[str]]: where a replay of the newest ``count`` events of ``topics`` starts."""
        return self.store.replay_cursor(topics, count)

    def list_subscriptions(self, topic: Optional[str]) -> Deferred:
        """Deferred[List[Subscription]]: all, or those of ``topic``."""
        return self.store.list_subscriptions(topic)


def _location(request: DispatchRequest, id_: str) -> str:
    if request.topic is not None:
        return f"/topics/{quote(request.topic, safe='')}/events"
    return f"/dispatch/{id_}"
