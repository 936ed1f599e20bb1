"""
The outgoing HTTP client every delivery, verification and fetch goes through.

One place owns the connection pool, the per-request deadline (which covers
the response body too, so a target that trickles bytes cannot hold a slot
forever), the cap on how much of a response is kept, and the
``User-Agent``. Redirects are never followed here; the one caller that
wants them (fetching a published topic) follows them itself. No cookies are
kept: a target's ``Set-Cookie`` never rides along on later requests.

It speaks HTTP/1.1 itself rather than through Twisted's ``Agent``: a request
is one ``bytes`` built from the parsed target (cached per URL), written at
once on a plain TCP connection (``hookah.outbound.connection``), its answer
read by ``hookah.outbound.parser``, one callback per exchange and no
Deferred until the caller's. Under load ``Agent.request`` and its response
parser cost a quarter of the reactor thread per webhook.

Connections come from the SSRF-guarded endpoints (``hookah.outbound.ssrf``)
and are kept by ``hookah.outbound.pool``. As with Twisted's pool, a request
sent on a reused connection that closes before any byte of an answer (the
peer timed it out as we wrote) is sent again once on a new connection, for
``GET`` and ``HEAD`` only: a ``POST`` might have been acted on, and the
dispatcher's retry schedule decides about it.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from hookah import __version__, defaults
from hookah.outbound.connection import HTTPConnection, Key
from hookah.outbound.interface import IHTTPClient
from hookah.outbound.outcome import NoResponse, Response, TimedOut, describe_failure
from hookah.outbound.parser import ResponseParser
from hookah.outbound.pool import ConnectionPool
from hookah.urls import AddressPolicy, BadURL, parse_target

__all__ = ["HTTPClient", "Response", "TimedOut", "USER_AGENT", "describe_failure", "guarded_client"]

USER_AGENT = f"hookah/{__version__}"

# Methods sent again on a new connection when a reused one closed unanswered.
_IDEMPOTENT = frozenset((b"GET", b"HEAD"))
# Framing and routing are the client's: a caller's header of these names is not sent.
_OWN_HEADERS = frozenset(("host", "content-length", "transfer-encoding", "connection", "te", "upgrade"))
_BODY_EXPECTED = frozenset((b"POST", b"PUT", b"PATCH"))


@functools.lru_cache(maxsize=1024)
def _route(url: str) -> Tuple[Key, bytes, bytes]:
    """(pool key, Host header value, request target) for a URL; ``BadURL`` if it is no target."""
    target = parse_target(url)
    host = f"[{target.host}]" if ":" in target.host else target.host
    if target.port != (80 if target.scheme == "http" else 443):
        host = f"{host}:{target.port}"
    wire = target.wire
    path = wire[wire.index(b"/", len(target.scheme) + 3) :]
    return (target.scheme, target.host, target.port), host.encode("ascii"), path


def _header_block(headers: Sequence[Tuple[str, str]]) -> bytes:
    """
    The caller's header lines, as sent. A line break in a name or value
    (which would smuggle in a header or a request) refuses the request;
    submission refuses them before, this keeps the framing whoever calls.
    """
    if not headers:
        return b""
    lines = [f"{name}: {value}\r\n" for name, value in headers if name.lower() not in _OWN_HEADERS]
    block = "".join(lines)
    if block.count("\n") != len(lines) or block.count("\r") != len(lines):
        raise ValueError("a header contains a line break")
    return block.encode("latin-1")


@implementer(IHTTPClient)
class HTTPClient:
    """
    Requests with a deadline over a ``ConnectionPool``. ``endpoints`` gives
    the endpoint for a (scheme, host, port): in production the
    ``GuardedEndpointFactory``, in tests anything with ``endpoint_for``.
    ``close`` ends the pool's connections (call it on stop).
    """

    def __init__(
        self,
        clock: IReactorTime,
        endpoints: Any,
        max_response_body: int = 1024 * 1024,
        user_agent: str = USER_AGENT,
        max_idle_per_host: int = defaults.HOST_CONCURRENCY,
        idle_timeout: float = 120.0,
    ) -> None:
        self._clock = clock
        self._max_body = max_response_body
        self._user_agent = b"\r\nUser-Agent: " + user_agent.encode("ascii") + b"\r\n"
        self.pool = ConnectionPool(clock, endpoints, max_idle_per_host, idle_timeout)

    def request(
        self,
        method: str,
        url: str,
        headers: Sequence[Tuple[str, str]] = (),
        body: Optional[bytes] = None,
        timeout: float = defaults.TIMEOUT,
    ) -> Deferred:
        """Deferred[Response]; fails with ``TimedOut`` past ``timeout`` seconds."""
        try:
            key, host, path = _route(url)
            verb = method.encode("ascii")
            parts = [verb, b" ", path, b" HTTP/1.1\r\nHost: ", host, self._user_agent]
            parts.append(_header_block(headers))
            if body is not None:
                parts += [b"Content-Length: ", str(len(body)).encode("ascii"), b"\r\n\r\n", body]
            elif verb in _BODY_EXPECTED:
                parts.append(b"Content-Length: 0\r\n\r\n")
            else:
                parts.append(b"\r\n")
        except BadURL:
            # A URL that is no target (refused at submission, but a redirect
            # or an old row may carry one) fails this request; as a
            # ``TargetRefused`` it is not retried.
            return fail()
        except (UnicodeError, ValueError) as e:
            return fail(BadURL(f"the request cannot be sent: {e}"))
        return _Exchange(self, key, b"".join(parts), verb, timeout).start()

    def close(self) -> Deferred:
        """Close the pool's idle connections; Deferred fired once they have ended."""
        return self.pool.close()


