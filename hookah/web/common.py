"""
What every resource shares: JSON replies, the error shape of the API
contract, asynchronous rendering, and the request class that caps bodies.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from urllib.parse import unquote_to_bytes
from typing import Any, Callable, Coroutine, Dict, List, Optional, Set, Union

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hookah import defaults
from hookah.web.channel import HookahChannel, Refuser, SocketLimits
from hookah.web.query import QueryCache
from hookah.storage.interface import StorageUnavailable

log = Logger()


class ApiError(Exception):
    """A ``4xx`` answer: ``{"error": code, "message": sentence}``."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def json_body(request: server.Request, status: int, obj: Any, **headers: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    for name, value in headers.items():
        request.setHeader(name.replace("_", "-").encode(), value.encode())
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def error_body(request: server.Request, error: ApiError) -> bytes:
    return json_body(request, error.status, {"error": error.error, "message": error.message})


def client_gone(request: server.Request) -> Callable[[], bool]:
    """
    A function that says whether the client of ``request`` has gone: the
    Deferred of ``notifyFinish`` fails once the connection is lost before
    the response ended. Call it before the reactor turns (a client lost
    earlier would never be reported). A ``HookahRequest`` knows it itself:
    no Deferred per request.
    """
    if isinstance(request, HookahRequest):
        return request.is_gone
    gone = False

    def lost(_: Failure) -> None:
        nonlocal gone
        gone = True

    request.notifyFinish().addErrback(lost)
    return lambda: gone


def finish_unless_gone(request: server.Request, body: bytes, gone: Callable[[], bool]) -> None:
    """Write ``body`` and end the response, unless it ended or its client left meanwhile."""
    if gone() or request.finished:
        return
    if isinstance(request, HookahRequest):
        request.respond(body)
        return
    request.write(body)
    request.finish()


def render_async(
    request: server.Request,
    handler: Callable[[], Union[Coroutine[Any, Any, bytes], Deferred]],
) -> Any:
    """
    Run an ``async`` handler returning the body; ``ApiError`` becomes its
    JSON reply and anything else a logged ``500``, so no bad input ever
    leaves a connection hanging.
    """

    def failed(failure: Failure) -> bytes:
        if isinstance(failure.value, ApiError):
            return error_body(request, failure.value)
        if isinstance(failure.value, StorageUnavailable):
            # Nothing was stored (no 202 without a commit): try again soon.
            log.warn("storage unavailable for {uri}: {error}", uri=request.uri, error=str(failure.value))
            request.setHeader(b"Retry-After", b"5")
            return error_body(request, ApiError(
                503, "storage_unavailable", f"Storage is unavailable, nothing was stored: {failure.value}. Try again later."
            ))
        log.failure("unhandled error rendering {uri}", failure, uri=request.uri)
        return error_body(request, ApiError(500, "internal_error", "Hookah failed to handle this request; see its log."))

    try:
        result = handler()
    except ApiError as e:
        return error_body(request, e)
    except Exception:
        return failed(Failure())
    gone = client_gone(request)

    def answer(body: bytes) -> None:
        try:
            finish_unless_gone(request, body, gone)
        except Exception:
            log.failure("writing a response failed")

    def answer_failure(failure: Failure) -> None:
        try:
            body = failed(failure)
        except Exception:
            log.failure("writing a response failed")
            return
        answer(body)

    # One pair of callbacks (rather than a chain of three): once per request.
    d = ensureDeferred(result) if not isinstance(result, Deferred) else result
    d.addCallbacks(answer, answer_failure)
    return NOT_DONE_YET


