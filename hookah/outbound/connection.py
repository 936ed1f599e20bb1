"""
One persistent HTTP/1.1 connection to a target: it writes a request as one
``bytes``, feeds what comes back to a ``ResponseParser``, and tells the
exchange that sent the request how it ended. Between requests it sits idle
in the pool, where a peer closing it (or sending bytes nobody asked for)
takes it out.

Writes go through ``hookah.fastwrite``: on a plain TCP connection with
nothing queued the request goes to the socket at once, instead of being
queued for the next reactor turn (two ``epoll_ctl`` calls and a turn per
request); TLS and anything else uses ``transport.write``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from hookah.fastwrite import fast_path
from hookah.outbound.outcome import NoResponse, ResponseBroken
from hookah.outbound.parser import MalformedResponse, ResponseParser

__all__ = ["ConnectionFactory", "HTTPConnection", "Key"]

# (scheme, host, port): what a connection can be reused for.
Key = Tuple[str, str, int]
# Called with the parser once its response is complete, or with a Failure.
Done = Callable[[Any], None]


class HTTPConnection(Protocol):
    """
    At most one request at a time (no pipelining). ``lost`` turns true when
    the connection ends; ``idle_lost`` is told when that happens while the
    connection waits in the pool.
    """

    def __init__(self, key: Key, idle_lost: Callable[[HTTPConnection], None]) -> None:
        self.key = key
        self.lost = False
        self.idle = False
        self.idle_since = 0.0
        self._idle_lost = idle_lost
        self._parser: Optional[ResponseParser] = None
        self._done: Optional[Done] = None
        self._write: Callable[[bytes], Any] = self._not_connected
        self._closed: List[Deferred] = []

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # A request is one write and the answer is awaited: Nagle would only delay it.
            try:
                set_no_delay(True)
            except OSError:
                pass
        self._write = fast_path.writer(self.transport)

    def send(self, data: bytes, parser: ResponseParser, done: Done) -> None:
        """Write one request; ``done`` is called once, with ``parser`` or a ``Failure``."""
        # Set before writing: a test transport may answer within the write.
        self._parser = parser
        self._done = done
        self._write(data)

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            # An idle connection speaking unasked (a 408 before closing, junk):
            # it can carry no further request.
            self.close(abort=True)
            return
        try:
            parser.feed(data)
        except MalformedResponse:
            self._finish(Failure())
            self.close(abort=True)
            return
        if parser.done:
            self._finish(parser)
            if not parser.reusable:
                # Truncated, or the peer said close: drop it rather than drain it.
                self.close(abort=parser.truncated)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        parser = self._parser
        if parser is not None:
            if parser.eof():
                self._finish(parser)
            elif parser.started:
                self._finish(Failure(ResponseBroken(reason)))
            else:
                self._finish(Failure(NoResponse(reason)))
        elif self.idle:
            self.idle = False
            self._idle_lost(self)
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    def abandon(self) -> None:
        """The exchange gave up (deadline, cancel): nobody is told, the connection is dropped."""
        self._parser = None
        self._done = None
        self.close(abort=True)

    def close(self, abort: bool = False) -> Deferred:
        """Deferred that fires once the connection has ended."""
        if self.lost:
            return succeed(None)
        d: Deferred = Deferred()
        self._closed.append(d)
        transport: Any = self.transport
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()
        return d

    def _finish(self, outcome: Any) -> None:
        done = self._done
        self._parser = None
        self._done = None
        if done is not None:
            done(outcome)

    def _not_connected(self, data: bytes) -> None:
        raise RuntimeError("request sent before the connection was made")


class ConnectionFactory(Factory):
    """Builds the connection for one key; quiet, since the pool makes one per connection."""

    noisy = False

    def __init__(self, key: Key, idle_lost: Callable[[HTTPConnection], None]) -> None:
        self._key = key
        self._idle_lost = idle_lost

    def buildProtocol(self, addr: Any) -> HTTPConnection:
        connection = HTTPConnection(self._key, self._idle_lost)
        connection.factory = self
        return connection
