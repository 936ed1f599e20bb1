"""
The publishing side of the WebSub hub: an event becomes one delivery per
subscriber (``Distributor``), and a publish ping becomes an event
(``Publisher``, which fetches the topic URL).

Both doors into a topic — ``/dispatch?_topic=T`` and ``hub.mode=publish`` —
end in ``HookahCore.publish``, which calls the ``Distributor`` and stores the
event with its deliveries in one transaction; from there the dispatcher's
durable retries apply to WebSub notifications like to any webhook.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote, urljoin, urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hookah.outbound.agent import describe_failure
from hookah.outbound.interface import IHTTPClient
from hookah.storage.interface import IStore
from hookah.model import KIND_WEBSUB, SCHEDULED, Delivery, Event, Headers, Subscription
from hookah.websub.subscriptions import BackgroundTasks, HubBusy

if TYPE_CHECKING:
    from hookah.core import HookahCore

log = Logger()

HUB_PATH = "/hub"
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
# Topic fetches in flight at once, and topics allowed to wait beyond those.
MAX_FETCHES = 32
FETCH_BACKLOG = 1024
PUBLISH_BUSY = "The hub is fetching too many topics for publishers; try again later."
# Headers a WebSub notification carries from the hub alone: an event's own
# extra headers (``X-Hookah-Header-*``) may not forge or duplicate them.
RESERVED_HEADERS = frozenset(["link", "x-hub-signature", "content-type"])
# Characters kept as they are inside ``<...>`` of a Link header; anything
# else (spaces, ``<``, ``>``, quotes, control and non-ASCII characters) is
# percent-encoded so that a topic name can never break the header.
_LINK_SAFE = "!#$%&'()*+,-./:;=?@[]_~"


def hub_url(public_url: Optional[str], request_base: Optional[str] = None) -> str:
    """
    The hub URL of a base URL: its ``/hub`` path.

    ``--public-url`` is the base URL of the whole service, taken byte for
    byte except for trailing slashes: ``https://hooks.example.com`` (or
    ``https://hooks.example.com/``) gives ``https://hooks.example.com/hub``,
    and ``https://example.com/hookah`` gives ``https://example.com/hookah/hub``.
    That is the URL to give subscribers (and websub.rocks, which compares
    rel=hub with it byte for byte). ``request_base`` is used only without
    it; ``http://localhost`` when there is neither.
    """
    base = public_url if public_url else (request_base or "http://localhost")
    return base.rstrip("/") + HUB_PATH


def link_header(hub: str, topic: str) -> str:
    """``<hub>; rel="hub", <topic>; rel="self"``, one header as 7 recommends."""
    return f'<{quote(hub, safe=_LINK_SAFE)}>; rel="hub", <{quote(topic, safe=_LINK_SAFE)}>; rel="self"'


def signature(secret: str, body: bytes) -> str:
    """``X-Hub-Signature`` value (7.1): ``sha256=`` and the lowercase hex HMAC of the body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class Distributor:
    """
    ``HookahCore.distribution``: the deliveries of one event, one per
    subscriber whose lease is still running at ``now``.

    Each is a POST of the event's exact body and ``Content-Type`` to the
    exact callback URL, with the Link header and, only for a subscription
    with a secret, ``X-Hub-Signature``. The body is shared; the Link header
    is shared by the subscribers that name the same hub.

    The hub URL in ``rel="hub"`` never comes from an unauthenticated
    request that anyone could send with a forged ``Host``: it is
    ``--public-url`` plus ``/hub`` when that is set, otherwise the hub URL
    each subscriber itself sent its subscription request to
    (``Subscription.hub_url``), so what a request claims reaches only the
    subscriber that sent it. A subscription stored before Hookah kept that
    URL names ``http://localhost/hub`` until it is renewed.
    """

    def __init__(self, store: IStore, new_id: Callable[[], str], public_url: Optional[str] = None) -> None:
        self.store = store
        self.new_id = new_id
        self.public_url = public_url
        self._warned = False

    def hub_url_for(self, subscription: Subscription) -> str:
        if self.public_url:
            return hub_url(self.public_url)
        if subscription.hub_url:
            return subscription.hub_url
        if not self._warned:
            self._warned = True
            log.warn(
                "a subscription without a recorded hub URL and no --public-url: its notifications name "
                "http://localhost/hub as their hub until it is renewed; set --public-url to this hub's "
                "public base URL"
            )
        return hub_url(None)

    def __call__(self, event: Event, now: float) -> Deferred:
        d = self.store.active_subscriptions(event.topic, now)
        d.addCallback(self.deliveries, event, now)
        return d

    def deliveries(self, subscriptions: Sequence[Subscription], event: Event, now: float) -> List[Delivery]:
        if not subscriptions:
            return []
        extra: Headers = tuple(
            (name, value) for name, value in event.headers if name.lower() not in RESERVED_HEADERS
        )
        # Usually every subscriber names the same hub: one header for all.
        by_hub: Dict[str, Headers] = {}
        deliveries = []
        for subscription in subscriptions:
            hub = self.hub_url_for(subscription)
            shared = by_hub.get(hub)
            if shared is None:
                shared = by_hub[hub] = extra + (("Link", link_header(hub, event.topic)),)
            headers = shared
            if subscription.secret:
                headers = shared + (("X-Hub-Signature", signature(subscription.secret, event.body)),)
            deliveries.append(
                Delivery(
                    id=self.new_id(),
                    url=subscription.callback,
                    body=event.body,
                    content_type=event.content_type,
                    headers=headers,
                    status=SCHEDULED,
                    created_at=now,
                    next_attempt_at=now,
                    kind=KIND_WEBSUB,
                    topic=event.topic,
                    event_id=event.id,
                )
            )
        return deliveries


