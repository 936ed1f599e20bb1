"""
Cross-origin requests from browsers (CORS), for the mounts a page may use.

Server-Sent Events exist for browsers, and a page served from another
origin than Hookah's (an app on ``https://shop.example`` reading
``https://hooks.example/stream``) may read a response only when Hookah says
so. ``--cors-origins`` lists the origins allowed (or ``*``); without it no
CORS header is ever sent and ``OPTIONS`` stays a ``405``, as before.

``CorsResource`` wraps a mount (outside its ``Guard``, since a preflight
carries no credentials and a refusal must still be readable by the page):

- An actual request whose ``Origin`` is allowed, with a method the mount
  lets pages use, gets ``Access-Control-Allow-Origin`` (the origin itself,
  or ``*``), ``Access-Control-Expose-Headers`` and, for an origin listed by
  name, ``Access-Control-Allow-Credentials: true``: the admin cookie and
  ``EventSource(..., {withCredentials: true})`` work only for origins the
  operator named, never for ``*``. With named origins every response of
  the mount carries ``Vary: Origin``, so that a cache never hands one
  origin's answer to another; with ``*`` every response carries the same
  ``Access-Control-Allow-Origin: *``, ``Origin`` or not.
- A preflight (``OPTIONS`` with ``Origin`` and
  ``Access-Control-Request-Method``) is answered here, ``204`` with the
  methods and the requested header names that are allowed, or ``403``
  without any CORS header when the origin, the method or a header is not:
  the browser then refuses the request and the message says why.
- A disallowed origin's actual request is served as before, without CORS
  headers, so its page cannot read the answer. (CORS protects what a page
  may read, not what reaches the server: the tokens do that.)
"""

from __future__ import annotations

from typing import FrozenSet, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import attr
from twisted.web import server
from twisted.web.resource import IResource, Resource

from hookah.web.common import ApiError, error_body

__all__ = ["CorsPolicy", "CorsResource", "cors", "normalise_origin", "ALLOWED_HEADERS", "EXPOSED_HEADERS"]

# Request headers a page may send: the ones Hookah reads (EventSource sends
# Last-Event-ID and Cache-Control on its own), and the safelisted ones a
# browser still names when their values are unusual.
ALLOWED_HEADERS = frozenset(
    [
        "accept", "accept-language", "content-language", "content-type", "cache-control",
        "authorization", "last-event-id", "idempotency-key",
    ]
)
ALLOWED_HEADER_PREFIX = "x-hookah-header-"
# Response headers a page may read besides the safelisted ones: where a new
# delivery lives, when to come back, and why a token was refused.
EXPOSED_HEADERS = b"Location, Retry-After, WWW-Authenticate"
# Seconds a browser may reuse a preflight's answer.
MAX_AGE = b"600"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_origin(text: str) -> str:
    """
    An origin as browsers serialise it in ``Origin``
    (``https://example.com``, ``http://127.0.0.1:8080``), or ``ValueError``.
    """
    raw = text.strip()
    try:
        parts = urlsplit(raw[:-1] if raw.endswith("/") else raw)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin such as https://app.example.com")
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path or parts.query or parts.fragment:
        raise ValueError(f"{text!r} is not an origin such as https://app.example.com (scheme, host and port only)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{text!r} is not an origin: it has a user name")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@attr.s(auto_attribs=True, frozen=True)
class CorsPolicy:
    """The configured origins: ``any_origin`` for ``*``, else the named ones."""

    origins: FrozenSet[bytes] = frozenset()
    any_origin: bool = False

    @classmethod
    def from_config(cls, origins: Sequence[str]) -> Optional[CorsPolicy]:
        """None when CORS is off (no origins configured)."""
        if not origins:
            return None
        if tuple(origins) == ("*",):
            return cls(any_origin=True)
        return cls(origins=frozenset(o.encode("ascii", "replace") for o in origins))

    def allows(self, origin: bytes) -> bool:
        # "null" (sandboxed frames, file: pages) is never an origin one can trust by name.
        return self.any_origin or (origin in self.origins and origin != b"null")

    def allow_origin(self, request: server.Request, origin: bytes) -> None:
        """The headers of a response an allowed origin's page may read."""
        if self.any_origin:
            request.setHeader(b"Access-Control-Allow-Origin", b"*")
        else:
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")


