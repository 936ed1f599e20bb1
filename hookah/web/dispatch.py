"""
``/dispatch``: accept outgoing webhooks, and let people inspect and resend them.

Parsing and checking happen before anything is stored, so bad input is a
``400`` and never a half-queued delivery; the ``202`` is written only after
storage has committed the delivery.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from hookah.model import SCHEDULED, STATUSES, delivery_status
from hookah.websub.subscriptions import decode_unreserved
from hookah.web.payload import PayloadError, control_name, split_payload
from hookah.core import Accepted, HookahCore, DispatchRequest
from hookah.web.common import ApiError, JsonResource, int_arg, json_body, query_args, render_async
from hookah.urls import BadURL, check_submitted

CONTROLS = ("_url", "_topic", "_errback", "_callback", "_retries", "_delay", "_timeout", "_id")
# ``_`` fields that are nobody's typo: RFC 7578's ``_charset_``, which
# browsers add to forms, is dropped without being reported as ignored.
SILENTLY_DROPPED = frozenset(["_charset_"])
# A log line names at most this many ignored fields, each cut to a length.
LOGGED_NAMES = 20
LOGGED_NAME_LENGTH = 64
HEADER_PREFIX = b"x-hookah-header-"
# Headers a caller must not set on a delivery: those that belong to the
# connection, and those Hookah sets itself (content type, identity,
# signatures, WebSub links), which a caller could otherwise forge.
FORBIDDEN_HEADERS = {
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "te", "trailer", "upgrade", "proxy-connection", "expect",
    "content-type", "user-agent", "webhook-id", "webhook-timestamp", "webhook-signature",
    "link", "x-hub-signature",
}
FORBIDDEN_HEADER_PREFIX = "x-hookah-"
# RFC 7230 3.2.6: a header name is a token.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# A header value: visible characters, spaces and tabs (obs-text allowed), no other control characters.
HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")
# Seconds as plain decimals: no signs, exponents, underscores, nan or inf.
DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")
MAX_RETRIES = 100
MAX_DELAY = 30 * 86400.0
MIN_TIMEOUT = 0.1
MAX_TIMEOUT = 3600.0

log = Logger()


def check_url(name: str, value: str) -> str:
    """A target URL as ``hookah.urls`` accepts it at submission, or a ``400 bad_url``."""
    try:
        check_submitted(value, name)
    except BadURL as e:
        advice = " Send credentials with X-Hookah-Header-Authorization." if e.kind == "userinfo" else ""
        raise ApiError(400, "bad_url", str(e) + advice)
    return value


def _short(name: str) -> str:
    """A name as a log line shows it: quoted, escaped, and cut to a length."""
    shown = repr(name)
    return shown if len(shown) <= LOGGED_NAME_LENGTH else shown[: LOGGED_NAME_LENGTH - 3] + "..."


def _number(name: str, raw: str, minimum: float, maximum: float) -> float:
    if not DECIMAL.match(raw):
        raise ApiError(400, "bad_parameter", f"{name} must be a number of seconds such as 1.5, not {raw!r}.")
    value = float(raw)
    if not minimum <= value <= maximum:
        raise ApiError(400, "bad_parameter", f"{name} must be from {minimum:.10g} to {maximum:.10g} seconds.")
    return value


def delivery_headers(request: server.Request) -> List[Tuple[str, str]]:
    """The ``X-Hookah-Header-<Name>: v`` headers, checked: names a caller may set, values without control characters."""
    headers: List[Tuple[str, str]] = []
    for raw_name, raw_values in request.requestHeaders.getAllRawHeaders():
        if not raw_name.lower().startswith(HEADER_PREFIX):
            continue
        name = raw_name[len(HEADER_PREFIX):].decode("latin-1")
        if not HEADER_NAME.match(name):
            raise ApiError(400, "bad_header", f"X-Hookah-Header-{name} does not name a valid header.")
        lowered = name.lower()
        if lowered in FORBIDDEN_HEADERS or lowered.startswith(FORBIDDEN_HEADER_PREFIX):
            raise ApiError(400, "bad_header", f"X-Hookah-Header-{name} cannot be set on a delivery: Hookah sets {name} itself.")
        for raw_value in raw_values:
            value = raw_value.decode("latin-1")
            if not HEADER_VALUE.match(value):
                raise ApiError(400, "bad_header", f"X-Hookah-Header-{name} has a control character in its value.")
            headers.append((name, value))
    return headers


def _query_controls(args: Dict[bytes, List[bytes]]) -> List[Tuple[str, bytes]]:
    """
    The ``_``-parameters of the query string, from the ``request.args``
    Twisted has already parsed (parsing the query again would cost as much).
    """
    controls: List[Tuple[str, bytes]] = []
    for name, values in args.items():
        if name.startswith(b"_"):
            text = control_name(name)
            controls.extend((text, value) for value in values)
    return controls


def read_controls(pairs: Iterable[Tuple[str, bytes]]) -> Tuple[Dict[str, str], List[str]]:
    """
    Hookah's control values, and the names of the unknown ``_`` fields.

    Every ``_`` field is a control field: it never reaches the target. One
    Hookah does not know (Rails' ``_method``, Laravel's ``_token``) is not a
    reason to refuse the request either; it is dropped and named in the
    reply, so that a typo such as ``_retry`` still shows. A known control
    must be well-formed: a value that is not UTF-8, or two different values,
    is a ``400``. RFC 7578's ``_charset_``, which browsers add to forms, is
    dropped without a word.
    """
    values: Dict[str, str] = {}
    ignored: Dict[str, None] = {}  # ordered, each name once
    for name, raw in pairs:
        if name not in CONTROLS:
            if name not in SILENTLY_DROPPED:
                ignored[name] = None
            continue
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_parameter", f"{name} is not valid UTF-8 text.")
        if name in values and values[name] != value:
            raise ApiError(400, "bad_parameter", f"{name} is given more than once with different values.")
        values[name] = value
    return values, list(ignored)


def parse_dispatch(request: server.Request) -> Tuple[DispatchRequest, List[str]]:
    """
    Turn an HTTP request into a checked ``DispatchRequest`` or raise
    ``ApiError``; also the unknown ``_`` fields it dropped (``read_controls``).
    """
    raw_type = request.getHeader(b"content-type")
    content_type = raw_type.decode("latin-1") if raw_type is not None else None
    try:
        body = request.content.read() if request.content is not None else b""
        payload = split_payload(body, content_type)
    except PayloadError as e:
        raise ApiError(400, "bad_payload", str(e))
    values, ignored = read_controls(_query_controls(request.args or {}) + payload.controls)
    url, topic = values.get("_url"), values.get("_topic")
    if not url and not topic:
        raise ApiError(400, "missing_destination", "Give the destination as _url (one target) or _topic (its subscribers and streams).")
    if url and topic:
        raise ApiError(400, "bad_parameter", "Give either _url or _topic, not both.")
    headers = delivery_headers(request)
    raw_key = request.getHeader(b"idempotency-key")
    key = raw_key.decode("utf-8", "replace") if raw_key is not None else values.get("_id")
    if key is not None and not 0 < len(key) <= 255:
        raise ApiError(400, "bad_parameter", "An idempotency key must be 1 to 255 characters long.")
    retries = None
    if "_retries" in values:
        raw = values["_retries"]
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > MAX_RETRIES:
            raise ApiError(400, "bad_parameter", f"_retries must be a whole number from 0 to {MAX_RETRIES}, not {raw!r}.")
        retries = int(raw)
    dispatch = DispatchRequest(
        url=check_url("_url", url) if url else None,
        # The hub's rule for topic URLs (5.1.1), so that one topic has one name.
        topic=decode_unreserved(topic) if topic else None,
        body=payload.body,
        content_type=payload.content_type,
        headers=tuple(headers),
        errback=check_url("_errback", values["_errback"]) if "_errback" in values else None,
        callback=check_url("_callback", values["_callback"]) if "_callback" in values else None,
        retries=retries,
        delay=_number("_delay", values["_delay"], 0.0, MAX_DELAY) if "_delay" in values else 0.0,
        timeout=_number("_timeout", values["_timeout"], MIN_TIMEOUT, MAX_TIMEOUT) if "_timeout" in values else None,
        idempotency_key=key,
    )
    return dispatch, ignored


def log_ignored(accepted: Accepted, ignored: Sequence[str]) -> None:
    """
    One log line per accepted dispatch that dropped unknown ``_`` fields:
    their names (never their values, which may be CSRF tokens), bounded in
    number and length whatever the request held.
    """
    if not ignored:
        return
    shown = ", ".join(_short(name) for name in ignored[:LOGGED_NAMES])
    log.info(
        "dispatch {id}: ignored {count} unknown control parameter(s), not sent to the target: {names}",
        id=accepted.id,
        duplicate=accepted.duplicate,
        count=len(ignored),
        names=shown + (", ..." if len(ignored) > LOGGED_NAMES else ""),
        ignored=list(ignored[:LOGGED_NAMES]),
    )


def accepted_body(request: server.Request, accepted: Accepted, ignored: Sequence[str] = ()) -> bytes:
    if accepted.topic is None and not ignored and not accepted.duplicate and accepted.id.isalnum() and accepted.id.isascii():
        # The common answer, with parts that are fixed: the bytes
        # json_body would make, without building and encoding a dict.
        request.setResponseCode(202)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Location", accepted.location.encode())
        return b'{"id":"' + accepted.id.encode("ascii") + _ACCEPTED_TAIL
    body: Dict[str, Any] = {"id": accepted.id, "status": SCHEDULED}
    if accepted.topic is not None:
        body["subscribers"] = accepted.subscribers  # null on a duplicate
    if ignored:
        # This request's own fields, so a repeat that drops some says so too.
        body["ignored"] = list(ignored)
    if accepted.duplicate:
        return json_body(request, 200, dict(body, duplicate=True), Location=accepted.location)
    return json_body(request, 202, body, Location=accepted.location)


_ACCEPTED_TAIL = b'","status":"' + SCHEDULED.value.encode() + b'"}\n'


class DispatchResource(JsonResource):
    """``/dispatch``: POST to queue, GET to list."""

    def __init__(self, core: HookahCore) -> None:
        super().__init__()
        self.core = core

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"":
            return self
        return DeliveryResource(self.core, path.decode("utf-8", "replace"))

    def render_POST(self, request: server.Request) -> object:
        # Plain callbacks rather than a coroutine: this is the hot path.
        def handle() -> Deferred:
            dispatch, ignored = parse_dispatch(request)
            refusal = self.core.refusal(dispatch)
            if refusal is not None:
                raise ApiError(400, "refused_target", refusal)
            def answer(accepted: Accepted) -> bytes:
                log_ignored(accepted, ignored)
                return accepted_body(request, accepted, ignored)

            return self.core.dispatch(dispatch).addCallback(answer)

        return render_async(request, handle)

    def render_GET(self, request: server.Request) -> object:
        async def handle() -> bytes:
            args = query_args(request)
            wanted = args.get("status") or None
            try:
                status = delivery_status(wanted) if wanted is not None else None
            except ValueError:
                raise ApiError(400, "bad_parameter", f"status must be one of {', '.join(STATUSES)}.")
            limit = int_arg(args, "limit", 50, 1, 1000)
            after = args.get("after") or None
            page = await self.core.list_deliveries(status, limit, after)
            return json_body(
                request,
                200,
                {
                    "deliveries": [self.core.delivery_json(d) for d in page],
                    "next": page[-1].id if len(page) == limit else None,
                },
            )

        return render_async(request, handle)


class DeliveryResource(JsonResource):
    """``GET /dispatch/<id>``: one delivery and its attempts."""

    def __init__(self, core: HookahCore, delivery_id: str) -> None:
        super().__init__()
        self.core = core
        self.delivery_id = delivery_id

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"retry":
            return RetryResource(self.core, self.delivery_id)
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: server.Request) -> object:
        async def handle() -> bytes:
            delivery = await self.core.get_delivery(self.delivery_id)
            if delivery is None:
                raise ApiError(404, "not_found", f"There is no delivery {self.delivery_id}.")
            return json_body(request, 200, self.core.delivery_json(delivery))

        return render_async(request, handle)


class RetryResource(JsonResource):
    """``POST /dispatch/<id>/retry``: resend a finished delivery."""

    not_allowed_message = "POST to /dispatch/<id>/retry to resend a delivery."

    def __init__(self, core: HookahCore, delivery_id: str) -> None:
        super().__init__()
        self.core = core
        self.delivery_id = delivery_id

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_POST(self, request: server.Request) -> object:
        async def handle() -> bytes:
            delivery = await self.core.get_delivery(self.delivery_id)
            if delivery is None:
                raise ApiError(404, "not_found", f"There is no delivery {self.delivery_id}.")
            requeued = await self.core.retry(self.delivery_id)
            if requeued is None:
                raise ApiError(409, "not_finished", f"Delivery {self.delivery_id} is {delivery.status}; only delivered or failed deliveries can be resent.")
            return json_body(request, 202, {"id": requeued.id, "status": requeued.status}, Location=f"/dispatch/{requeued.id}")

        return render_async(request, handle)