class _Exchange:
    """One request: its deadline, the connection it is on, and at most one resend."""

    __slots__ = ("_client", "_key", "_data", "_verb", "_timeout", "_result", "_timer", "_connecting",
                 "_connection", "_reused", "_resent", "_finished")

    def __init__(self, client: HTTPClient, key: Key, data: bytes, verb: bytes, timeout: float) -> None:
        self._client = client
        self._key = key
        self._data = data
        self._verb = verb
        self._timeout = timeout
        self._connecting: Optional[Deferred] = None
        self._connection: Optional[HTTPConnection] = None
        self._reused = False
        self._resent = False
        self._finished = False

    def start(self) -> Deferred:
        self._result: Deferred = Deferred(self._cancel)
        self._timer: IDelayedCall = self._client._clock.callLater(self._timeout, self._expire)
        connection = self._client.pool.take(self._key)
        if connection is not None:
            self._reused = True
            self._send(connection)
        else:
            self._connect()
        return self._result

    def _connect(self) -> None:
        self._reused = False
        d = self._connecting = self._client.pool.connect(self._key)
        d.addCallbacks(self._connected, self._not_connected)

    def _connected(self, connection: HTTPConnection) -> None:
        self._connecting = None
        if self._finished:
            # The deadline passed while connecting: the connection is new and clean.
            self._client.pool.put(connection)
            return
        self._send(connection)

    def _not_connected(self, failure: Failure) -> None:
        self._connecting = None
        if not self._finished:
            self._end(failure)

    def _send(self, connection: HTTPConnection) -> None:
        self._connection = connection
        parser = ResponseParser(self._verb == b"HEAD", self._client._max_body)
        connection.send(self._data, parser, self._answered)

    def _answered(self, outcome: Any) -> None:
        connection = self._connection
        self._connection = None
        if isinstance(outcome, ResponseParser):
            if outcome.reusable and connection is not None:
                self._client.pool.put(connection)
            self._end(Response(outcome.code, outcome.headers, outcome.body, outcome.truncated))
            return
        if self._reused and not self._resent and self._verb in _IDEMPOTENT and outcome.check(NoResponse):
            self._resent = True
            self._connect()
            return
        self._end(outcome)

    def _end(self, outcome: Any) -> None:
        self._finished = True
        if self._timer.active():
            self._timer.cancel()
        if isinstance(outcome, Failure):
            self._result.errback(outcome)
        else:
            self._result.callback(outcome)

    def _expire(self) -> None:
        self._stop()
        self._result.errback(Failure(TimedOut(f"timed out after {self._timeout:g}s")))

    def _cancel(self, d: Deferred) -> None:
        # The caller cancelled: Deferred fails itself with CancelledError.
        if self._timer.active():
            self._timer.cancel()
        self._stop()

    def _stop(self) -> None:
        self._finished = True
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.abandon()
        connecting = self._connecting
        if connecting is not None:
            self._connecting = None
            connecting.cancel()


def guarded_client(
    reactor: Any,
    pool_size: int,
    policy: AddressPolicy,
    connect_timeout: float = 10.0,
    resolve: Any = None,
    max_response_body: int = 1024 * 1024,
) -> HTTPClient:
    """
    The production client: connections only where ``policy`` allows, at
    most ``pool_size`` idle per target, kept 120 s. ``resolve`` (host, port)
    -> Deferred[addresses] replaces ``getaddrinfo`` (embedding, tests).
    """
    from hookah.outbound.ssrf import GuardedEndpointFactory

    endpoints = GuardedEndpointFactory(reactor, policy, resolve=resolve, connect_timeout=connect_timeout)
    return HTTPClient(reactor, endpoints, max_response_body, max_idle_per_host=pool_size, idle_timeout=120.0)
