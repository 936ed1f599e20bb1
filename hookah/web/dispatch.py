"""
``/dispatch``: accept outgoing webhooks, and let people inspect and resend them.

Parsing and checking happen before anything is stored, so bad input is a
``400`` and never a half-queued delivery; the ``202`` is written only after
storage has committed the delivery.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from hyperlink import EncodedURL
from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.resource import Resource

from hookah.model import STATUSES
from hookah.payload import PayloadError, parse_query, split_payload
from hookah.service import Accepted, HookahCore, DispatchRequest
from hookah.web.common import ApiError, int_arg, json_body, query_args, render_async

CONTROLS = ("_url", "_topic", "_errback", "_callback", "_retries", "_delay", "_timeout", "_id")
HEADER_PREFIX = b"x-hookah-header-"
# Headers a caller must not set on a delivery: they belong to the connection.
FORBIDDEN_HEADERS = {
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "te", "trailer", "upgrade", "proxy-connection", "expect",
}
MAX_RETRIES = 100
MAX_DELAY = 30 * 86400.0
MAX_TIMEOUT = 3600.0


def check_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, "bad_url", f"{name} must be an absolute http or https URL, not {value!r}.")
    try:
        parts.port
    except ValueError:
        raise ApiError(400, "bad_url", f"{name} has an invalid port: {value!r}.")
    return value


def check_sendable(request: DispatchRequest) -> None:
    """
    Refuse target URLs the outgoing client cannot put on the wire (treq
    IDNA-encodes every host: "my_host" and IPv6 literals fail), rather than
    accept them and fail every attempt for a day.
    """
    for name, url in (("_url", request.url), ("_errback", request.errback), ("_callback", request.callback)):
        if url is None:
            continue
        try:
            EncodedURL.from_text(url).to_uri()
        except Exception:
            host = urlsplit(url).hostname
            raise ApiError(
                400,
                "bad_url",
                f"{name} cannot be sent: its host {host!r} is not a valid DNS name or IPv4 address "
                "(letters, digits, hyphens and dots; IPv6 literals are not supported).",
            )


def _number(name: str, raw: str, maximum: float, positive: bool) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be a number of seconds, not {raw!r}.")
    if not (value > 0 if positive else value >= 0) or not value <= maximum:
        low = "above 0" if positive else "0 or more"
        raise ApiError(400, "bad_parameter", f"{name} must be {low} and at most {maximum:g}.")
    return value


def parse_dispatch(request: server.Request) -> DispatchRequest:
    """Turn an HTTP request into a checked ``DispatchRequest`` or raise ``ApiError``."""
    uri = request.uri
    query = uri.split(b"?", 1)[1] if b"?" in uri else b""
    raw_type = request.getHeader(b"content-type")
    content_type = raw_type.decode("latin-1") if raw_type is not None else None
    try:
        controls: List[Tuple[str, str]] = [(k, v) for k, v in parse_query(query) if k.startswith("_")]
        body = request.content.read() if request.content is not None else b""
        payload = split_payload(body, content_type)
    except PayloadError as e:
        raise ApiError(400, "bad_payload", str(e))
    values: Dict[str, str] = {}
    for name, value in controls + list(payload.controls):
        if name == "_charset_":  # RFC 7578: browsers add it to forms; not ours to forward
            continue
        if name not in CONTROLS:
            raise ApiError(400, "unknown_parameter", f"Unknown control parameter {name}; known ones are {', '.join(CONTROLS)}.")
        if name in values and values[name] != value:
            raise ApiError(400, "bad_parameter", f"{name} is given more than once with different values.")
        values[name] = value
    url, topic = values.get("_url"), values.get("_topic")
    if not url and not topic:
        raise ApiError(400, "missing_destination", "Give the destination as _url (one target) or _topic (its subscribers and streams).")
    if url and topic:
        raise ApiError(400, "bad_parameter", "Give either _url or _topic, not both.")
    headers: List[Tuple[str, str]] = []
    for raw_name, raw_values in request.requestHeaders.getAllRawHeaders():
        if raw_name.lower().startswith(HEADER_PREFIX):
            name = raw_name[len(HEADER_PREFIX):].decode("latin-1")
            if not name or name.lower() in FORBIDDEN_HEADERS:
                raise ApiError(400, "bad_header", f"X-Hookah-Header-{name} cannot be set on a delivery.")
            headers.extend((name, v.decode("latin-1")) for v in raw_values)
    raw_key = request.getHeader(b"idempotency-key")
    key = raw_key.decode("utf-8", "replace") if raw_key is not None else values.get("_id")
    if key is not None and not 0 < len(key) <= 255:
        raise ApiError(400, "bad_parameter", "An idempotency key must be 1 to 255 characters long.")
    retries = None
    if "_retries" in values:
        raw = values["_retries"]
        if not raw.isdigit() or int(raw) > MAX_RETRIES:
            raise ApiError(400, "bad_parameter", f"_retries must be a whole number from 0 to {MAX_RETRIES}, not {raw!r}.")
        retries = int(raw)
    return DispatchRequest(
        url=check_url("_url", url) if url else None,
        topic=topic or None,
        body=payload.body,
        content_type=payload.content_type,
        headers=tuple(headers),
        errback=check_url("_errback", values["_errback"]) if "_errback" in values else None,
        callback=check_url("_callback", values["_callback"]) if "_callback" in values else None,
        retries=retries,
        delay=_number("_delay", values["_delay"], MAX_DELAY, False) if "_delay" in values else 0.0,
        timeout=_number("_timeout", values["_timeout"], MAX_TIMEOUT, True) if "_timeout" in values else None,
        idempotency_key=key,
    )


def accepted_body(request: server.Request, accepted: Accepted) -> bytes:
    body: Dict[str, Any] = {"id": accepted.id, "status": "scheduled"}
    if accepted.subscribers is not None:
        body["subscribers"] = accepted.subscribers
    if accepted.duplicate:
        return json_body(request, 200, dict(body, duplicate=True), Location=accepted.location)
    return json_body(request, 202, body, Location=accepted.location)


class DispatchResource(Resource):
    """``/dispatch``: POST to queue, GET to list."""

    def __init__(self, core: HookahCore) -> None:
        super().__init__()
        self.core = core

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"":
            return self
        return DeliveryResource(self.core, path.decode("utf-8", "replace"))

    def render_POST(self, request: server.Request) -> object:
        async def handle() -> bytes:
            dispatch = parse_dispatch(request)
            refusal = self.core.refusal(dispatch)
            if refusal is not None:
                raise ApiError(400, "refused_target", refusal)
            check_sendable(dispatch)
            accepted = await self.core.dispatch(dispatch)
            return accepted_body(request, accepted)

        return render_async(request, handle)

    def render_GET(self, request: server.Request) -> object:
        async def handle() -> bytes:
            args = query_args(request)
            status = args.get("status") or None
            if status is not None and status not in STATUSES:
                raise ApiError(400, "bad_parameter", f"status must be one of {', '.join(STATUSES)}.")
            limit = int_arg(args, "limit", 50, 1, 1000)
            after = args.get("after") or None
            page = await self.core.store.list_deliveries(status, limit, after)
            return json_body(
                request,
                200,
                {
                    "deliveries": [d.to_json() for d in page],
                    "next": page[-1].id if len(page) == limit else None,
                },
            )

        return render_async(request, handle)


class DeliveryResource(Resource):
    """``/dispatch/<id>`` and ``/dispatch/<id>/retry``."""

    def __init__(self, core: HookahCore, delivery_id: str, action: Optional[str] = None) -> None:
        super().__init__()
        self.core = core
        self.delivery_id = delivery_id
        self.action = action

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if self.action is None and path == b"retry":
            return DeliveryResource(self.core, self.delivery_id, "retry")
        if path == b"":
            return self
        return _NotFound()

    def render_GET(self, request: server.Request) -> object:
        async def handle() -> bytes:
            if self.action is not None:
                raise ApiError(405, "method_not_allowed", "Use POST to retry a delivery.")
            delivery = await self.core.store.get_delivery(self.delivery_id)
            if delivery is None:
                raise ApiError(404, "not_found", f"There is no delivery {self.delivery_id}.")
            return json_body(request, 200, delivery.to_json())

        return render_async(request, handle)

    def render_POST(self, request: server.Request) -> object:
        async def handle() -> bytes:
            if self.action != "retry":
                raise ApiError(405, "method_not_allowed", "POST to /dispatch/<id>/retry to resend a delivery.")
            delivery = await self.core.store.get_delivery(self.delivery_id)
            if delivery is None:
                raise ApiError(404, "not_found", f"There is no delivery {self.delivery_id}.")
            requeued = await self.core.retry(self.delivery_id)
            if requeued is None:
                raise ApiError(409, "not_finished", f"Delivery {self.delivery_id} is {delivery.status}; only delivered or failed deliveries can be resent.")
            return json_body(request, 202, {"id": requeued.id, "status": requeued.status}, Location=f"/dispatch/{requeued.id}")

        return render_async(request, handle)


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return json_body(request, 404, {"error": "not_found", "message": "No such resource."})
