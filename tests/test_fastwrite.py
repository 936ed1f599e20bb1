"""
The stream fast path (``hookah.fastwrite``) over real loopback sockets.

With and without it, a reader receives the same bytes: in each format,
chunked (HTTP/1.1) or not (HTTP/1.0), through history replay, lone and
burst events, keep-alives, a reader that stops reading and catches up, the
end of the stream, and the ``too_slow`` close; a write after the write side
was shut is dropped, as ``transport.write`` drops it. And it stands aside, with one
log line, for a transport it does not know (TLS) or a Twisted whose
transport is not what it expects.

The streams run on ``StreamHarness``: their registry, keep-alive timer and
grace periods are on a ``Clock``, so every write happens when the test says;
only the bytes travel through the kernel.
"""

from __future__ import annotations

import re
import socket
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor, ssl, tcp
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import provider

from hookah.streams.parse import parser_for
from hookah import fastwrite
from hookah.web import httpstream
from hookah.fastwrite import FastPath
from tests.streamsupport import StreamHarness
from tests.streamwire import ResponseReader
from tests.support import poll, self_signed_tls

QUERIES = {"json": b"format=json", "sse": b"format=sse", "length": b"delimited=length"}
# Large enough that a reader catching up never makes a stream give up.
NO_LIMIT = 64 * 1024 * 1024
BIG = b'"' + b"x" * 20_000 + b'"'


