"""
``/stream`` over real loopback sockets against a running Hookah: a thousand
readers at once, a reader that never reads, readers that leave, and a
server that stops.
"""

from __future__ import annotations

import resource
import socket
from typing import Any, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from hookah.streams.parse import parser_for
from hookah.web.httpstream import HTTPStream
from tests.streamwire import ResponseReader
from tests.support import http_client, poll, start_hookah

LISTEN = "tcp:0:interface=127.0.0.1:backlog=2048"


class StreamClient(Protocol):
    """A minimal stream reader: one connection, parsed as it arrives."""

    transport: Any

    def __init__(self, path: bytes, format_name: str = "json") -> None:
        self.path = path
        self.response = ResponseReader()
        self.parser = parser_for(format_name)
        self.messages: List[Any] = []
        self.head: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self._waiters: List[Any] = []

    def connectionMade(self) -> None:
        self.transport.write(b"GET " + self.path + b" HTTP/1.1\r\nHost: test\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        body = self.response.feed(data)
        if self.response.status is not None and not self.head.called:
            self.head.callback(self)
        if body:
            self.messages.extend(self.parser.feed(body))
            for count, d in list(self._waiters):
                if len(self.messages) >= count:
                    self._waiters.remove((count, d))
                    d.callback(self.messages)

    def wait_for(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        if len(self.messages) >= count:
            d.callback(self.messages)
        else:
            self._waiters.append((count, d))
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The exception, not the Failure: a Failure would fire the errback.
        self.lost.callback(reason.value)


class _Factory(ClientFactory):
    def __init__(self, client: StreamClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> StreamClient:
        return self.client


def connect(port: int, path: bytes, testcase: TestCase, format_name: str = "json") -> StreamClient:
    client = StreamClient(path, format_name)
    reactor.connectTCP("127.0.0.1", port, _Factory(client))
    testcase.addCleanup(lambda: client.transport.abortConnection() if client.transport is not None and client.transport.connected else None)
    return client


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


class StreamIntegrationTests(TestCase):
    timeout = 60

    async def publish(self, base: str, topic: str, body: bytes, client: Any = None) -> None:
        client = client or http_client(self)
        response = await client.post(f"{base}/dispatch?_topic={topic}", data=body, headers={"Content-Type": ["application/json"]})
        self.assertEqual(response.code, 202, await response.text())
        await response.content()

    def test_thousand_streams_receive_an_event(self) -> Deferred:
        async def go() -> None:
            n = 1000
            raise_open_files(2 * n + 200)
            service, base = await start_hookah(self, listen=LISTEN)
            port = int(base.rsplit(":", 1)[1])
            clients = [connect(port, b"/stream?topic=crowd", self) for _ in range(n)]
            await DeferredList([c.head for c in clients], fireOnOneErrback=True)
            # Headers arrived before any event: every stream is registered.
            self.assertEqual({c.response.status for c in clients}, {200})
            self.assertEqual(len(service.streams), n)
            self.assertEqual(service.streams.readers("crowd"), n)
            await self.publish(base, "crowd", b'{"hello": "everyone"}')
            received = await DeferredList([c.wait_for(1) for c in clients], fireOnOneErrback=True)
            self.assertEqual(len(received), n)
            self.assertEqual({c.messages[0]["data"]["hello"] for c in clients}, {"everyone"})
            self.assertEqual(len({c.messages[0]["id"] for c in clients}), 1)
            for c in clients:
                c.transport.loseConnection()
            await DeferredList([c.lost for c in clients])
            await poll("registry to empty", lambda: len(service.streams) == 0, interval=0.01)
            self.assertEqual(service.streams.topics(), [])

        return ensureDeferred(go())

    def test_stalled_reader_is_cut_off_others_keep_receiving(self) -> Deferred:
        async def go() -> None:
            limit = 64 * 1024
            service, base = await start_hookah(self, listen=LISTEN, stream_buffer=limit)
            port = int(base.rsplit(":", 1)[1])
            fast = connect(port, b"/stream?topic=firehose", self)
            await fast.head
            # A reader that never reads, with the smallest receive window.
            stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.addCleanup(stalled.close)
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.setblocking(False)
            try:
                stalled.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            await poll("stalled connect", lambda: stalled.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and _connected(stalled), interval=0.01)
            stalled.send(b"GET /stream?topic=firehose HTTP/1.1\r\nHost: test\r\n\r\n")
            await poll("stalled stream", lambda: len(service.streams) == 2, interval=0.01)
            stream = next(s for s in service.streams._streams if s is not _stream_of(service, fast))
            assert isinstance(stream, HTTPStream)
            transport = stream._transport
            body = b'"' + b"x" * (16 * 1024) + b'"'
            client = http_client(self)
            published, worst_buffer, worst_transport = 0, 0, 0
            while stream in service.streams:
                await self.publish(base, "firehose", body, client)
                published += 1
                worst_buffer = max(worst_buffer, stream.buffered)
                worst_transport = max(worst_transport, len(transport.dataBuffer) - transport.offset + transport._tempDataLen)
                self.assertLess(published, 2000, "the stalled stream was never closed")
            self.assertGreater(worst_buffer, 0, "back-pressure never paused the stalled stream")
            # Far more was published than the server ever held for it.
            self.assertGreater(published * len(body), 4 * (limit + transport.bufferSize))
            self.assertLessEqual(worst_buffer, limit)
            self.assertLessEqual(worst_transport, transport.bufferSize + limit + 2 * len(body))
            # The fast reader got every event, and keeps getting them.
            await fast.wait_for(published)
            await self.publish(base, "firehose", b'"after"', client)
            messages = await fast.wait_for(published + 1)
            self.assertEqual(messages[-1]["data"], "after")
            self.assertEqual(len({m["id"] for m in messages}), published + 1)
            # The stalled connection is gone from the server, not just the registry.
            await poll("stalled connection to close", lambda: not transport.connected, interval=0.01)

        return ensureDeferred(go())

    def test_readers_leaving_empty_the_registry(self) -> Deferred:
        async def go() -> None:
            service, base = await start_hookah(self, listen=LISTEN)
            port = int(base.rsplit(":", 1)[1])
            clients = [connect(port, b"/stream?topic=a,b&topic=c%d" % i, self) for i in range(50)]
            await DeferredList([c.head for c in clients])
            self.assertEqual(len(service.streams), 50)
            self.assertEqual(len(service.streams.topics()), 52)
            for c in clients[:25]:
                c.transport.abortConnection()
            for c in clients[25:]:
                c.transport.loseConnection()
            await poll("registry to empty", lambda: len(service.streams) == 0, interval=0.01)
            self.assertEqual(service.streams._by_topic, {})
            metrics = await (await http_client(self).get(f"{base}/metrics")).text()
            self.assertIn("hookah_open_streams 0.0", metrics)

        return ensureDeferred(go())

    def test_stopping_the_server_ends_streams_cleanly(self) -> Deferred:
        async def go() -> None:
            service, base = await start_hookah(self, listen=LISTEN)
            port = int(base.rsplit(":", 1)[1])
            json_client = connect(port, b"/stream?topic=t", self)
            sse_client = connect(port, b"/stream?topic=t&format=sse", self, "sse")
            await DeferredList([json_client.head, sse_client.head])
            await self.publish(base, "t", b"1")
            await DeferredList([json_client.wait_for(1), sse_client.wait_for(1)])
            await service.stopService()
            for client in (json_client, sse_client):
                reason = await client.lost
                self.assertTrue(client.response.done, "the chunked body was not ended")
                self.assertIsInstance(reason, ConnectionDone)
            self.assertEqual(len(service.streams), 0)

        return ensureDeferred(go())


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


def _stream_of(service: Any, client: StreamClient) -> Optional[HTTPStream]:
    local = client.transport.getHost().port
    for stream in service.streams._streams:
        if stream.request.getClientAddress().port == local:
            return stream
    return None
