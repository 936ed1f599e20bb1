"""
Short-lived read tokens for ``/stream``: how a browser page subscribes when
``/stream`` needs the admin token.

``EventSource`` cannot send an ``Authorization`` header, and a page must
never hold the admin token itself. So the page's own server, which holds
the admin token, mints a token for what the page may read
(``POST /stream/tokens?topic=orders&ttl=600``, or ``hookah token``), and the
page opens ``/stream?topic=orders&access_token=<token>`` (the query
parameter of RFC 6750, 2.3). This is what Mercure and Nchan users do.

A token grants exactly one thing: ``GET``/``HEAD`` of ``/stream`` for some
or all of the topics it names, until it expires. No other endpoint reads
it (``/topics``, ``/dispatch``, the hub and the status page ignore it), a
stream opened with it ends when it expires (with a last ``token_expired``
message), and an admin or publisher token passed as ``access_token`` is
refused, since it is not a stream token: real tokens stay out of URLs.

The token is ``hst1.<expiry>.<topics>.<signature>``: the expiry in Unix
seconds, the topics as base64url JSON, and a base64url HMAC-SHA256 of
``hst1.<expiry>.<topics>`` under a key derived from an admin token (the
first configured one signs; every configured one verifies, all compared in
constant time). Nothing is stored, so any Hookah sharing the configuration
verifies it, and removing an admin token revokes the tokens it signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource, Resource

from hookah.core import EventHistory
from hookah.streams.registry import TopicRegistry
from hookah.web.auth import ADMIN, Tokens, bearer_token, guard
from hookah.web.common import ApiError, JsonResource, NotFound, error_body, int_arg, json_body, render_async
from hookah.web.payload import FORM_URLENCODED, parse_form
from hookah.web.stream import MAX_TOPICS, StreamResource, requested_topics, split_topics

__all__ = ["StreamTokens", "StreamAccess", "TokenResource", "stream_mount", "DEFAULT_TTL", "MAX_TTL", "PARAMETER"]

log = Logger()

VERSION = "hst1"
PARAMETER = b"access_token"
DEFAULT_TTL = 600
MAX_TTL = 86400
_KEY_CONTEXT = b"hookah stream read token v1"
_READ_METHODS = (b"GET", b"HEAD")
_PREFIX = VERSION.encode("ascii") + b"."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenError(Exception):
    """A token that grants nothing here; ``status`` 401 (not valid) or 403 (not for this)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@attr.s(auto_attribs=True, frozen=True)
