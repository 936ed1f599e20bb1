"""
What a resource sees of a request on a ``HookahSite`` (``HookahRequest``'s
own ``requestReceived`` and ``gotLength``, ``HookahChannel``'s
addresses asked of the transport once per connection) is what twisted.web's
own ``Site`` and ``Request`` give it, over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource

from hookah.web.common import HookahSite, make_site


class Describe(Resource):
    """Answers with everything a resource reads of its request, as JSON."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        peer, host = request.getClientAddress(), request.getHost()
        seen: Dict[str, Any] = {
            "method": request.method.decode("latin-1"),
            "uri": request.uri.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "clientproto": request.clientproto.decode("latin-1"),
            "args": sorted((k.decode("latin-1"), [v.decode("latin-1") for v in vs]) for k, vs in request.args.items()),
            "postpath": [p.decode("latin-1") for p in request.postpath],
            "peer": [peer.type, peer.host, peer.port == self.client_port],
            "host": [host.type, host.host, host.port == self.server_port],
            "headers": sorted(
                (name.decode("latin-1"), [v.decode("latin-1") for v in values])
                for name, values in request.requestHeaders.getAllRawHeaders()
            ),
            "body": len(body),
            "body_head": body[:20].decode("latin-1"),
        }
        return json.dumps(seen, sort_keys=True).encode()

    client_port = 0
    server_port = 0


class RawClient(Protocol):
    """Writes ``request`` at once and keeps every byte until the close."""

    transport: Any

    def __init__(self, request: bytes, resource: Describe) -> None:
        self.request = request
        self.resource = resource
        self.data = b""
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.resource.client_port = self.transport.getHost().port
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(self.data)


def bodies(answer: bytes) -> List[Any]:
    """The JSON bodies of a run of answers (each with a Content-Length)."""
    found = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        found.append(json.loads(rest[:length]))
        answer = rest[length:]
    return found


class SameAsTwistedTests(TestCase):
    async def answers(self, site: server.Site, resource: Describe, request: bytes) -> List[Any]:
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        resource.server_port = port.getHost().port
        client = RawClient(request, resource)
        factory = ClientFactory.forProtocol(lambda: client)  # type: ignore[arg-type]
        connector = reactor.connectTCP("127.0.0.1", resource.server_port, factory)  # type: ignore[attr-defined]
        self.addCleanup(connector.disconnect)
        return bodies(await client.closed)

    async def test_pipelined_requests_are_read_as_twisted_reads_them(self) -> None:
        big = b"y" * 150000  # over 100 kB: a temporary file rather than memory
        request = (
            b"POST /a/b%2Fc?_url=http%3A%2F%2Fexample.com%2Fh%3Fx%3D1&x=1&x=2;y=a+b&flag&=v&e= HTTP/1.1\r\n"
            b"Host: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\n"
            b"x-lower: a \t\r\nX-Twice: 1\r\nx-twice: 2\r\nX-Empty:\r\nAccept:  */*  \r\n\r\nz=1&w=2"
            b"GET /?%zz=%41%4&a=%2B+ HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"
            b"PUT /q? HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            + b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(big)).encode() + b"\r\n\r\n" + big
            + b"GET /last?k=v HTTP/1.0\r\n\r\n"
        )
        ours_resource, theirs_resource = Describe(), Describe()
        ours = await self.answers(make_site(ours_resource, 1_000_000), ours_resource, request)
        theirs = await self.answers(
            server.Site(theirs_resource, parsePOSTFormSubmission=False), theirs_resource, request
        )
        self.assertEqual(len(ours), 6)
        self.assertEqual(ours, theirs)
        self.assertIn(["_url", ["http://example.com/h?x=1"]], ours[0]["args"])
        self.assertEqual(ours[3]["body"], 5)
        self.assertEqual(ours[4]["body"], len(big))
        self.assertTrue(all(seen["peer"] == ["TCP", "127.0.0.1", True] for seen in ours))
        self.assertTrue(all(seen["host"] == ["TCP", "127.0.0.1", True] for seen in ours))
        self.assertIsInstance(make_site(ours_resource, 1), HookahSite)
