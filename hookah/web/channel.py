"""
The HTTP/1.1 connection with limits and deadlines at the socket.

Twisted's ``HTTPChannel`` parses well but defends little: its only timer is
an idle timeout that every byte resets, an oversized head is dropped without
a status, a bare-LF head waits for that timeout, and a body declared too
large is read to its end before anyone may refuse it. ``HookahChannel``
adds, through the channel's public methods:

- a deadline for the whole request head, from the moment the connection
  opens or, on a kept-alive connection, from the next head's first byte:
  ``408`` (or a plain close when not a byte of a request came); and a
  minimum rate for the body, measured over windows of ``BODY_WINDOW``
  seconds: ``408``;
- ``414`` for a request line and ``431`` for a header block over
  ``MAX_HEAD`` bytes, ``400`` at once for a head whose lines end in a bare
  LF or a bare CR;
- ``413`` as soon as ``Content-Length`` says the body is over the site's
  ``max_body`` (never a ``100 Continue`` first), or as soon as the chunk
  sizes of a chunked body add up to more (``hookah.web.chunksizes``: at the
  size line, before the chunk's data) or its bytes pass it.

A whole answer written by ``HookahRequest.respond`` (its status line,
headers and body, the last chunk included) leaves in one send, through
``hookah.fastwrite`` on a plain TCP connection: the channel gathers what
twisted.web writes for it (``gather``/``send_gathered``) instead of handing
the transport three writes, each of which costs a selector registration
and a reactor turn. The bytes are the same; a request that ends the
response also ends the gathering (``requestDone``), so a close or the next
pipelined answer always comes after it.

Every such refusal is a short JSON body (``{"error", "message"}``) with
``Connection: close``, after which the connection stops reading requests:
its write side is closed once the answer is out, what the client still
sends is read and dropped (closing with unread bytes would reset the
connection and could destroy the answer before the client reads it), and it
is aborted ``DRAIN_GRACE`` seconds later whatever the client does.

A whole plain request head that arrives in one piece is read in one go by
``hookah.web.fasthead`` (the one module reading Twisted's private parser
state, checking it on first use); every other head, and every refusal, goes
through Twisted's line-by-line parser and the checks here.

One private Twisted hook is used, and only here: ``HTTPChannel`` answers
its parse errors through ``_respondToBadRequestAndDisconnect``, a bare
``400`` without ``Connection: close`` or body. ``HookahChannel`` overrides
it to answer like every other refusal; if a Twisted release renames it, the
override is simply not called and Twisted's own ``400`` and close remain
(``tests/test_socket_limits.py`` checks the name still exists).
"""

from __future__ import annotations

import json
from typing import Any, Callable, List, Optional, Sequence, Tuple

import attr
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers

from hookah import defaults, fastwrite
from hookah.web.chunksizes import ChunkSizes
from hookah.web.fasthead import fast_head

__all__ = [
    "HookahChannel", "SocketLimits", "Refuser", "refusal", "MAX_HEAD", "BODY_WINDOW", "DRAIN_GRACE",
    "BAD_REQUEST_HOOK",
]

log = Logger()

# Bytes a request line, or a request line with all its headers, may take.
MAX_HEAD = 16384
# Seconds over which the body's minimum rate is measured.
BODY_WINDOW = 5.0
# Seconds a refused connection may take to read its answer before it is aborted.
DRAIN_GRACE = 2.0
# The private HTTPChannel method that answers parse errors (see the module docstring).
BAD_REQUEST_HOOK = "_respondToBadRequestAndDisconnect"

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@attr.s(auto_attribs=True, frozen=True)
class SocketLimits:
    """What one connection may cost; 0 disables a deadline or a rate."""

    head_timeout: float = defaults.HEAD_TIMEOUT
    min_body_rate: int = defaults.MIN_BODY_RATE
    max_connections: int = defaults.MAX_CONNECTIONS
    max_streams: int = defaults.MAX_STREAMS


def refusal(status: int, error: str, message: str, extra: Sequence[Tuple[bytes, bytes]] = ()) -> bytes:
    """A complete ``Connection: close`` response with the API's JSON error body."""
    body = json.dumps({"error": error, "message": message}, separators=(",", ":")).encode() + b"\n"
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
        b"Server: hookah",
        b"Date: " + datetimeToString(),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    lines.extend(name + b": " + value for name, value in extra)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _seconds_of(channel: HTTPChannel) -> Callable[[], float]:
    """
    The clock ``channel.callLater`` schedules on: its site's reactor (which
    ``HTTPFactory.buildProtocol`` takes ``callLater`` from; a test's
    ``Clock``), else the reactor ``callLater`` is bound to.
    """
    for owner in (getattr(getattr(channel, "site", None), "reactor", None), getattr(channel.callLater, "__self__", None)):
        seconds = getattr(owner, "seconds", None)
        if callable(seconds):
            return seconds  # type: ignore[no-any-return]
    from twisted.internet import reactor

    return reactor.seconds  # type: ignore[attr-defined,no-any-return]