class StreamTokens:
    """Mints and checks stream tokens with keys derived from the admin tokens."""

    keys: Tuple[bytes, ...]
    clock: IReactorTime

    @classmethod
    def from_admin_tokens(cls, admin_tokens: Sequence[bytes], clock: IReactorTime) -> Optional[StreamTokens]:
        """None when no admin token is configured: ``/stream`` is then open and needs no token."""
        if not admin_tokens:
            return None
        return cls(tuple(hmac.new(t, _KEY_CONTEXT, hashlib.sha256).digest() for t in admin_tokens), clock)

    def _sign(self, key: bytes, signed: str) -> str:
        return _b64(hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest())

    def mint(self, topics: Sequence[str], ttl: int) -> Tuple[str, int]:
        """A token for reading ``topics`` for ``ttl`` seconds, and its expiry (Unix seconds)."""
        expires = int(self.clock.seconds()) + ttl
        encoded = _b64(json.dumps(list(topics), separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        signed = f"{VERSION}.{expires}.{encoded}"
        return f"{signed}.{self._sign(self.keys[0], signed)}", expires

    def check(self, token: str, topics: Sequence[str]) -> float:
        """
        The token's expiry when it lets its bearer read every one of
        ``topics`` now; else ``TokenError`` saying why.
        """
        parts = token.split(".")
        if not token.isascii() or len(parts) != 4 or parts[0] != VERSION or not parts[1].isdigit() or len(parts[1]) > 12:
            raise TokenError(401, "access_token is not a stream token (mint one with POST /stream/tokens or `hookah token`).")
        signed, signature = ".".join(parts[:3]), parts[3].encode("ascii", "replace")
        valid = False
        for key in self.keys:  # every key, always: the time taken tells nothing
            valid |= hmac.compare_digest(self._sign(key, signed).encode("ascii"), signature)
        if not valid:
            raise TokenError(401, "access_token is not a valid stream token for this Hookah (or the admin token that signed it was removed).")
        expires = int(parts[1])
        if expires <= self.clock.seconds():
            raise TokenError(401, "The stream token has expired; mint a new one.")
        granted = json.loads(_unb64(parts[2]).decode("utf-8"))
        missing = [topic for topic in topics if topic not in granted]
        if missing:
            raise TokenError(403, f"The stream token does not cover the topic(s) {', '.join(map(repr, missing))}.")
        return float(expires)

    def expiry_of(self, request: server.Request) -> Optional[float]:
        """When the stream a request opens must end: its token's expiry, if it came with one that holds."""
        token = _token(request)
        if token is None:
            return None
        try:
            return self.check(token, requested_topics(request))
        except TokenError:
            return None


def _token(request: server.Request) -> Optional[str]:
    """
    The stream token a request presents: its ``access_token`` parameter,
    else an ``Authorization: Bearer`` header holding one (``hst1.``...).
    A client that can send a header should (``hookah tail --token``, a
    page's ``fetch``): the token then stays out of URLs. Any other bearer
    token is left to the admin guard.
    """
    values = (request.args or {}).get(PARAMETER)
    if values:
        return values[-1].decode("utf-8", "replace")
    bearer = bearer_token(request)
    if bearer is not None and bearer.startswith(_PREFIX):
        return bearer.decode("ascii", "replace")
    return None


def _refuse(request: server.Request, error: TokenError) -> bytes:
    scope = b"insufficient_scope" if error.status == 403 else b"invalid_token"
    request.setHeader(b"WWW-Authenticate", b'Bearer realm="hookah", error="' + scope + b'"')
    code = "forbidden" if error.status == 403 else "unauthorized"
    return error_body(request, ApiError(error.status, code, error.message))


class StreamAccess(Resource):
    """
    ``/stream``: a read with a stream token (``access_token``, or a bearer
    header holding one) is let in by that token alone (``stream``,
    unguarded); anything else goes to ``guarded``, which asks for the admin
    token as before. ``/stream/tokens`` is ``mint``.
    """

    def __init__(self, guarded: IResource, stream: IResource, tokens: Optional[StreamTokens], mint: IResource) -> None:
        super().__init__()
        self.guarded = guarded
        self.stream = stream
        self.tokens = tokens
        self.mint = mint

    def getChild(self, path: bytes, request: server.Request) -> IResource:
        if path == b"tokens" and not request.postpath:
            return self.mint
        if path == b"" and not request.postpath:
            return self
        return NotFound()

    def render(self, request: server.Request) -> Any:
        token = _token(request)
        if token is None or self.tokens is None or request.method not in _READ_METHODS:
            # Without admin tokens /stream is open: a token adds nothing.
            return self.guarded.render(request)
        try:
            self.tokens.check(token, requested_topics(request))
        except TokenError as e:
            return _refuse(request, e)
        return self.stream.render(request)


class TokenResource(JsonResource):
    """``POST /stream/tokens`` (admin): mint a read token for some topics."""

    not_allowed_message = "POST to /stream/tokens with topic=<name> (repeatable) and ttl=<seconds> to mint a stream token."

    def __init__(self, tokens: Optional[StreamTokens]) -> None:
        super().__init__()
        self.tokens = tokens

    def render_POST(self, request: server.Request) -> object:
        async def handle() -> bytes:
            if self.tokens is None:
                raise ApiError(
                    409, "tokens_off",
                    "This Hookah has no --admin-token, so /stream is open to every reader and needs no stream token.",
                )
            values, fields = _fields(request)
            topics = split_topics(values)
            if not topics:
                raise ApiError(400, "missing_topic", "Name the topic(s) the token may read: topic=<name>, repeated or comma-separated.")
            if len(topics) > MAX_TOPICS:
                raise ApiError(400, "too_many_topics", f"A stream token can name at most {MAX_TOPICS} topics.")
            ttl = int_arg(fields, "ttl", DEFAULT_TTL, 1, MAX_TTL)
            token, expires = self.tokens.mint(topics, ttl)
            log.info("minted a stream token for {topics}, valid {ttl}s", topics=topics, ttl=ttl)
            return json_body(request, 200, {"token": token, "topics": topics, "expires_at": expires, "expires_in": ttl})

        return render_async(request, handle)


def _fields(request: server.Request) -> Tuple[List[str], Dict[str, str]]:
    """``topic`` values and the other fields, from the query string and a form body."""
    pairs = [(k, v) for k, vs in (request.args or {}).items() for v in vs]
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type == FORM_URLENCODED.encode() and request.content is not None:
        pairs.extend(parse_form(request.content.read()))
    topics = [v.decode("utf-8", "replace") for k, v in pairs if k == b"topic"]
    fields = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in pairs if k != b"topic"}
    return topics, fields


def stream_mount(registry: TopicRegistry, history: EventHistory, clock: IReactorTime, buffer_limit: int, tokens: Tokens) -> Resource:
    """
    The ``/stream`` mount: streams for admin credentials (or for anyone when
    no admin token is configured) or for a stream token, and
    ``/stream/tokens`` to mint those, for admins.
    """
    stream_tokens = StreamTokens.from_admin_tokens(tokens.admin, clock)
    stream = StreamResource(registry, history, clock, buffer_limit, ends_at=stream_tokens.expiry_of if stream_tokens else None)
    mint = guard(TokenResource(stream_tokens), tokens, ADMIN)
    return StreamAccess(guard(stream, tokens, ADMIN), stream, stream_tokens, mint)