def requested_headers(request: server.Request) -> List[str]:
    """The names in ``Access-Control-Request-Headers``, lower-cased, in order."""
    names: List[str] = []
    for value in request.requestHeaders.getRawHeaders(b"access-control-request-headers") or []:
        for name in value.decode("latin-1").split(","):
            name = name.strip().lower()
            if name and name not in names:
                names.append(name)
    return names


def header_allowed(name: str) -> bool:
    return name in ALLOWED_HEADERS or (name.startswith(ALLOWED_HEADER_PREFIX) and len(name) > len(ALLOWED_HEADER_PREFIX))


class _Preflight(Resource):
    """The answer to one preflight request: ``204`` with the grants, or a ``403``."""

    isLeaf = True

    def __init__(self, policy: CorsPolicy, methods: Sequence[bytes], origin: bytes) -> None:
        super().__init__()
        self.policy = policy
        self.methods = methods
        self.origin = origin

    def render(self, request: server.Request) -> bytes:
        request.responseHeaders.addRawHeader(b"Vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        refusal = self._refusal(request)
        if refusal is not None:
            return error_body(request, ApiError(403, "cors_refused", refusal))
        self.policy.allow_origin(request, self.origin)
        request.setHeader(b"Access-Control-Allow-Methods", b", ".join(self.methods))
        names = requested_headers(request)
        if names:
            request.setHeader(b"Access-Control-Allow-Headers", ", ".join(names).encode("latin-1"))
        request.setHeader(b"Access-Control-Max-Age", MAX_AGE)
        request.setResponseCode(204)
        return b""

    def _refusal(self, request: server.Request) -> Optional[str]:
        origin = self.origin.decode("latin-1")
        if not self.policy.allows(self.origin):
            return f"Pages from {origin} may not call this Hookah; its --cors-origins does not list them."
        method = (request.getHeader(b"access-control-request-method") or b"").strip()
        if method not in self.methods:
            allowed = ", ".join(m.decode("ascii") for m in self.methods)
            return f"{method.decode('latin-1')} is not allowed here cross-origin; pages may use {allowed}."
        refused = [name for name in requested_headers(request) if not header_allowed(name)]
        if refused:
            return (
                f"A page may not send {', '.join(refused)} here; the headers allowed are "
                f"{', '.join(sorted(ALLOWED_HEADERS))} and X-Hookah-Header-*."
            )
        return None


class CorsResource(Resource):
    """
    Wraps a mount (and everything below it) with the CORS rules above. It
    acts once per request: where traversal enters it (a child below the
    mount) or where it renders (the mount itself).
    """

    def __init__(self, wrapped: IResource, policy: CorsPolicy, methods: Sequence[bytes]) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.policy = policy
        allowed = set(methods)
        if b"GET" in allowed:
            allowed.add(b"HEAD")
        self.methods: Tuple[bytes, ...] = tuple(sorted(allowed))
        self.isLeaf = bool(getattr(wrapped, "isLeaf", False))

    def _preflight_or_decorate(self, request: server.Request) -> Optional[Resource]:
        origin = request.getHeader(b"origin")
        if request.method == b"OPTIONS" and origin is not None and request.getHeader(b"access-control-request-method") is not None:
            return _Preflight(self.policy, self.methods, origin)
        if request.method not in self.methods:
            return None
        if self.policy.any_origin:
            # The same answer with or without Origin: nothing for a cache to tell apart.
            self.policy.allow_origin(request, b"*")
            request.setHeader(b"Access-Control-Expose-Headers", EXPOSED_HEADERS)
            return None
        request.responseHeaders.addRawHeader(b"Vary", b"Origin")
        if origin is not None and self.policy.allows(origin):
            self.policy.allow_origin(request, origin)
            request.setHeader(b"Access-Control-Expose-Headers", EXPOSED_HEADERS)
        return None

    def getChildWithDefault(self, path: bytes, request: server.Request) -> IResource:
        preflight = self._preflight_or_decorate(request)
        if preflight is not None:
            return preflight
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request: server.Request) -> object:
        preflight = self._preflight_or_decorate(request)
        if preflight is not None:
            return preflight.render(request)
        return self.wrapped.render(request)


def cors(resource: IResource, policy: Optional[CorsPolicy], methods: Sequence[bytes]) -> IResource:
    """``root.putChild(b"stream", cors(..., policy, [b"GET"]))``; the resource itself when CORS is off."""
    if policy is None:
        return resource
    return CorsResource(resource, policy, methods)