def query_args(request: server.Request) -> Dict[str, str]:
    """Single-valued query parameters as text (last one wins)."""
    args = request.args or {}
    return {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace") for k, v in args.items() if v}


def int_arg(args: Dict[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be a whole number, not {raw!r}.")
    if not minimum <= value <= maximum:
        raise ApiError(400, "bad_parameter", f"{name} must be between {minimum} and {maximum}.")
    return value


def allowed_methods(resource: Resource) -> List[bytes]:
    """
    The methods a resource answers: its ``render_X`` methods, with ``HEAD``
    wherever ``GET`` is (Twisted's ``render_HEAD`` renders ``GET``).
    """
    methods = {
        name[len("render_"):].encode("ascii")
        for name in dir(resource)
        if name.startswith("render_") and name[len("render_"):].isupper() and callable(getattr(resource, name))
    }
    methods.discard(b"HEAD")
    if b"GET" in methods:
        methods.add(b"HEAD")
    return sorted(methods)


class JsonResource(Resource):
    """
    A resource whose refusals follow the API contract: a method it has no
    ``render_X`` for is a JSON ``405`` with an ``Allow`` header (never
    Twisted's HTML ``405`` or ``501 Huh?``), and a child it does not know is
    a JSON ``404``. Subclasses override ``getChild`` for the children they
    compute and fall back to ``super().getChild`` for the rest.
    """

    # The 405's message; None for one naming the allowed methods.
    not_allowed_message: Optional[str] = None

    def render(self, request: server.Request) -> Any:
        if self.isLeaf and request.postpath not in (None, [], [b""]):
            return NotFound().render(request)  # a leaf has no children
        method = (request.method or b"").decode("latin-1")
        handler = getattr(self, "render_" + method, None) if method.isupper() and method.isalpha() else None
        if handler is None or (method == "HEAD" and getattr(self, "render_GET", None) is None):
            return method_not_allowed(request, allowed_methods(self), self.not_allowed_message)
        return handler(request)

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"" and not request.postpath:
            return self  # a trailing slash
        return NotFound()


def method_not_allowed(request: server.Request, allowed: List[bytes], message: Optional[str] = None) -> bytes:
    request.setHeader(b"Allow", b", ".join(allowed))
    if message is None:
        names = ", ".join(m.decode("ascii") for m in allowed)
        message = f"{request.method.decode('latin-1')} is not allowed here; use {names}."
    return error_body(request, ApiError(405, "method_not_allowed", message))


class NotFound(Resource):
    """A JSON ``404`` for any method, whatever lies below it."""

    isLeaf = True

    def __init__(self, message: str = "There is no such resource in Hookah.") -> None:
        super().__init__()
        self.message = message

    def render(self, request: server.Request) -> bytes:
        return error_body(request, ApiError(404, "not_found", self.message))


class HttpDate:
    """
    The ``Date`` header's value for the current second (``now``: seconds
    since the epoch), formatted once per second rather than per request.
    """

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(self._now())
        if second != self._second:
            self._value = datetimeToString(second)
            self._second = second
        return self._value


# The server's Date header values (one wall clock for every request).
http_date = HttpDate()
_SERVER = [b"hookah"]
# What ``OPTIONS *`` answers in Allow: every method some resource of
# Hookah's serves, and OPTIONS itself (on ``*``).
SERVER_METHODS = b"GET, HEAD, OPTIONS, POST"


class HookahRequest(server.Request):
    """
    A request that refuses bodies over the site's ``max_body``: excess bytes
    are discarded as they arrive (memory stays bounded whatever a client
    sends) and the reply is ``413`` without reaching any resource.
    """

    too_large = False
    gone = False
    """Whether the connection was lost before the response ended."""
    _received = 0
    _max_body: Optional[int] = None
    # One per process: the reactor thread is the only one parsing requests.
    queries = QueryCache()

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        super().connectionLost(reason)

    def is_gone(self) -> bool:
        return self.gone

    def _limit(self) -> int:
        limit = self._max_body
        if limit is None:
            limit = self._max_body = int(getattr(getattr(self.channel, "site", None), "max_body", defaults.MAX_BODY))
        return limit

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self._limit():
            self.too_large = True
            self.content = io.BytesIO()
            # No "100 Continue" for a body that will be refused: a client
            # that waits for it learns sooner, and sends less, for nothing.
            self.requestHeaders.removeHeader(b"expect")
            return
        # twisted.web's choice (memory under 100 kB, else a temporary file),
        # without its look for a Site.getContentFile that HookahSite has not.
        self.content = io.BytesIO() if length is not None and length < 100000 else tempfile.TemporaryFile()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        ``http.Request.requestReceived`` for a site that leaves bodies to
        the resources (``parsePOSTFormSubmission=False``, as ``make_site``
        makes it): the same ``method``, ``uri``, ``path``, ``args`` and
        ``clientproto`` (the query parsed by Twisted's ``parse_qs``, through
        a ``QueryCache`` for the queries a process sees again and again),
        without the ``Content-Type`` look-up that only serves form parsing.
        """
        if self._parsePOSTFormSubmission:
            super().requestReceived(command, path, version)
            return
        self.content.seek(0, 0)  # type: ignore[union-attr] # gotLength set it
        self.method, self.uri, self.clientproto = command, path, version
        base, mark, query = path.partition(b"?")
        self.path = base
        self.args = self.queries(query) if mark else {}
        self.process()

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self._limit():
            self.too_large = True
            self.content = io.BytesIO()
            # A chunked body says its size only as it goes: refuse it the
            # moment it passes the limit rather than after reading it all.
            refuse = getattr(self.channel, "body_too_large", None)
            if refuse is not None:
                refuse()
            return
        super().handleContentChunk(data)

    def respond(self, body: bytes) -> None:
        """
        Write ``body`` and end the response, the whole answer in one send
        where the channel can gather it (``HookahChannel.gather``).
        """
        channel = self.channel
        gathering = channel if isinstance(channel, HookahChannel) and channel.gather() else None
        try:
            self.write(body)
            self.finish()
        finally:
            if gathering is not None:
                gathering.send_gathered()

    def render(self, resrc: Any) -> None:
        # Twisted names itself and its exact version in Server.
        self.responseHeaders.setRawHeaders(b"Server", _SERVER)
        super().render(resrc)

    def processingFailed(self, reason: Failure) -> Any:
        self.responseHeaders.setRawHeaders(b"Server", _SERVER)
        return super().processingFailed(reason)

    def process(self) -> None:
        """
        ``server.Request.process`` with the ``Date`` value of the current
        second (``http_date``) instead of one formatted per request
        (``Server: hookah`` is set by ``render`` and ``processingFailed``,
        whichever answers). Hookah serves no
        ``EncodingResourceWrapper`` (nothing it answers is compressed), so
        the encoder lookup Twisted makes is left out; ``*`` (``OPTIONS *``)
        is answered by ``_server_wide``.
        """
        self.site = getattr(self.channel, "site")  # noqa: B009 - Site.buildProtocol sets it; HTTPChannel does not declare it
        if self.too_large:
            self.setHeader(b"Server", b"hookah")
            body = error_body(
                self,
                ApiError(413, "body_too_large", f"The request body is larger than {self._limit()} bytes."),
            )
            self.respond(body)
            return
        self.responseHeaders.setRawHeaders(b"Date", [http_date()])
        if self.path == b"*":
            self._server_wide()
            return
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        try:
            self.render(self.site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def _server_wide(self) -> None:
        """
        A request whose target is ``*``, which only ``OPTIONS`` may use (RFC
        9112 3.2.4): a question about the server as a whole, a cheap probe
        that it is up. Answered like the rest of Hookah (its ``Server``, not
        Twisted's name and version as Twisted's own answer would give):
        ``200`` with ``Allow`` naming the methods Hookah serves (RFC 9110
        9.3.7) and no content, so ``Content-Length: 0`` (RFC 9110 8.6);
        another method on ``*`` is Hookah's JSON ``405`` allowing OPTIONS.
        """
        self.responseHeaders.setRawHeaders(b"Server", _SERVER)
        if self.method == b"OPTIONS":
            self.setHeader(b"Allow", SERVER_METHODS)
            body = b""
        else:
            body = method_not_allowed(self, [b"OPTIONS"])
        # Framed as ``render`` frames what a resource returns.
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.respond(body)


class _Channel(HookahChannel):
    """A ``HookahChannel`` in its site's ``connections`` from its start to its end."""

    site: HookahSite  # set by Site.buildProtocol, before the connection starts

    def connectionMade(self) -> None:
        self.site.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.connections.discard(self)
        super().connectionLost(reason)


class HookahSite(server.Site):
    """
    A Site that knows its open connections, so that stopping the service
    can close them (idle keep-alive connections and open streams alike)
    instead of leaving them to time out.

    It also caps them (``SocketLimits``): connections carrying requests at
    ``max_connections``, open streams apart at ``max_streams``, so that a
    thousand listeners never starve the API nor the reverse. A connection
    over the cap is answered ``503`` with ``Retry-After`` and closed (or,
    past a small number of such answers in flight, closed at once); a
    stream over its cap is a ``503`` JSON answer. Each refusal is counted
    (``on_refusal``) and logged at most once per ``REFUSAL_LOG_INTERVAL``.

    The access log is off unless asked for (``--access-log``): formatting a
    line per request costs a tenth of a dispatch, and the deliveries
    themselves are recorded in storage and in the metrics.
    """

    access_log = False
    protocol = _Channel  # type: ignore[assignment]
    REFUSAL_LOG_INTERVAL = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: Set[Any] = set()
        self.limits = SocketLimits()
        self.streams = 0
        self._refusing = 0
        self._refused_since_log = 0
        self._last_refusal_log: Optional[float] = None
        self.on_refusal: Callable[[str], None] = lambda reason: None

    @property
    def request_connections(self) -> int:
        """Open connections not carrying a stream."""
        return len(self.connections) - self.streams

    def admit_stream(self, request: server.Request) -> bool:
        """
        Count ``request``'s connection as a stream until the request ends,
        or refuse (``False``) at ``max_streams``.
        """
        if self.streams >= self.limits.max_streams:
            self._refused("streams", self.streams, self.limits.max_streams, "--max-streams")
            return False
        self.streams += 1
        request.notifyFinish().addBoth(self._stream_ended)
        return True

    def _stream_ended(self, result: Any) -> None:
        self.streams -= 1

    def _refused(self, reason: str, open_now: int, limit: int, option: str) -> None:
        self.on_refusal(reason)
        self._refused_since_log += 1
        now = self.reactor.seconds()
        if self._last_refusal_log is None or now - self._last_refusal_log >= self.REFUSAL_LOG_INTERVAL:
            log.warn(
                "refusing {what}: {open} open, {option} {limit} ({count} refused since the last such line)",
                what="streams" if reason == "streams" else "connections",
                open=open_now, limit=limit, option=option, count=self._refused_since_log,
            )
            self._last_refusal_log = now
            self._refused_since_log = 0

    def _refuser_gone(self) -> None:
        self._refusing -= 1

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)

    def buildProtocol(self, addr: Any) -> Any:
        if self.request_connections >= self.limits.max_connections:
            self._refused("connections", self.request_connections, self.limits.max_connections, "--max-connections")
            # Answering costs a descriptor for up to DRAIN_GRACE: only a few at once.
            if self._refusing >= max(16, self.limits.max_connections // 16):
                return None
            self._refusing += 1
            return Refuser(self.reactor.callLater, self._refuser_gone)
        return super().buildProtocol(addr)

    def close_connections(self) -> Deferred:
        """Close every open connection; fires once the reactor has seen them go."""
        for channel in list(self.connections):
            if channel.transport is not None:
                channel.transport.abortConnection()
        return deferLater(self.reactor, 0, lambda: None)


def make_site(
    root: Any, max_body: int, reactor: Any = None, access_log: bool = False, limits: Optional[SocketLimits] = None,
    on_refusal: Optional[Callable[[str], None]] = None,
) -> HookahSite:
    """The site serving ``root``; ``on_refusal`` is told the reason of each refusal at the socket (a metric)."""
    # Twisted would otherwise parse every form body into request.args and
    # build an email message per request to read the Content-Type: that
    # halves throughput, and hookah.web.payload parses bodies itself.
    site = HookahSite(root, requestFactory=HookahRequest, parsePOSTFormSubmission=False, reactor=reactor)
    site.max_body = max_body  # type: ignore[attr-defined]
    if limits is not None:
        site.limits = limits
    if on_refusal is not None:
        site.on_refusal = on_refusal
    site.access_log = access_log
    site.displayTracebacks = False
    site.noisy = False
    return site
