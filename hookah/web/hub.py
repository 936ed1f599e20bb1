"""
``/hub`` (and ``/subscribe``, ``/publish``): the WebSub hub's HTTP face.

``POST`` multiplexes on ``hub.mode``. Parameters come from the query string
and from a form (urlencoded or multipart) body; parameters the hub does not
know are ignored (5.1). Everything is checked before anything starts, so a
bad request is a ``4xx`` with a plain-text reason (5.1.2 asks for plain
text) and never a half-started verification; a good one is answered
``202`` before its verification begins, so the answer cannot depend on it.

PubSubHubbub 0.3 subscribers send ``hub.verify``: ``sync`` is verified
before the answer (``204`` verified, ``409`` not), ``async`` gets ``202``.

Background work is bounded: a subscription request that would exceed the
hub's bound on verifications (``WebSubHub.busy``), and a publish ping that
would exceed the bound on topic fetches (``Publisher.busy``), is answered
``503`` with ``Retry-After`` and a plain-text reason; a publish ping names
at most ``MAX_PUBLISH_TOPICS`` topics. URLs with a user name or password
(``http://user:pass@host/``) are refused: they could never be reached.
The hub URL a subscriber used is kept with its request
(``subscriber_hub_url``) for its own notifications' ``Link``.

``GET /hub/subscriptions?topic=T`` lists subscriptions for operators.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hookah.core import HookahCore
from hookah.websub.publisher import Publisher
from hookah.web.payload import PayloadError, parse_form, parse_multipart, parse_query
from hookah.web.auth import bearer_token
from hookah.web.common import JsonResource, client_gone, finish_unless_gone, json_body, query_args, render_async
from hookah.websub.access import SubscribeAccess
from hookah.urls import BadURL, check_submitted
from hookah.websub.subscriptions import (
    MAX_SECRET_BYTES,
    SUBSCRIBE,
    HubBusy,
    UNSUBSCRIBE,
    SubscriptionRequest,
    WebSubHub,
    decode_unreserved,
)

log = Logger()

PUBLISH = "publish"
SYNC = "sync"
ASYNC = "async"
# Larger leases are clamped anyway; this only bounds the parsing.
MAX_LEASE_DIGITS = 12
# Longer URLs are refused: they are keys in storage and go out in requests.
MAX_URL_LENGTH = 4096
# Topic URLs one publish ping may name: each starts a fetch.
MAX_PUBLISH_TOPICS = 100


class HubError(Exception):
    """A refused hub request: its status and a plain-text reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


Params = List[Tuple[str, str]]


def hub_params(request: server.Request) -> Params:
    """The request's parameters: query string first, then a form body."""
    uri = request.uri
    query = uri.split(b"?", 1)[1] if b"?" in uri else b""
    raw_type = request.getHeader(b"content-type")
    content_type = raw_type.decode("latin-1") if raw_type is not None else ""
    media = content_type.partition(";")[0].strip().lower()
    try:
        params = parse_query(query)
        body = request.content.read() if request.content is not None else b""
        if media == "application/x-www-form-urlencoded":
            params += [(n.decode("utf-8"), v.decode("utf-8")) for n, v in parse_form(body)]
        elif media == "multipart/form-data":
            params += [(p.name, p.data.decode("utf-8")) for p in parse_multipart(body, content_type) if p.filename is None]
    except UnicodeDecodeError:
        raise HubError(400, "The request's parameters are not valid UTF-8.")
    except PayloadError as e:
        raise HubError(400, str(e))
    return params


def _single(params: Params, name: str) -> Optional[str]:
    """The value of a parameter that must not be given twice differently."""
    values = {v for n, v in params if n == name}
    if len(values) > 1:
        raise HubError(400, f"{name} is given more than once with different values.")
    return values.pop() if values else None


def _all(params: Params, name: str) -> List[str]:
    return [v for n, v in params if n == name]


def hub_mode(params: Params, default_mode: Optional[str] = None) -> Optional[str]:
    """
    What a hub request asks for: its ``hub.mode``, or ``default_mode`` when
    that is absent or empty (``/publish``). The one rule for the hub and for
    the guard deciding whether the request needs a publisher token.
    """
    return _single(params, "hub.mode") or default_mode


