"""
Operations endpoints: the status page (``GET /``), its sign-in
(``/login``, ``/logout``), ``GET /healthz`` and ``GET /metrics``.

These read state and never change it (resend is ``/dispatch/<id>/retry``),
so each gathers what it needs from storage per request; nothing here sits
on the delivery path. Open streams live in the stream registry, which this
module knows only as a callable ``stream_counts() -> {topic: streams}``.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

from hookah import __version__
from hookah.core import HookahCore
from hookah.web.auth import COOKIE_MAX_AGE, COOKIE_NAME, Tokens, session_value
from hookah.metrics import Metrics
from hookah.model import DELIVERING, FAILED, SCHEDULED, STATUSES
from hookah.web.recent import newest_deliveries
from hookah.web.common import ApiError, JsonResource, json_body, render_async
from hookah.web.status_html import Snapshot, TopicRow, content_security_policy, login_page, status_page

log = Logger()

StreamCounts = Callable[[], Dict[str, int]]
FAILED_SHOWN = 20
RECENT_SHOWN = 20
SUBSCRIPTIONS_SHOWN = 100


def no_streams() -> Dict[str, int]:
    return {}


def stream_counts(registry: Any) -> StreamCounts:
    """Open streams per topic, read from a ``hookah.streams.registry.TopicRegistry``."""
    return lambda: {topic: registry.readers(topic) for topic in registry.topics()}


def _html(request: server.Request, status: int, page: Callable[[str], str]) -> bytes:
    """An HTML reply with a fresh CSP nonce for its inline style and script."""
    nonce = secrets.token_urlsafe(16)
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Security-Policy", content_security_policy(nonce).encode())
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-store")
    return page(nonce).encode("utf-8")


def login_or_json(request: server.Request, error: ApiError) -> bytes:
    """For ``guard``: people get a sign-in form, programs the JSON error."""
    accept = request.getHeader(b"accept") or b""
    if b"text/html" in accept and error.status == 401:
        return _html(request, 401, lambda nonce: login_page(nonce))
    return json_body(request, error.status, {"error": error.error, "message": error.message})


class StatusPage(JsonResource):
    """``GET /``: what is queued, what failed, who listens to what."""

    isLeaf = True

    def __init__(
        self, core: HookahCore, tokens: Optional[Tokens] = None, stream_counts: StreamCounts = no_streams,
        in_flight: Optional[Callable[[], int]] = None,
    ) -> None:
        super().__init__()
        self.core = core
        # Under --workers, both read every worker's figures (hookah.metrics).
        self.in_flight = in_flight if in_flight is not None else lambda: core.in_flight
        self.clock: IReactorTime = core.clock
        self.tokens = tokens or Tokens()
        self.stream_counts = stream_counts

    async def snapshot(self) -> Snapshot:
        now = self.clock.seconds()
        counts = await self.core.count_deliveries()
        listed = await self.core.list_topics()
        streams = self.stream_counts()
        topics = {name: TopicRow(name, events, subscribers, streams.get(name, 0)) for name, events, subscribers in listed}
        for name, open_streams in streams.items():
            if name not in topics:
                topics[name] = TopicRow(name, 0, 0, open_streams)
        failed = await newest_deliveries(self.core, FAILED, FAILED_SHOWN, now)
        recent = await newest_deliveries(self.core, None, RECENT_SHOWN, now)
        subscriptions = sorted(await self.core.list_subscriptions(None), key=lambda s: (s.topic, s.callback))
        return Snapshot(
            now=now,
            counts={status: counts.get(status, 0) for status in STATUSES},
            topics=sorted(topics.values(), key=lambda t: t.topic),
            failed=failed,
            recent=recent,
            subscriptions=subscriptions[:SUBSCRIPTIONS_SHOWN],
            subscription_total=len(subscriptions),
            in_flight=self.in_flight(),
            waiting={d.id: w for d in (*failed, *recent) if (w := self.core.waiting(d)) is not None},
        )

    def render_GET(self, request: server.Request) -> object:
        async def handle() -> bytes:
            snapshot = await self.snapshot()
            signed_in = request.getCookie(COOKIE_NAME) is not None and bool(self.tokens.admin)
            return _html(request, 200, lambda nonce: status_page(snapshot, nonce, signed_in))

        return render_async(request, handle)


class LoginResource(JsonResource):
    """
    ``POST /login`` (form field ``token``): exchange an admin token for the
    status page's session cookie, then back to ``/``.
    """

    isLeaf = True

    def __init__(self, tokens: Tokens) -> None:
        super().__init__()
        self.tokens = tokens

    def render_GET(self, request: server.Request) -> bytes:
        if not self.tokens.admin:
            return _redirect(request, b"/")
        return _html(request, 200, lambda nonce: login_page(nonce))

    def render_POST(self, request: server.Request) -> bytes:
        if not self.tokens.admin:
            return _redirect(request, b"/")
        announced = request.getHeader(b"origin") is not None or request.getHeader(b"sec-fetch-site") is not None
        if announced and not self.tokens.same_site(request):
            return json_body(request, 403, {"error": "forbidden", "message": "Sign in from this Hookah's own page."})
        body = request.content.read() if request.content is not None else b""
        fields = parse_qs(body.decode("utf-8", "replace"))
        token = (fields.get("token") or [""])[-1].strip().encode()
        if not token or not self.tokens.is_admin_token(token):
            log.info("status page sign-in refused from {client}", client=_client(request))
            return _html(request, 401, lambda nonce: login_page(nonce, "That is not an admin token."))
        request.addCookie(
            COOKIE_NAME,
            session_value(token),
            path=b"/",
            max_age=str(COOKIE_MAX_AGE).encode(),
            httpOnly=True,
            secure=_is_https(request, self.tokens),
            sameSite="strict",
        )
        return _redirect(request, b"/")


class LogoutResource(JsonResource):
    """``POST /logout``: forget the session cookie."""

    isLeaf = True

    def render_POST(self, request: server.Request) -> bytes:
        request.addCookie(COOKIE_NAME, b"", path=b"/", max_age=b"0", httpOnly=True, sameSite="strict")
        return _redirect(request, b"/")


def _redirect(request: server.Request, location: bytes) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"Location", location)
    request.setHeader(b"Cache-Control", b"no-store")
    return b""


def _is_https(request: server.Request, tokens: Tokens) -> Optional[bool]:
    if request.isSecure() or (tokens.public_url or "").startswith("https:"):
        return True
    return None


def _client(request: server.Request) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", peer))


class HealthResource(JsonResource):
    """
    ``GET /healthz``: ``200`` when the service runs and storage answers a
    ping within ``timeout`` seconds, ``503`` otherwise, for load balancers
    and orchestrators (so it is never behind a token). ``ping`` is
    ``HookahCore.ping`` (a store's own ``ping`` in tests).
    """

    isLeaf = True

    def __init__(
        self,
        ping: Callable[[], Deferred],
        clock: IReactorTime,
        running: Callable[[], object] = lambda: True,
        timeout: float = 5.0,
        worker: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.ping = ping
        self.clock = clock
        self.running = running
        self.timeout = timeout
        # Under --workers, which worker answered (which one a connection reached).
        self.worker = worker

    def render_GET(self, request: server.Request) -> object:
        request.setHeader(b"Cache-Control", b"no-store")

        async def handle() -> bytes:
            if not self.running():
                return self._unavailable(request, "service_stopped", "Hookah is not running (starting or stopping).")
            try:
                ping: Deferred = self.ping()
                ping.addTimeout(self.timeout, self.clock)
                await ping
            except Exception as e:
                log.warn("health check: storage did not answer: {error!r}", error=e)
                return self._unavailable(request, "storage_unavailable", f"Storage did not answer: {_reason(e)}.")
            body: Dict[str, Any] = {"status": "ok", "storage": "ok", "version": __version__}
            if self.worker is not None:
                body["worker"] = self.worker
            return json_body(request, 200, body)

        return render_async(request, handle)

    @staticmethod
    def _unavailable(request: server.Request, error: str, message: str) -> bytes:
        return json_body(request, 503, {"status": "unavailable", "error": error, "message": message})


def _reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "…"


class MetricsResource(JsonResource):
    """
    ``GET /metrics``: the Prometheus exposition of ``Metrics``. Counters
    are kept up to date where things happen; the state gauges (queue depth,
    deliveries by status, subscriptions, topics) are read from storage
    here, once per scrape, and handed to the registry. (Open streams are a
    gauge the service registers from its stream registry.)
    """

    isLeaf = True

    def __init__(self, core: HookahCore) -> None:
        super().__init__()
        self.metrics: Metrics = core.metrics
        self.core = core
        self._counts: Dict[str, int] = {}
        self._topics: List[Any] = []
        m = self.metrics
        m.gauge(
            "hookah_delivery_queue_depth",
            "Deliveries waiting to be delivered (scheduled or being delivered)",
            lambda: [((), self._counts.get(SCHEDULED, 0) + self._counts.get(DELIVERING, 0))],
        )
        m.gauge(
            "hookah_deliveries",
            "Deliveries in storage by status",
            lambda: [((status,), self._counts.get(status, 0)) for status in STATUSES],
            labels=("status",),
        )
        m.gauge(
            "hookah_deliveries_in_flight",
            "Delivery attempts in flight on this node",
            lambda: [((), self.core.in_flight)],
            local=True,
        )
        m.gauge("hookah_topics", "Topics with history or subscribers", lambda: [((), len(self._topics))])
        m.gauge(
            "hookah_subscriptions",
            "WebSub subscriptions",
            lambda: [((), sum(subscribers for _, _, subscribers in self._topics))],
        )

    def render_GET(self, request: server.Request) -> object:
        async def handle() -> bytes:
            counts = await self.core.count_deliveries()
            topics = await self.core.list_topics()
            # Rendered right after the last read, with no await in between,
            # so concurrent scrapes cannot mix their readings.
            self._counts, self._topics = dict(counts), list(topics)
            # Prometheus asks for OpenMetrics in Accept; anything else gets
            # the classic text format (what Metrics.render produces).
            accept = (request.getHeader(b"accept") or b"").decode("latin-1")
            encode, content_type = choose_encoder(accept)
            body = encode(self.metrics.exposed())
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", content_type.encode())
            request.setHeader(b"Cache-Control", b"no-store")
            return body

        return render_async(request, handle)