class WireClient(Protocol):
    """Sends one GET, keeps every byte received and the messages parsed from them."""

    transport: Any

    def __init__(self, request: bytes, format_name: str, receive_buffer: Optional[int] = None) -> None:
        self.request = request
        self.receive_buffer = receive_buffer
        self.data = b""
        self.reader = ResponseReader()
        self.parser = parser_for(format_name)
        self.messages: List[Any] = []
        self.lost: Deferred = Deferred()
        self._waiters: List[Tuple[int, Deferred]] = []

    def connectionMade(self) -> None:
        if self.receive_buffer is not None:
            self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        body = self.reader.feed(data)
        if body:
            self.messages.extend(self.parser.feed(body))
        for count, d in list(self._waiters):
            if self.reader.status is not None and len(self.messages) >= count:
                self._waiters.remove((count, d))
                d.callback(None)

    def received(self, count: int) -> Deferred:
        """Fires once the head and ``count`` messages have arrived."""
        d: Deferred = Deferred()
        self._waiters.append((count, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.lost.callback(None)

    def ids(self) -> List[str]:
        return [m["id"] if isinstance(m, dict) else m.id for m in self.messages if _error(m) is None]

    def errors(self) -> List[str]:
        return [error for error in map(_error, self.messages) if error is not None]


def _error(message: Any) -> Optional[str]:
    """The error code of a control message, None for an event."""
    if isinstance(message, dict):
        return message.get("error")
    if message.event == "hookah-error":
        return str(message.json()["error"])
    return None


class _Once(ClientFactory):
    def __init__(self, client: WireClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> WireClient:
        return self.client


def without_date(data: bytes) -> bytes:
    """The response with its ``Date`` header's value blanked (it is the wall clock's)."""
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", data, count=1)


class WireTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        # One listening port per harness, whatever the number of readers.
        self.ports: Dict[StreamHarness, Any] = {}
        # The tests tell direct sends from transport writes by their count.
        self.patch(fastwrite.fast_path, "counting", True)

    def open(
        self,
        h: StreamHarness,
        format_name: str,
        query: bytes = b"",
        version: bytes = b"HTTP/1.1",
        receive_buffer: Optional[int] = None,
        tls: Any = None,
    ) -> WireClient:
        """A reader of ``/stream?topic=t`` in ``format_name`` on ``h``'s site, over loopback."""
        port = self.ports.get(h)
        if port is None:
            if tls is None:
                port = reactor.listenTCP(0, h.site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
            else:
                port = reactor.listenSSL(0, h.site, tls, interface="127.0.0.1")  # type: ignore[attr-defined]
            self.ports[h] = port
            self.addCleanup(port.stopListening)
        path = b"/stream?topic=t&" + QUERIES[format_name] + (b"&" + query if query else b"")
        client = WireClient(b"GET " + path + b" " + version + b"\r\nHost: test\r\n\r\n", format_name, receive_buffer)
        if tls is None:
            reactor.connectTCP("127.0.0.1", port.getHost().port, _Once(client))  # type: ignore[attr-defined]
        else:
            reactor.connectSSL("127.0.0.1", port.getHost().port, _Once(client), ssl.CertificateOptions())  # type: ignore[attr-defined]

        def abort() -> Optional[Deferred]:
            if client.lost.called:
                return None
            client.transport.abortConnection()
            return client.lost

        self.addCleanup(abort)
        return client

    async def close_all(self, h: StreamHarness, *clients: WireClient) -> None:
        closed = h.registry.close_all()
        for client in clients:
            await client.lost
        await closed


class SameBytesTests(WireTestCase):
    async def conversation(self, format_name: str, version: bytes) -> WireClient:
        """Everything a stream writes in a reader's life, in order."""
        h = StreamHarness(limit=NO_LIMIT)
        for n in range(3):
            h.store_event(h.event("t", b'{"history": %d}' % n))
        client = self.open(h, format_name, b"count=3", version)
        await client.received(3)
        # Lone events: each goes out at once.
        for n in range(3):
            h.clock.advance(1)
            h.publish(h.event("t", b'{"lone": %d}' % n))
        await client.received(6)
        # A burst: events at the same instant wait for the reactor's write pass.
        for n in range(5):
            h.publish(h.event("t", b'{"burst": %d}' % n))
        await client.received(11)
        # One keep-alive, then an event to know it arrived.
        h.clock.advance(30)
        h.clock.advance(0.01)
        h.publish(h.event("t", b'{"after": "keep-alive"}'))
        await client.received(12)
        # A reader that stops reading while 4 MB are published, then catches up
        # (events 10 ms apart: lone, and no keep-alive in between).
        client.transport.pauseProducing()
        for _ in range(200):
            h.clock.advance(0.01)
            h.publish(h.event("t", BIG))
        client.transport.resumeProducing()
        await client.received(212)
        await self.close_all(h, client)
        self.assertEqual(client.ids(), [f"E{n:06d}" for n in range(1, 213)])
        self.assertEqual(client.errors(), [])
        return client

    async def same_bytes(self, format_name: str, version: bytes = b"HTTP/1.1") -> None:
        self.patch(fastwrite.fast_path, "enabled", False)
        sends = fastwrite.fast_path.sends
        plain = await self.conversation(format_name, version)
        self.assertEqual(fastwrite.fast_path.sends, sends, "nothing is sent directly with the fast path off")
        fastwrite.fast_path.enabled = True
        fast = await self.conversation(format_name, version)
        self.assertGreater(fastwrite.fast_path.sends, sends, "the fast path was used")
        self.assertEqual(without_date(fast.data), without_date(plain.data))
        if version == b"HTTP/1.1":
            self.assertIn(b"\r\nTransfer-Encoding: chunked\r\n", fast.data)
            self.assertTrue(fast.data.endswith(b"\r\n0\r\n\r\n"), fast.data[-20:])
        else:
            self.assertNotIn(b"Transfer-Encoding", fast.data)

    def test_json_lines(self) -> Deferred:
        return ensureDeferred(self.same_bytes("json"))

    def test_server_sent_events(self) -> Deferred:
        return ensureDeferred(self.same_bytes("sse"))

    def test_length_delimited(self) -> Deferred:
        return ensureDeferred(self.same_bytes("length"))

    def test_http10_without_chunks(self) -> Deferred:
        return ensureDeferred(self.same_bytes("json", b"HTTP/1.0"))


class TooSlowTests(WireTestCase):
    async def conversation(self, format_name: str) -> WireClient:
        """
        A reader that stops reading while an event larger than its socket
        buffers is published: the stream pauses, queues what follows, and
        closes as too slow once more than its limit waits.
        """
        h = StreamHarness(limit=4096)
        client = self.open(h, format_name)
        await client.received(0)
        # A small send buffer: a 2 MiB event cannot fit in the kernel (the
        # send buffer and a paused reader's receive window, some 100 KiB), so
        # the transport pauses the stream with or without the fast path.
        server = h.streams()[0].request.channel.transport.getHandle()  # type: ignore[union-attr]
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.pauseProducing()
        h.clock.advance(0.01)
        h.publish(h.event("t", b'"' + b"y" * (2 * 1024 * 1024) + b'"'))
        for _ in range(3):
            h.clock.advance(0.01)
            h.publish(h.event("t", b'"' + b"z" * 2000 + b'"'))
        self.assertEqual(len(h.registry), 0, "the stream closed as too slow")
        # A roomy buffer again, for a quick catch-up.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024 * 1024)
        client.transport.resumeProducing()
        await client.lost
        self.assertEqual(client.ids(), ["E000001"])
        self.assertEqual(client.errors(), ["too_slow"])
        return client

    async def same_bytes(self, format_name: str) -> None:
        self.patch(fastwrite.fast_path, "enabled", False)
        plain = await self.conversation(format_name)
        fastwrite.fast_path.enabled = True
        sends = fastwrite.fast_path.sends
        fast = await self.conversation(format_name)
        self.assertGreater(fastwrite.fast_path.sends, sends, "the fast path was used")
        self.assertEqual(without_date(fast.data), without_date(plain.data))

    def test_json_lines(self) -> Deferred:
        return ensureDeferred(self.same_bytes("json"))

    def test_server_sent_events(self) -> Deferred:
        return ensureDeferred(self.same_bytes("sse"))

    def test_length_delimited(self) -> Deferred:
        return ensureDeferred(self.same_bytes("length"))


class SelfCheckTests(WireTestCase):
    def logged(self) -> List[Dict[str, Any]]:
        events: List[Dict[str, Any]] = []

        @provider(ILogObserver)
        def observe(event: Dict[str, Any]) -> None:
            if event.get("log_namespace") == fastwrite.__name__:
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    def test_tls_streams_write_through_the_transport(self) -> Deferred:
        async def go() -> None:
            fresh = FastPath(counting=True)
            self.patch(httpstream, "fast_path", fresh)
            logged = self.logged()
            h = StreamHarness()
            tls, _ = self_signed_tls("127.0.0.1")
            clients = [self.open(h, "json", tls=tls) for _ in range(2)]
            for client in clients:
                await client.received(0)
            for n in range(3):
                h.clock.advance(1)
                h.publish(h.event("t", b'{"n": %d}' % n))
            for client in clients:
                await client.received(3)
                self.assertEqual(client.ids(), ["E000001", "E000002", "E000003"])
            self.assertEqual(fresh.sends, 0)
            self.assertTrue(fresh.enabled, "still on for plain TCP connections")
            # One line for the kind, however many streams use it.
            self.assertEqual(len(logged), 1, logged)
            self.assertIn("TLS", logged[0]["kind"])
            await self.close_all(h, *clients)

        return ensureDeferred(go())

    def test_a_changed_twisted_turns_it_off(self) -> Deferred:
        """A TCP transport whose buffer is not what this Twisted's is: off for good, said once."""

        async def go() -> None:
            fresh = FastPath(counting=True)
            self.patch(httpstream, "fast_path", fresh)
            logged = self.logged()

            class Changed(tcp.Server):
                """As if a Twisted release kept its write buffer some other way."""

            changed = Changed.__new__(Changed)
            for name in ("connected", "disconnecting", "_writeDisconnected", "offset"):
                setattr(changed, name, 0)
            changed._tempDataBuffer, changed.dataBuffer = [], []  # type: ignore[assignment]
            self.assertEqual(fresh.writer(changed), changed.write)
            self.assertFalse(fresh.enabled)
            self.assertEqual(len(logged), 1, logged)
            self.assertIn("dataBuffer", logged[0]["reason"])
            # Every stream from now on writes through its transport.
            h = StreamHarness()
            client = self.open(h, "json")
            await client.received(0)
            h.clock.advance(1)
            h.publish(h.event("t", b"{}"))
            await client.received(1)
            self.assertEqual(fresh.sends, 0)
            self.assertEqual(len(logged), 1)
            await self.close_all(h, client)

        return ensureDeferred(go())

    def test_plain_tcp_passes_the_check(self) -> Deferred:
        async def go() -> None:
            fresh = FastPath(counting=True)
            self.patch(httpstream, "fast_path", fresh)
            logged = self.logged()
            h = StreamHarness()
            client = self.open(h, "json")
            await client.received(0)
            h.clock.advance(1)
            h.publish(h.event("t", b"{}"))
            await client.received(1)
            self.assertTrue(fresh.enabled)
            self.assertGreater(fresh.sends, 0)
            self.assertEqual(logged, [])
            await self.close_all(h, client)

        return ensureDeferred(go())

    def test_sends_are_counted_only_when_asked(self) -> Deferred:
        async def go() -> None:
            fresh = FastPath()
            self.patch(httpstream, "fast_path", fresh)
            h = StreamHarness()
            first = self.open(h, "json")
            await first.received(0)
            h.clock.advance(1)
            h.publish(h.event("t", b"{}"))
            await first.received(1)
            self.assertTrue(fresh.enabled)
            self.assertEqual(fresh.sends, 0, "not counted unless asked")
            # Writers made from now on count.
            fresh.counting = True
            second = self.open(h, "json")
            await second.received(0)
            h.clock.advance(1)
            h.publish(h.event("t", b"{}"))
            await second.received(1)
            await first.received(2)
            self.assertGreater(fresh.sends, 0)
            self.assertEqual(second.ids(), ["E000002"])
            self.assertEqual(first.ids(), ["E000001", "E000002"])
            await self.close_all(h, first, second)

        return ensureDeferred(go())

    def test_a_shut_write_side_drops_the_write(self) -> Deferred:
        """After ``loseWriteConnection``, a write is dropped as ``transport.write`` drops it: no send, no error."""

        async def go() -> None:
            fresh = FastPath(counting=True)
            received: List[bytes] = []
            made: Deferred = Deferred()

            class Server(Protocol):
                def connectionMade(self) -> None:
                    made.callback(self.transport)

                def dataReceived(self, data: bytes) -> None:
                    received.append(data)

            port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")  # type: ignore[attr-defined]
            self.addCleanup(port.stopListening)
            peer = socket.create_connection(("127.0.0.1", port.getHost().port))
            self.addCleanup(peer.close)
            peer.setblocking(False)
            transport = await made
            write = fresh.writer(transport)
            write(b"before")
            transport.loseWriteConnection()
            got = bytearray()

            def at_end() -> bool:
                try:
                    data = peer.recv(4096)
                except BlockingIOError:
                    return False
                got.extend(data)
                return not data

            await poll("the peer sees the write side shut", at_end)
            self.assertEqual(bytes(got), b"before")
            write(b"after")
            self.assertEqual(fresh.sends, 1, "only the write before the shut was sent")
            # The read side still works, and nothing more arrives.
            peer.send(b"ping")
            await poll("the server reads on", lambda: b"".join(received) == b"ping")
            self.assertEqual(peer.recv(4096), b"")
            self.assertTrue(transport.connected)
            transport.abortConnection()

        return ensureDeferred(go())
