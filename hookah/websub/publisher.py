"""
WebSub publishing (``hub.mode=publish``): a publish ping names topic URLs;
the ``Publisher`` fetches each one and publishes its body as an event on
that topic through ``HookahCore.publish`` (which fans it out to the
subscribers, ``hookah.websub.distributor``, and to live streams).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Deque, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urljoin, urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hookah import defaults
from hookah.model import Event
from hookah.outbound.outcome import describe_failure
from hookah.outbound.interface import IHTTPClient
from hookah.websub.subscriptions import BackgroundTasks, HubBusy

if TYPE_CHECKING:
    from hookah.core import HookahCore

log = Logger()

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
# Topic fetches in flight at once, and topics allowed to wait beyond those.
MAX_FETCHES = 32
FETCH_BACKLOG = 1024
PUBLISH_BUSY = "The hub is fetching too many topics for publishers; try again later."


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
        timeout: float = defaults.TIMEOUT,
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
