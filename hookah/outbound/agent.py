"""
The outgoing HTTP client every delivery, verification and fetch goes through.

One place owns the connection pool, the per-request deadline (which covers
the response body too, so a target that trickles bytes cannot hold a slot
forever), the cap on how much of a response is kept, and the
``User-Agent``. Redirects are never followed here; the one caller that
wants them (fetching a published topic) follows them itself.
"""

from __future__ import annotations

import socket
from typing import Any, List, Optional, Sequence, Tuple

import attr
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from hookah import __version__, defaults
from hookah.outbound.interface import IHTTPClient
from hookah.urls import wire_url

USER_AGENT = f"hookah/{__version__}"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Response:
    """What a target answered, with at most ``max_body`` bytes of its body."""

    code: int
    headers: Tuple[Tuple[str, str], ...]
    body: bytes
    truncated: bool = False

    def header(self, name: str) -> Optional[str]:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class TimedOut(Exception):
    """The request, body included, did not finish within its timeout."""


class _Collector(Protocol):
    def __init__(self, finished: Deferred, limit: int) -> None:
        self._finished = finished
        self._limit = limit
        self._chunks: List[bytes] = []
        self._size = 0
        self.truncated = False

    def dataReceived(self, data: bytes) -> None:
        room = self._limit - self._size
        if len(data) > room:
            self.truncated = True
            data = data[:room]
        if data:
            self._chunks.append(data)
            self._size += len(data)
        if self.truncated:
            # Keeping the rest would cost memory and time for bytes nobody
            # reads: drop the connection instead of draining it.
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished.called:
            return
        body = b"".join(self._chunks)
        if self.truncated or reason.check(webclient.ResponseDone, webclient.PotentialDataLoss):
            self._finished.callback((body, self.truncated))
        else:
            self._finished.errback(reason)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def read_body(response: Any, limit: int) -> Deferred:
    """Deferred[(bytes, truncated)]; cancelling it drops the connection."""
    collector: _Collector

    def cancel(d: Deferred) -> None:
        collector.abort()

    finished: Deferred = Deferred(cancel)
    collector = _Collector(finished, limit)
    response.deliverBody(collector)
    return finished


def _is_tls_failure(failure: Failure) -> bool:
    """A certificate or handshake failure (pyOpenSSL or service_identity)."""
    module = getattr(failure.type, "__module__", "") or ""
    return module.startswith(("OpenSSL", "service_identity"))


def describe_failure(failure: Failure, timeout: float) -> str:
    """One short sentence for an attempt's ``error`` field."""
    if failure.check(TimedOut, CancelledError, neterror.TimeoutError):
        return f"timed out after {timeout:g}s"
    if failure.check(neterror.ConnectionRefusedError):
        return "connection refused"
    if failure.check(neterror.DNSLookupError, socket.gaierror):
        return "DNS lookup failed"
    if failure.check(webclient.ResponseNeverReceived, webclient.RequestTransmissionFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        if any(r.check(CancelledError) for r in reasons):
            return f"timed out after {timeout:g}s"
        for reason in reasons:
            if _is_tls_failure(reason):
                return f"TLS failed: {str(reason.value)[:250]}"
        return "connection closed before a response"
    if failure.check(webclient.ResponseFailed):
        return "connection lost while reading the response"
    message = str(failure.value) or getattr(failure.type, "__name__", "error")
    return message[:300]


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one go: Twisted's
    ``FileBodyProducer`` would schedule a cooperative task per request.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IHTTPClient)
class HTTPClient:
    """
    Requests with a deadline over one ``IAgent``: in production an ``Agent``
    with the SSRF-guarded endpoints and the shared pool, in tests treq's
    ``RequestTraversalAgent``. Deliberately not ``treq``: it would wrap each
    request in cookie and decoding agents and re-parse the URL, which costs
    more than the rest of a delivery.
    """

    def __init__(
        self,
        agent: Any,
        clock: IReactorTime,
        max_response_body: int = 1024 * 1024,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._agent = agent
        self._clock = clock
        self._max_body = max_response_body
        self._user_agent = user_agent.encode("ascii")

    def request(
        self,
        method: str,
        url: str,
        headers: Sequence[Tuple[str, str]] = (),
        body: Optional[bytes] = None,
        timeout: float = defaults.TIMEOUT,
    ) -> Deferred:
        """Deferred[Response]; fails with ``TimedOut`` past ``timeout`` seconds."""
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            result.cancel()

        try:
            raw = Headers()
            raw.addRawHeader(b"User-Agent", self._user_agent)
            for name, value in headers:
                raw.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
            producer = BytesProducer(body) if body is not None else None
            # Agent never follows redirects: a 3xx is the target's answer.
            result: Deferred = self._agent.request(method.encode("ascii"), wire_url(url), raw, producer)
        except Exception:
            # A URL that is no target (``BadURL``: refused at submission,
            # but a redirect or an old row may carry one) fails this
            # request; as a ``TargetRefused`` it is not retried.
            return fail()
        result.addCallback(self._read)
        timer = self._clock.callLater(timeout, expire)

        def finish(outcome: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(outcome, Failure):
                return Failure(TimedOut(f"timed out after {timeout:g}s"))
            return outcome

        result.addBoth(finish)
        return result

    def _read(self, response: Any) -> Deferred:
        def build(collected: Tuple[bytes, bool]) -> Response:
            body, truncated = collected
            headers = tuple(
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, values in response.headers.getAllRawHeaders()
                for value in values
            )
            return Response(response.code, headers, body, truncated)

        return read_body(response, self._max_body).addCallback(build)


def pooled_agent(
    reactor: Any, pool_size: int, policy: Any, connect_timeout: float = 10.0, resolve: Any = None
) -> Tuple[Any, webclient.HTTPConnectionPool]:
    """
    An ``Agent`` over one persistent connection pool whose connections go
    only where ``policy`` (an ``AddressPolicy``) allows, and that pool
    (close it on stop). It keeps no cookies: a target's ``Set-Cookie`` must
    never ride along on later deliveries. ``resolve`` (host, port) ->
    Deferred[addresses] replaces ``getaddrinfo`` (embedding, tests).
    """
    from hookah.outbound.ssrf import GuardedEndpointFactory

    pool = webclient.HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = pool_size
    pool.cachedConnectionTimeout = 120
    endpoints = GuardedEndpointFactory(reactor, policy, resolve=resolve, connect_timeout=connect_timeout)
    return webclient.Agent.usingEndpointFactory(reactor, endpoints, pool=pool), pool
