"""
Bearer-token authentication: who may publish, who may look and resend.

Two roles, each switched on by configuring tokens for it
(``--publisher-token``, ``--admin-token``; off when none are configured, for
local use):

- ``publisher``: ``POST /dispatch`` and WebSub ``hub.mode=publish``;
- ``admin``: the status page, delivery inspection and resend, subscription
  and topic listings, ``/stream``, ``POST /stream/tokens``, ``/metrics``.
  An admin token is also accepted wherever a publisher token is.

WebSub subscribe is not a role here: the protocol has callbacks subscribe
themselves, and verification of intent is what protects it; an operator
who wants it closed sets ``--subscribe-token``, checked by
``hookah.websub.access`` in the hub itself.

Tokens arrive as ``Authorization: Bearer <token>`` and are compared with
``hmac.compare_digest`` against *every* configured token (no early exit),
so neither timing nor the number of tokens leaks which one nearly matched.

Browsers cannot attach a bearer header to a link or a form, so the status
page signs people in with a form (``POST /login``, never a token in a URL
that would land in access logs and browser history). It sets an
``HttpOnly; SameSite=Strict`` cookie whose value is an HMAC *derived* from
the admin token, so the cookie never carries the token itself and stops
working when that token is removed from the configuration. A cookie counts
only as an admin credential, and on any request that changes something
(not ``GET``/``HEAD``) only when the browser says the request comes from
this same site (``Origin`` or ``Sec-Fetch-Site``): another site cannot make
a signed-in browser resend deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Callable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import attr
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource, Resource

from hookah.web.common import ApiError, error_body

log = Logger()

PUBLISHER = "publisher"
ADMIN = "admin"
COOKIE_NAME = b"hookah_session"
COOKIE_MAX_AGE = 12 * 3600
_COOKIE_CONTEXT = b"hookah status page session v1"
_SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")

# What a mount requires: a role for every request, or a function of the
# request and the path segments below the mount point (None: open).
PolicyFunction = Callable[[server.Request, List[bytes]], Optional[str]]
Policy = Union[str, PolicyFunction]


def _matches(given: bytes, candidates: Sequence[bytes]) -> bool:
    """Constant-time membership: every candidate is compared, always."""
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(given, candidate)
    return found


def session_value(token: bytes) -> bytes:
    """The cookie value for an admin token: derived, so the cookie is not the token."""
    return hmac.new(token, _COOKIE_CONTEXT, hashlib.sha256).hexdigest().encode()


@attr.s(auto_attribs=True, frozen=True)
class Tokens:
    """The configured tokens, as bytes, with the cookie values derived once."""

    publisher: Tuple[bytes, ...] = ()
    admin: Tuple[bytes, ...] = ()
    public_url: Optional[str] = None
    sessions: Tuple[bytes, ...] = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "sessions", tuple(session_value(t) for t in self.admin))

    @classmethod
    def from_config(cls, config: object) -> Tokens:
        return cls(
            publisher=tuple(t.encode() for t in getattr(config, "publisher_tokens", ())),
            admin=tuple(t.encode() for t in getattr(config, "admin_tokens", ())),
            public_url=getattr(config, "public_url", None),
        )

    def required(self, role: Optional[str]) -> bool:
        """Whether ``role`` is enforced: only when tokens are configured for it."""
        if role == ADMIN:
            return bool(self.admin)
        if role == PUBLISHER:
            return bool(self.publisher)
        return False

    def is_admin_token(self, token: bytes) -> bool:
        return _matches(token, self.admin)

    # -- checking a request -----------------------------------------------------

    def role_of(self, request: server.Request) -> Optional[str]:
        """The strongest role the request's credentials grant, or None."""
        token = bearer_token(request)
        if token is not None:
            is_admin = _matches(token, self.admin)
            is_publisher = _matches(token, self.publisher)
            return ADMIN if is_admin else PUBLISHER if is_publisher else None
        cookie = request.getCookie(COOKIE_NAME)
        if cookie is not None and _matches(cookie, self.sessions):
            if request.method in _SAFE_METHODS or self.same_site(request):
                return ADMIN
        return None

    def same_site(self, request: server.Request) -> bool:
        """
        Whether a browser request comes from a page of this Hookah: browsers
        send ``Sec-Fetch-Site`` and ``Origin`` on POSTs, and a page on
        another site can forge neither.
        """
        fetch_site = request.getHeader(b"sec-fetch-site")
        if fetch_site is not None:
            return fetch_site == b"same-origin"
        origin = request.getHeader(b"origin")
        if origin is None or origin == b"null":
            return False
        origin_host = urlsplit(origin.decode("latin-1")).netloc.lower()
        hosts = {(request.getHeader(b"host") or b"").decode("latin-1").lower()}
        if self.public_url:
            hosts.add(urlsplit(self.public_url).netloc.lower())
        return origin_host in hosts

    def check(self, request: server.Request, role: Optional[str]) -> Optional[ApiError]:
        """None when the request may proceed, else the error to answer with."""
        if not self.required(role):
            return None
        granted = self.role_of(request)
        if granted == ADMIN or (granted == PUBLISHER and role == PUBLISHER):
            return None
        if granted == PUBLISHER:
            return ApiError(403, "forbidden", "This endpoint needs an admin token; a publisher token is not enough.")
        if bearer_token(request) is not None:
            return ApiError(401, "unauthorized", f"The bearer token is not a valid {role} token.")
        return ApiError(401, "unauthorized", f"This endpoint needs {_article(role)} {role} token: send Authorization: Bearer <token>.")