class FetchError(Exception):
    """The topic URL could not be fetched; the message says why."""


class Publisher(Service):
    """
    ``hub.mode=publish``: fetch each topic URL, following redirects (this
    fetch is the one place Hookah follows them), and publish its body with
    its exact ``Content-Type`` as an event on that topic.

    Pings for a topic already waiting for its fetch are folded into that
    fetch; pings for a topic whose fetch is running are folded into one
    more fetch after it. A burst of pings thus costs at most two fetches,
    not one each, and the last fetch always starts after the last ping.

    The work is bounded, since publish pings need no token: at most
    ``max_fetches`` (32) fetches are in flight at once, and at most
    ``backlog`` (1024) more topics wait for a turn (first come, first
    served; a topic due for one more fetch queues again). A ping naming a
    topic not yet tracked beyond that bound is refused as a whole, before
    anything starts, with ``HubBusy`` (the web layer answers ``503``);
    topics it names that are already tracked do not count twice.
    """

    name = "websub-publisher"

    def __init__(
        self,
        core: HookahCore,
        client: IHTTPClient,
        clock: IReactorTime,
        timeout: float = 30.0,
        max_redirects: int = MAX_REDIRECTS,
        max_fetches: int = MAX_FETCHES,
        backlog: int = FETCH_BACKLOG,
    ) -> None:
        self.core = core
        self.client = client
        self.clock = clock
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.max_fetches = max_fetches
        self.backlog = backlog
        self.tasks = BackgroundTasks()
        # Topics tracked (waiting for a turn, fetching, or storing) -> whether
        # a ping came after their fetch started (so one more fetch is due).
        self._fetching: Dict[str, bool] = {}
        # Fetches holding a turn, and the topics waiting for one, in order.
        self._in_flight = 0
        self._waiting: Deque[Deferred] = deque()
        self._stopping = False

    @property
    def in_flight(self) -> int:
        """Topic fetches running now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Topic fetches waiting for a turn."""
        return len(self._waiting)

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        return self.tasks.cancel_all()

    def busy(self, topics: Sequence[str]) -> bool:
        """Whether publishing ``topics`` would track more topics than the bound allows."""
        new = {topic for topic in topics if topic not in self._fetching}
        return len(self._fetching) + len(new) > self.max_fetches + self.backlog

    def publish(self, topics: Sequence[str]) -> List[Deferred]:
        """
        Refresh each topic in the background; Deferreds of the events (or
        None) of the topics not already tracked, for tests. Raises
        ``HubBusy`` (and starts nothing) past the bound.
        """
        if self.busy(topics):
            raise HubBusy(reason=PUBLISH_BUSY)
        started = []
        for topic in topics:
            if topic in self._fetching:
                self._fetching[topic] = True
                continue
            self._fetching[topic] = False
            started.append(self.tasks.run(self._refresh(topic), f"publish {topic}"))
        return started

    async def _refresh(self, topic: str) -> Optional[Event]:
        event = None
        try:
            while True:
                event = await self._publish_once(topic)
                if not self._fetching.get(topic) or self._stopping:
                    return event
        finally:
            self._fetching.pop(topic, None)

    async def _turn(self) -> None:
        """Wait for one of ``max_fetches`` turns (released by ``_release``)."""
        if self._stopping:
            # A cancelled fetch may end as an ordinary failure: start no other.
            raise CancelledError()
        if self._in_flight < self.max_fetches and not self._waiting:
            self._in_flight += 1
            return
        waiter: Deferred = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(waiter)
        # ``_release`` hands its turn over: ``_in_flight`` already counts it.
        await waiter

    def _release(self) -> None:
        if self._waiting and not self._stopping and self._in_flight <= self.max_fetches:
            self._waiting.popleft().callback(None)
        else:
            self._in_flight -= 1

    async def _publish_once(self, topic: str) -> Optional[Event]:
        await self._turn()
        # Pings from now on need a fetch after this one; earlier ones are
        # answered by it.
        self._fetching[topic] = False
        try:
            body, content_type = await self.fetch(topic)
        except FetchError as e:
            log.warn("publish of {topic} failed: {why}", topic=topic, why=str(e))
            return None
        finally:
            self._release()
        event = Event(
            id=self.core.new_id(),
            topic=topic,
            body=body,
            content_type=content_type,
            created_at=self.clock.seconds(),
        )
        deliveries = await self.core.publish(event)
        log.info("published {topic} ({size} bytes) to {n} subscribers", topic=topic, size=len(body), n=len(deliveries))
        return event

    async def fetch(self, url: str) -> Tuple[bytes, Optional[str]]:
        """(body, Content-Type) of ``url``, after at most ``max_redirects`` redirects."""
        for _ in range(self.max_redirects + 1):
            try:
                response = await self.client.request("GET", url, (), None, self.timeout)
            except CancelledError:
                raise
            except Exception:
                raise FetchError(f"GET {url}: {describe_failure(Failure(), self.timeout)}")
            if response.code in REDIRECTS and response.header("Location"):
                target = urljoin(url, response.header("Location") or "")
                if urlsplit(target).scheme not in ("http", "https"):
                    raise FetchError(f"GET {url}: redirected to a non-HTTP URL {target!r}")
                url = target
                continue
            if not 200 <= response.code < 300:
                raise FetchError(f"GET {url}: HTTP {response.code}")
            if response.truncated:
                raise FetchError(f"GET {url}: the content is larger than Hookah accepts")
            return response.body, response.header("Content-Type")
        raise FetchError(f"GET {url}: more than {self.max_redirects} redirects")