def _close_after(transport: Any, call_later: Callable[..., IDelayedCall]) -> Optional[IDelayedCall]:
    """
    Close ``transport`` once its buffer is out, reading (and dropping)
    whatever the peer still sends until it closes or ``DRAIN_GRACE`` passes.
    """
    half_close = getattr(transport, "loseWriteConnection", None)
    if half_close is None:
        transport.loseConnection()
        return None
    resume = getattr(transport, "resumeProducing", None)
    if resume is not None:
        resume()  # it may have been paused while a request was read
    half_close()
    return call_later(DRAIN_GRACE, transport.abortConnection)


class HookahChannel(HTTPChannel):
    """``HTTPChannel`` with head deadline, body rate and prompt refusals (module docstring)."""

    _awaiting_head = True
    _refused = False
    # Every deadline of the connection shares one DelayedCall (``_timer``,
    # see "deadlines" below): when each began, None when not running.
    _head_from: Optional[float] = None
    _window_from: Optional[float] = None
    _idle_from: Optional[float] = None
    _timer: Optional[IDelayedCall] = None
    _step = BODY_WINDOW
    _drain_call: Optional[IDelayedCall] = None
    _limits: Optional[SocketLimits] = None
    _head_bytes = 0
    _head_lines = 0
    _window_bytes = 0
    _tail = b""
    # The framing of the chunked body being read (None for any other).
    _chunks: Optional[ChunkSizes] = None
    # The answer being gathered for one send (``gather``), and the
    # connection's write function for it (``hookah.fastwrite``).
    _gathered: Optional[List[bytes]] = None
    _send: Optional[Callable[[bytes], Any]] = None
    # The connection's two addresses, asked of the transport once: every
    # request reads both (``Request.__init__``), and a TCP transport builds
    # new address objects, with a ``getsockname`` call, each time it is asked.
    _peer: Any = None
    _host: Any = None

    # -- settings, from the site --------------------------------------------------

    @property
    def limits(self) -> SocketLimits:
        """The site's limits, looked up once per connection (a site sets them when it is made)."""
        limits = self._limits
        if limits is None:
            limits = getattr(getattr(self, "site", None), "limits", None)
            if limits is None:
                return SocketLimits()
            self._limits = limits
        return limits

    def _max_body(self) -> int:
        return int(getattr(getattr(self, "site", None), "max_body", defaults.MAX_BODY))

    def _refused_for(self, reason: str) -> None:
        hook = getattr(getattr(self, "site", None), "on_refusal", None)
        if hook is not None:
            hook(reason)

    # -- the connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        limits = self.limits
        periods = [float(p) for p in (limits.head_timeout, self.timeOut) if p]
        if limits.min_body_rate > 0:
            periods.append(BODY_WINDOW)
        self._step = min(periods) if periods else BODY_WINDOW
        super().connectionMade()
        # A new connection owes its first request head within the deadline,
        # whether or not it has sent a byte.
        self._start_head_deadline()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timers()
        self._idle_from = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        super().connectionLost(reason)

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None and self.transport is not None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def getHost(self) -> Any:
        host = self._host
        if host is None and self.transport is not None:
            host = self._host = self.transport.getHost()
        return host

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head:
            first = not self._tail and not self._head_bytes
            if self._head_from is None:
                self._start_head_deadline()
            if (b"\n" in data or b"\r" in data) and self._bare_lf(data):
                self._refuse(400, "bad_request", "Lines of a request head end with CRLF, not a bare LF or CR.", "bad_request")
                return
            self._tail = (self._tail + data)[-3:]
            if first and fast_head.read(self, data, MAX_HEAD):
                return  # a whole plain head, read in one go (hookah.web.fasthead)
        elif self._window_from is not None:
            self._window_bytes += len(data)
        super().dataReceived(data)

    def _bare_lf(self, data: bytes) -> bool:
        """Whether the head part of ``data`` has an LF without its CR, or a CR without its LF."""
        seen = self._tail + data
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            seen = seen[: end + 4]
        pairs = seen.count(b"\r\n")
        bare = seen.count(b"\n") - pairs
        if self._tail and seen.startswith(b"\n"):
            bare -= 1  # already judged with the byte before it
        lone_cr = seen.count(b"\r") - pairs - (1 if seen.endswith(b"\r") else 0)
        return bare > 0 or lone_cr > 0

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head:
            if b"\n" in line:
                self._refuse(400, "bad_request", "Lines of a request head end with CRLF, not a bare LF.", "bad_request")
                return
            if line or self._head_lines:
                self._head_bytes += len(line) + 2
                if self._head_bytes > MAX_HEAD:
                    self._head_too_large()
                    return
                self._head_lines += 1
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._head_too_large()

    def _head_too_large(self) -> None:
        if self._head_lines == 0:
            self._refuse(414, "uri_too_long", f"The request line is longer than {MAX_HEAD} bytes.", "head_too_large")
        else:
            self._refuse(
                431, "headers_too_large", f"The request headers are larger than {MAX_HEAD} bytes.", "head_too_large"
            )

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._head_from = None
        super().allHeadersReceived()
        request = self.requests[-1] if self.requests else None
        if getattr(request, "too_large", False):
            self.body_too_large()
            return
        if self.length is None:
            # Twisted chose its chunked decoder (it sets no length for one).
            self._chunks = ChunkSizes()
        if self.length != 0 and self.limits.min_body_rate > 0:
            self._window_bytes = 0
            self._window_from = now = self._seconds()
            self._arm(now, BODY_WINDOW)

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._window_from = None
        self._chunks = None
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        chunks = self._chunks
        if chunks is not None:
            if chunks.feed(data) > self._max_body():
                self.body_too_large()
                return
            if not chunks.following:
                self._chunks = None
        super().rawDataReceived(data)

    def requestDone(self, request: Any) -> None:
        # The answer ends here: out before a close or the next request's.
        self.send_gathered()
        if self._refused:
            return
        self._awaiting_head = True
        self._tail = b""
        self._head_bytes = self._head_lines = 0
        super().requestDone(request)
        if self.persistent and self.transport is not None and not self._refused:
            # Bytes of the next request that arrived with this one are held
            # by the line parser; they get the same checks and deadline as
            # newly arrived ones.
            pending = self.clearLineBuffer()
            if pending:
                self.dataReceived(pending)

    def body_too_large(self) -> None:
        """Refuse the request being read: its body is over ``max_body``."""
        self._refuse(
            413, "body_too_large", f"The request body is larger than {self._max_body()} bytes.", "body_too_large"
        )

    # -- one send per answer ---------------------------------------------------------------

    def gather(self) -> bool:
        """
        Hold what twisted.web writes for the current answer until
        ``send_gathered`` (or the request's end). False, and nothing held,
        when already gathering or not connected.
        """
        if self._gathered is not None or self.transport is None or self._refused:
            return False
        self._gathered = []
        return True

    def send_gathered(self) -> None:
        """Send what was gathered, in one write; stop gathering."""
        parts, self._gathered = self._gathered, None
        if not parts or self.transport is None:
            return
        send = self._send
        if send is None:
            send = self._send = fastwrite.fast_path.writer(self.transport)
        send(b"".join(parts))

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        parts = self._gathered
        if parts is None or not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        # HTTPChannel.writeHeaders' bytes, held rather than written.
        parts += (version, b" ", code, b" ", reason, b"\r\n")
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")

    def write(self, data: bytes) -> None:
        if self._gathered is not None:
            self._gathered.append(data)
        else:
            super().write(data)

    def writeSequence(self, iovec: Any) -> None:
        if self._gathered is not None:
            self._gathered.extend(iovec)
        else:
            super().writeSequence(iovec)

    # -- Twisted's parse errors --------------------------------------------------------------

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(400, "bad_request", "The request is not valid HTTP/1.1.", "bad_request")

    # -- deadlines -------------------------------------------------------------------------------
    #
    # The head deadline, the body's rate windows and Twisted's idle timeout
    # (``TimeoutMixin.setTimeout``/``resetTimeout``, overridden here) each
    # note when they began; one DelayedCall per connection (``_tick``) looks
    # at them. Starting, ending or restarting a deadline is a clock reading,
    # not a DelayedCall made and cancelled (three of each per request
    # otherwise). The timer never waits longer than ``_step``, the shortest
    # period a deadline can start with, so a deadline that begins while it
    # waits is never late; one that would be (a shorter idle timeout set
    # later) moves the timer sooner. A busy connection's timer wakes once
    # per ``_step`` and finds nothing due; an idle one's stops until a
    # deadline begins again.

    def _seconds(self) -> float:
        """The channel's clock: its ``callLater``'s (the site's reactor, or a test's ``Clock``)."""
        self._seconds = _seconds_of(self)  # type: ignore[method-assign]
        return self._seconds()

    def _arm(self, now: float, period: float) -> None:
        """Make sure ``_tick`` runs no later than ``now + period``."""
        timer = self._timer
        if timer is None:
            if self.transport is not None:
                self._timer = self.callLater(min(period, self._step), self._tick)
        elif period < self._step and timer.getTime() > now + period:
            timer.reset(period)

    def _tick(self) -> None:
        self._timer = None
        now = self._seconds()
        if self._head_from is not None and now >= self._head_from + self.limits.head_timeout:
            self._head_from = None
            self._head_timed_out()
        if self._window_from is not None and now >= self._window_from + BODY_WINDOW:
            self._check_body_rate(now)
        timeout = self.timeOut
        if self._idle_from is not None and timeout is not None and now >= self._idle_from + timeout:
            self._idle_from = None
            self.timeoutConnection()
        due = self._deadlines()
        if due and self.transport is not None:
            self._timer = self.callLater(max(0.0, min(min(due) - now, self._step)), self._tick)

    def _deadlines(self) -> List[float]:
        """When each running deadline falls due."""
        due = []
        if self._head_from is not None:
            due.append(self._head_from + self.limits.head_timeout)
        if self._window_from is not None:
            due.append(self._window_from + BODY_WINDOW)
        if self._idle_from is not None and self.timeOut is not None:
            due.append(self._idle_from + self.timeOut)
        return due

    def response_stays_open(self) -> None:
        """
        A response that stays open (a stream) has begun. While a request is
        handled no deadline runs (the head is in, the body read, the idle
        timeout off until the response ends), so the timer would only wake
        once more to find nothing due: for thousands of streams opened
        together, thousands of timer calls at once, in the middle of their
        events. Cancelled here instead; the next deadline to begin arms it.
        """
        timer = self._timer
        if timer is not None and not self._deadlines():
            if timer.active():
                timer.cancel()
            self._timer = None

    def setTimeout(self, period: Optional[float]) -> Optional[float]:
        """``TimeoutMixin.setTimeout``: the idle timeout, on the connection's one timer."""
        previous = self.timeOut
        self.timeOut = period  # type: ignore[assignment]
        if period is None:
            self._idle_from = None
        else:
            self._idle_from = now = self._seconds()
            self._arm(now, period)
        return previous

    def resetTimeout(self) -> None:
        """``TimeoutMixin.resetTimeout``: the idle timeout starts again (unless off or spent)."""
        if self._idle_from is not None and self.timeOut is not None:
            self._idle_from = self._seconds()

    def _start_head_deadline(self) -> None:
        timeout = self.limits.head_timeout
        if timeout > 0 and self._head_from is None and self.transport is not None:
            self._head_from = now = self._seconds()
            self._arm(now, timeout)

    def _head_timed_out(self) -> None:
        if not self._awaiting_head or self._refused:
            return
        if not self._tail and not self._head_bytes:
            # Not a byte of a request: no one is waiting for an answer (a
            # browser's preconnect would take a 408 for a failed request).
            self._refused = True
            self._cancel_timers()
            self.setTimeout(None)
            self._refused_for("head_timeout")
            if self.transport is not None:
                self.transport.loseConnection()
            return
        self._refuse(
            408, "request_timeout",
            f"The request head did not arrive within {self.limits.head_timeout:g} seconds.", "head_timeout",
        )

    def _check_body_rate(self, now: float) -> None:
        self._window_from = None
        rate = self.limits.min_body_rate
        if self._window_bytes < rate * BODY_WINDOW:
            self._refuse(
                408, "request_timeout",
                f"The request body arrived slower than {rate} bytes per second.", "body_too_slow",
            )
            return
        self._window_bytes = 0
        self._window_from = now

    def _cancel_timers(self) -> None:
        self._head_from = None
        self._window_from = None

    # -- refusing ------------------------------------------------------------------------------------

    def _refuse(self, status: int, error: str, message: str, reason: str) -> None:
        if self._refused or self.transport is None:
            return
        self._refused = True
        self._cancel_timers()
        self.setTimeout(None)
        self.persistent = False
        self._refused_for(reason)
        transport = self.transport
        transport.write(refusal(status, error, message))
        unregister = getattr(transport, "unregisterProducer", None)
        if unregister is not None:
            unregister()
        self._drain_call = _close_after(transport, self.callLater)


class Refuser(Protocol):
    """
    What a connection over the cap gets: a ``503`` with ``Retry-After`` and
    a close, without reading its request.
    """

    def __init__(self, call_later: Callable[..., IDelayedCall], gone: Callable[[], None]) -> None:
        self._call_later = call_later
        self._gone = gone
        self._abort: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            refusal(
                503, "too_many_connections",
                "Hookah has as many connections open as it is configured to allow; retry shortly.",
                [(b"Retry-After", b"1")],
            )
        )
        self._abort = _close_after(self.transport, self._call_later)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        self._gone()
