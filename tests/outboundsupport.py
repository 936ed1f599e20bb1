"""
The real outgoing ``HTTPClient`` without sockets: its endpoints connect it
to a twisted.web ``Site`` through an in-memory pipe, so tests on a ``Clock``
see what it sends and how it reads answers (timeouts, headers, redirects).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from hookah.outbound.client import HTTPClient


class _End(StringTransport):
    """One side of a ``Pipe``: what is written arrives at the other side."""

    def __init__(self, pipe: Pipe, side: int, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self._pipe = pipe
        self._side = side

    def write(self, data: bytes) -> None:
        self._pipe.send(self._side, data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._pipe.close()

    def abortConnection(self) -> None:
        self._pipe.close()


class Pipe:
    """
    Two protocols connected in memory. Bytes are delivered at once, in
    order, but never from inside the other side's ``dataReceived`` (a queue
    makes delivery non-reentrant); closing ends both sides.
    """

    def __init__(self, client: Any, server_protocol: Any) -> None:
        self.protocols = (client, server_protocol)
        self.closed = False
        self._queue: List[Tuple[int, Optional[bytes]]] = []
        self._delivering = False
        peer = IPv4Address("TCP", "127.0.0.1", 80)
        self.ends = (_End(self, 0, peer), _End(self, 1, IPv4Address("TCP", "127.0.0.1", 40000)))
        server_protocol.makeConnection(self.ends[1])
        client.makeConnection(self.ends[0])

    def send(self, side: int, data: bytes) -> None:
        if not self.closed:
            self._queue.append((side, data))
            self._run()

    def close(self) -> None:
        self._queue.append((0, None))
        self._run()

    def _run(self) -> None:
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._queue:
                side, data = self._queue.pop(0)
                if data is None:
                    if not self.closed:
                        self.closed = True
                        for protocol in self.protocols:
                            protocol.connectionLost(Failure(ConnectionDone()))
                elif not self.closed:
                    self.protocols[1 - side].dataReceived(data)
        finally:
            self._delivering = False


class _SiteEndpoint:
    def __init__(self, endpoints: SiteEndpoints) -> None:
        self._endpoints = endpoints

    def connect(self, factory: Any) -> Deferred:
        address = IPv4Address("TCP", "127.0.0.1", 80)
        client = factory.buildProtocol(address)
        pipe = Pipe(client, self._endpoints.site.buildProtocol(address))
        self._endpoints.pipes.append(pipe)
        return succeed(client)


class SiteEndpoints:
    """Endpoints (``endpoint_for``) whose every connection, whatever the host, reaches ``resource``."""

    def __init__(self, resource: Resource, clock: IReactorTime) -> None:
        self.site = server.Site(resource, timeout=None, reactor=clock)
        self.pipes: List[Pipe] = []

    def endpoint_for(self, scheme: str, host: str, port: int) -> _SiteEndpoint:
        return _SiteEndpoint(self)


def site_client(resource: Resource, clock: IReactorTime, **kwargs: Any) -> Tuple[HTTPClient, SiteEndpoints]:
    """The real client, its connections served in memory by ``resource``."""
    endpoints = SiteEndpoints(resource, clock)
    return HTTPClient(clock, endpoints, **kwargs), endpoints