def check_url(name: str, value: Optional[str]) -> str:
    """
    A callback or topic URL, percent-normalized as 5.1.1 requires, and
    accepted by ``hookah.urls`` in that form (the form that is stored and
    requested): absolute http(s), no user name or password (the client
    could never reach it), a host that can be connected to.
    """
    if not value:
        raise HubError(400, f"{name} is required.")
    if len(value) > MAX_URL_LENGTH:
        raise HubError(400, f"{name} is longer than {MAX_URL_LENGTH} characters.")
    url = decode_unreserved(value)
    try:
        check_submitted(url, name)
    except BadURL as e:
        raise HubError(400, str(e))
    return url


def parse_verify(params: Params) -> Optional[str]:
    """
    PuSH 0.3 ``hub.verify``: ``None`` when absent (a WebSub request), else
    the first of ``sync``/``async`` in the subscriber's order of preference.
    """
    given = _all(params, "hub.verify")
    if not given:
        return None
    for value in given:
        for keyword in value.split(","):
            if keyword.strip() in (SYNC, ASYNC):
                return keyword.strip()
    raise HubError(400, "hub.verify must include sync or async.")


def parse_subscription(params: Params, mode: str) -> SubscriptionRequest:
    callback = check_url("hub.callback", _single(params, "hub.callback"))
    topic = check_url("hub.topic", _single(params, "hub.topic"))
    lease: Optional[int] = None
    raw_lease = _single(params, "hub.lease_seconds")
    if mode == SUBSCRIBE and raw_lease not in (None, ""):
        text = (raw_lease or "").strip()
        if not text.isdigit() or not text.isascii() or len(text) > MAX_LEASE_DIGITS or int(text) == 0:
            raise HubError(400, "hub.lease_seconds must be a positive whole number of seconds.")
        lease = int(text)
    secret = _single(params, "hub.secret") or None
    if secret is not None and len(secret.encode("utf-8")) > MAX_SECRET_BYTES:
        raise HubError(400, "hub.secret must be less than 200 bytes.")
    return SubscriptionRequest(
        mode=mode,
        topic=topic,
        callback=callback,
        lease_seconds=lease,
        secret=secret,
        verify_token=_single(params, "hub.verify_token"),
    )


def parse_publish(params: Params) -> List[str]:
    """The topic URLs of a publish ping (``hub.url`` and ``hub.topic``, repeatable), in order, once each."""
    urls = [v for n, v in params if n in ("hub.url", "hub.topic", "hub.url[]")]
    if not urls:
        raise HubError(400, "A publish request needs at least one hub.url or hub.topic.")
    if len(urls) > MAX_PUBLISH_TOPICS:
        raise HubError(400, f"A publish request may name at most {MAX_PUBLISH_TOPICS} hub.url or hub.topic values.")
    topics: List[str] = []
    for url in urls:
        topic = check_url("hub.url", url)
        if topic not in topics:
            topics.append(topic)
    return topics


def request_base(request: server.Request) -> str:
    """The base URL this request reached: scheme and ``Host`` header as sent."""
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host")
    if host:
        return f"{scheme}://{host.decode('latin-1')}"
    address = request.getHost()
    return f"{scheme}://{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}"


def subscriber_hub_url(request: server.Request) -> Optional[str]:
    """
    The hub URL a subscriber sent its request to: scheme, ``Host`` and path
    as it sent them, never the query string (it may carry ``hub.secret``).
    Kept with its subscription and named in its own notifications only, so
    a forged ``Host`` misleads no one but its sender. ``None`` when absurdly
    long.
    """
    url = request_base(request) + request.path.decode("latin-1")
    return url if len(url) <= MAX_URL_LENGTH else None