def _article(word: Optional[str]) -> str:
    return "an" if (word or "x")[0] in "aeiou" else "a"


def bearer_token(request: server.Request) -> Optional[bytes]:
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip()


def challenge(request: server.Request, error: ApiError) -> None:
    """The ``WWW-Authenticate`` header RFC 6750 asks for with a 401 or 403."""
    value = b'Bearer realm="hookah"'
    if error.status == 403:
        value += b', error="insufficient_scope"'
    elif bearer_token(request) is not None:
        value += b', error="invalid_token"'
    request.setHeader(b"WWW-Authenticate", value)


def dispatch_policy(request: server.Request, subpath: List[bytes]) -> Optional[str]:
    """``POST /dispatch`` publishes; everything else below it inspects or resends."""
    if request.method == b"POST" and subpath in ([], [b""]):
        return PUBLISHER
    return ADMIN


def hub_policy(default_mode: Optional[str] = None) -> PolicyFunction:
    """
    ``/hub`` (and ``/publish``, whose ``default_mode`` is publish): publish
    needs a publisher token, subscribe and unsubscribe stay open, and the
    listings below it (``/hub/subscriptions``) are admin. The mode is in
    the body, so it is read here and the body rewound for the hub itself.
    """

    def policy(request: server.Request, subpath: List[bytes]) -> Optional[str]:
        if subpath not in ([], [b""]):
            return ADMIN
        if request.method != b"POST":
            return None
        return PUBLISHER if _hub_mode(request, default_mode) == "publish" else None

    return policy


def _hub_mode(request: server.Request, default_mode: Optional[str]) -> Optional[str]:
    """The mode the hub will act on, by the hub's own rule (``hub_mode``)."""
    from hookah.web.hub import HubError, hub_mode, hub_params

    try:
        return hub_mode(hub_params(request), default_mode)
    except HubError:
        # Malformed (bad encoding, hub.mode given twice differently): the
        # hub refuses it with the same error before acting on anything.
        return default_mode
    finally:
        if request.content is not None:
            request.content.seek(0)


# What a guard answers a denied request with; the status page shows people
# a sign-in form instead of JSON.
Denied = Callable[[server.Request, ApiError], bytes]


def _json_denied(request: server.Request, error: ApiError) -> bytes:
    return error_body(request, error)


class _Refusal(Resource):
    isLeaf = True

    def __init__(self, error: ApiError, denied: Denied) -> None:
        super().__init__()
        self.error = error
        self.denied = denied

    def render(self, request: server.Request) -> bytes:
        challenge(request, self.error)
        return self.denied(request, self.error)


class Guard(Resource):
    """
    Wraps a resource (and everything below it) so that a request reaches it
    only with the credentials the policy asks for. The check happens during
    traversal, before the wrapped resource sees the request at all.
    """

    def __init__(self, wrapped: IResource, tokens: Tokens, policy: Policy, denied: Optional[Denied] = None) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.tokens = tokens
        self.policy = policy
        self.denied = denied or _json_denied
        self.isLeaf = bool(getattr(wrapped, "isLeaf", False))

    def _role(self, request: server.Request, subpath: List[bytes]) -> Optional[str]:
        if isinstance(self.policy, str):
            return self.policy
        return self.policy(request, subpath)

    def _refusal(self, request: server.Request, subpath: List[bytes]) -> Optional[_Refusal]:
        if not (self.tokens.publisher or self.tokens.admin):
            return None  # authentication off: not even the policy runs
        error = self.tokens.check(request, self._role(request, subpath))
        return None if error is None else _Refusal(error, self.denied)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> IResource:
        tokens = self.tokens
        if tokens.publisher or tokens.admin:  # else authentication is off: no path to build
            refusal = self._refusal(request, [path] + list(request.postpath or []))
            if refusal is not None:
                return refusal
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request: server.Request) -> object:
        tokens = self.tokens
        if tokens.publisher or tokens.admin:
            refusal = self._refusal(request, list(request.postpath or []) if self.isLeaf else [])
            if refusal is not None:
                return refusal.render(request)
        return self.wrapped.render(request)


def guard(resource: IResource, tokens: Tokens, policy: Policy, denied: Optional[Denied] = None) -> Resource:
    """``root.putChild(b"metrics", guard(MetricsResource(...), tokens, ADMIN))``."""
    return Guard(resource, tokens, policy, denied)


def describe(tokens: Tokens) -> None:
    """Say at start-up what is protected, so an open admin side is never a surprise."""
    if tokens.publisher or tokens.admin:
        log.info(
            "authentication: publishing {publishing}, admin endpoints {admin}",
            publishing="needs a token" if tokens.publisher else "open",
            admin="need a token" if tokens.admin else "open (no --admin-token)",
        )