def _plain(request: server.Request, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return (text + "\n").encode("utf-8") if text else b""


class HubResource(JsonResource):
    """
    ``POST /hub``: subscribe, unsubscribe, publish. Mounted again at
    ``/subscribe`` and ``/publish``; ``default_mode`` is the mode assumed
    when a request has no ``hub.mode`` (``publish`` at ``/publish``, where
    some ping tools send only ``hub.url``). Other methods get the JSON
    ``405`` every resource gives (they are not WebSub requests).
    """

    not_allowed_message = (
        "This is a WebSub hub. POST hub.mode=subscribe|unsubscribe with hub.callback and hub.topic, "
        "or hub.mode=publish with hub.url or hub.topic."
    )

    def __init__(
        self,
        hub: WebSubHub,
        publisher: Publisher,
        default_mode: Optional[str] = None,
        subscriptions: Optional[Resource] = None,
        access: Optional[SubscribeAccess] = None,
    ) -> None:
        super().__init__()
        self.hub = hub
        self.publisher = publisher
        self.default_mode = default_mode
        self.access = access or SubscribeAccess()
        if subscriptions is not None:
            self.putChild(b"subscriptions", subscriptions)

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_POST(self, request: server.Request) -> Any:
        gone = client_gone(request)
        d = ensureDeferred(self._handle(request))

        def failed(failure: Failure) -> bytes:
            if isinstance(failure.value, HubBusy):
                request.setHeader(b"Retry-After", str(failure.value.retry_after).encode("ascii"))
                return _plain(request, 503, str(failure.value))
            if isinstance(failure.value, HubError):
                return _plain(request, failure.value.status, failure.value.reason)
            log.failure("unhandled error in a hub request", failure)
            return _plain(request, 500, "Hookah failed to handle this request; see its log.")

        d.addErrback(failed)
        d.addCallback(lambda body: finish_unless_gone(request, body, gone))
        d.addErrback(lambda f: log.failure("writing a hub response failed", f))
        return NOT_DONE_YET

    def _check_target(self, name: str, url: str) -> None:
        reason = self.hub.url_refusal(url)
        if reason is not None:
            raise HubError(400, f"{name} is refused: {reason}.")

    async def _handle(self, request: server.Request) -> bytes:
        params = hub_params(request)
        mode = hub_mode(params, self.default_mode)
        if mode is None:
            raise HubError(400, "hub.mode is required: subscribe, unsubscribe or publish.")
        if mode == PUBLISH:
            topics = parse_publish(params)
            for topic in topics:
                reason = self.hub.policy.refusal(topic)
                if reason is not None:
                    raise HubError(403, f"{reason} ({topic})")
                self._check_target("hub.url", topic)
            self.publisher.publish(topics)
            return _plain(request, 202, f"Accepted: fetching {len(topics)} topic(s) to distribute.")
        if mode not in (SUBSCRIBE, UNSUBSCRIBE):
            raise HubError(400, f"Unknown hub.mode {mode!r}: use subscribe, unsubscribe or publish.")
        verify = parse_verify(params)
        subscription = attr.evolve(parse_subscription(params, mode), hub_url=subscriber_hub_url(request))
        refused = self.access.refusal(subscription.topic, bearer_token(request), _single(params, "access_token"))
        if refused is not None:
            if refused[0] == 401:
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="hookah"')
            raise HubError(*refused)
        self._check_target("hub.callback", subscription.callback)
        if verify == SYNC:
            if mode == SUBSCRIBE:
                reason = self.hub.policy.refusal(subscription.topic)
                if reason is not None:
                    raise HubError(403, reason)
            if await self.hub.verify_now(subscription):
                return _plain(request, 204, "")
            raise HubError(409, "Verification of intent failed: the callback did not echo the challenge with a 2xx answer.")
        self.hub.submit(subscription)
        return _plain(request, 202, "Accepted: verification of intent will follow.")


class SubscriptionsResource(JsonResource):
    """``GET /hub/subscriptions?topic=T``: subscriptions, all or of one topic."""

    def __init__(self, core: HookahCore) -> None:
        super().__init__()
        self.core = core

    def render_GET(self, request: server.Request) -> Any:
        async def handle() -> bytes:
            topic = query_args(request).get("topic") or None
            now = self.core.clock.seconds()
            subscriptions = await self.core.list_subscriptions(topic)
            listing: List[Dict[str, Any]] = [
                dict(s.to_json(), active=s.expires_at > now)
                for s in sorted(subscriptions, key=lambda s: (s.topic, s.callback))
            ]
            return json_body(request, 200, {"topic": topic, "subscriptions": listing})

        return render_async(request, handle)
