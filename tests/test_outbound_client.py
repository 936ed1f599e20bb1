"""
The outgoing client over real 127.0.0.1 sockets (keep-alive, the idle cap, a
peer closing, truncation, resends, TLS) and on a ``Clock`` for its deadline.
The receiving end is a raw HTTP/1.1 server whose answers each test writes
byte for byte, and which counts the connections it was given.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS

from hookah.outbound.client import HTTPClient, guarded_client
from hookah.outbound.outcome import MalformedResponse, NoResponse, TimedOut, describe_failure
from hookah.outbound.ssrf import GuardedEndpointFactory
from hookah.urls import AddressPolicy
from tests.outboundsupport import Pipe
from tests.support import FakeResolver, self_signed_tls

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Request:
    def __init__(self, connection: RawConnection, head: bytes, body: bytes) -> None:
        self.connection = connection
        self.head = head
        self.body = body
        self.line = head.split(b"\r\n", 1)[0]

    def answer(self, data: bytes, close: bool = False) -> None:
        self.connection.transport.write(data)  # type: ignore[union-attr]
        if close:
            self.connection.transport.loseConnection()  # type: ignore[union-attr]


class RawConnection(Protocol):
    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.buffer = b""
        self.number = len(server.connections)
        self.requests: List[Request] = []
        self.ended: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            request = Request(self, head, rest[:length])
            self.requests.append(request)
            self.server.requests.append(request)
            self.server.respond(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server.open -= 1
        self.ended.callback(None)


class RawServer(Factory):
    """Answers every request with ``respond(request)`` (which calls ``request.answer``, or not)."""

    noisy = False

    def __init__(self, respond: Optional[Callable[[Request], None]] = None) -> None:
        self.respond = respond or (lambda request: request.answer(OK))
        self.connections: List[RawConnection] = []
        self.requests: List[Request] = []
        self.open = 0

    def buildProtocol(self, addr: Any) -> RawConnection:
        connection = RawConnection(self)
        self.connections.append(connection)
        self.open += 1
        return connection


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the reactor run until ``condition`` holds (bounded: a failing test fails, it does not hang)."""
    for _ in range(500):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"still waiting for {what}")


class SocketTestCase(TestCase):
    def serve(self, server: RawServer, tls: Any = None) -> int:
        if tls is None:
            port = reactor.listenTCP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
        else:
            port = reactor.listenSSL(0, server, tls, interface="127.0.0.1")  # type: ignore[attr-defined]

        async def stop() -> None:
            await port.stopListening()
            for connection in server.connections:
                if connection.transport is not None and not connection.ended.called:
                    connection.transport.abortConnection()
                    await connection.ended

        self.addCleanup(lambda: ensureDeferred(stop()))
        return port.getHost().port

    def client(self, **kwargs: Any) -> HTTPClient:
        kwargs.setdefault("pool_size", 4)
        client = guarded_client(reactor, kwargs.pop("pool_size"), AddressPolicy(allow_private=True), **kwargs)
        self.addCleanup(client.close)
        return client


class KeepAliveTests(SocketTestCase):
    def test_sequential_requests_share_one_connection(self) -> None:
        async def go() -> None:
            server = RawServer()
            port = self.serve(server)
            client = self.client()
            for i in range(5):
                response = await client.request("POST", f"http://127.0.0.1:{port}/hook/{i}", [("X-N", str(i))], b"{}")
                self.assertEqual((response.code, response.body, response.truncated), (200, b"ok", False))
            self.assertEqual(len(server.connections), 1)
            self.assertEqual([r.line for r in server.requests], [f"POST /hook/{i} HTTP/1.1".encode() for i in range(5)])
            self.assertIn(f"\r\nHost: 127.0.0.1:{port}\r\n".encode(), server.requests[0].head)
            self.assertIn(b"\r\nX-N: 3\r\n", server.requests[3].head)
            self.assertEqual(client.pool.idle_count(), 1)
            await client.close()
            await until(lambda: server.open == 0, "the idle connection to close")

        return ensureDeferred(go())

    def test_the_idle_cap_per_host(self) -> None:
        async def go() -> None:
            held: List[Request] = []

            def respond(request: Request) -> None:
                held.append(request)
                if len(held) == 4:
                    for each in held:
                        each.answer(OK)
                    held.clear()

            server = RawServer(respond)
            port = self.serve(server)
            client = self.client(pool_size=2)
            url = f"http://127.0.0.1:{port}/"
            for _ in range(2):
                responses = await _all([client.request("POST", url, (), b"x") for _ in range(4)])
                self.assertEqual([r.code for r in responses], [200] * 4)
                self.assertEqual(client.pool.idle_count(("http", "127.0.0.1", port)), 2)
                await until(lambda: server.open == 2, "the connections over the cap to close")
            # The second round reused the two kept connections and opened two.
            self.assertEqual(len(server.connections), 6)

        return ensureDeferred(go())

    def test_a_connection_the_peer_closes_while_idle_is_dropped(self) -> None:
        async def go() -> None:
            server = RawServer()
            port = self.serve(server)
            client = self.client()
            url = f"http://127.0.0.1:{port}/"
            self.assertEqual((await client.request("POST", url, (), b"1")).code, 200)
            self.assertEqual(client.pool.idle_count(), 1)
            server.connections[0].transport.loseConnection()  # type: ignore[union-attr]
            await until(lambda: client.pool.idle_count() == 0, "the pool to drop the closed connection")
            self.assertEqual((await client.request("POST", url, (), b"2")).code, 200)
            self.assertEqual([len(c.requests) for c in server.connections], [1, 1])

        return ensureDeferred(go())

    def test_what_is_not_reused(self) -> None:
        async def go() -> None:
            answers = [
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            ]
            server = RawServer(lambda request: request.answer(answers[len(server.requests) - 1], close=True))
            port = self.serve(server)
            client = self.client()
            bodies = [(await client.request("GET", f"http://127.0.0.1:{port}/")).body for _ in answers]
            self.assertEqual(bodies, [b"ok", b"ok", b"until the end"])
            self.assertEqual(len(server.connections), 3)

        return ensureDeferred(go())

    def test_chunked_head_204_and_interim_answers_keep_the_connection(self) -> None:
        async def go() -> None:
            answers = [
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
            ]
            server = RawServer(lambda request: request.answer(answers[len(server.requests) - 1]))
            port = self.serve(server)
            client = self.client()
            url = f"http://127.0.0.1:{port}/"
            first = await client.request("POST", url, (), b"{}")
            head = await client.request("HEAD", url)
            empty = await client.request("DELETE", url)
            self.assertEqual([(r.code, r.body) for r in (first, head, empty)], [(200, b"abcde"), (200, b""), (204, b"")])
            self.assertEqual(first.header("transfer-encoding"), "chunked")
            self.assertEqual(len(server.connections), 1)

        return ensureDeferred(go())


class LimitTests(SocketTestCase):
    def test_past_the_cap_the_body_is_truncated_and_the_connection_dropped(self) -> None:
        async def go() -> None:
            big = b"x" * 200_000
            server = RawServer(lambda request: request.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                              + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)))
            port = self.serve(server)
            client = self.client(max_response_body=1000)
            response = await client.request("POST", f"http://127.0.0.1:{port}/", (), b"{}")
            self.assertEqual((response.code, response.body, response.truncated), (200, b"x" * 1000, True))
            await until(lambda: server.open == 0, "the truncated connection to close")
            self.assertEqual(client.pool.idle_count(), 0)

        return ensureDeferred(go())

    def test_a_malformed_answer_is_described(self) -> None:
        async def go() -> None:
            server = RawServer(lambda request: request.answer(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n"))
            port = self.serve(server)
            client = self.client()
            try:
                await client.request("POST", f"http://127.0.0.1:{port}/", (), b"{}")
            except MalformedResponse:
                text = describe_failure(Failure(), 30)
            else:
                self.fail("a malformed answer was read")
            self.assertEqual(text, "malformed response: bad Content-Length 'nope'")
            await until(lambda: server.open == 0, "the connection to close")

        return ensureDeferred(go())

    def test_connection_refused_and_closed_before_an_answer(self) -> None:
        async def go() -> None:
            server = RawServer(lambda request: request.connection.transport.loseConnection())  # type: ignore[union-attr]
            port = self.serve(server)
            client = self.client()
            texts = []
            for url in (f"http://127.0.0.1:{port}/", "http://127.0.0.1:1/"):
                try:
                    await client.request("POST", url, (), b"{}")
                except Exception:
                    texts.append(describe_failure(Failure(), 30))
            self.assertEqual(texts, ["connection closed before a response", "connection refused"])

        return ensureDeferred(go())


class ResendTests(SocketTestCase):
    """A reused connection that closes unanswered: GET and HEAD are sent again once on a new one, a POST is not."""

    def closing_second_requests(self) -> RawServer:
        def respond(request: Request) -> None:
            if len(request.connection.requests) == 1:
                request.answer(OK)
            else:
                request.connection.transport.loseConnection()  # type: ignore[union-attr]

        return RawServer(respond)

    def test_get_is_sent_again_on_a_new_connection(self) -> None:
        async def go() -> None:
            server = self.closing_second_requests()
            port = self.serve(server)
            client = self.client()
            url = f"http://127.0.0.1:{port}/topic"
            self.assertEqual((await client.request("GET", url)).code, 200)
            self.assertEqual((await client.request("GET", url)).code, 200)
            self.assertEqual([len(c.requests) for c in server.connections], [2, 1])

        return ensureDeferred(go())

    def test_post_is_not_replayed(self) -> None:
        async def go() -> None:
            server = self.closing_second_requests()
            port = self.serve(server)
            client = self.client()
            url = f"http://127.0.0.1:{port}/hook"
            self.assertEqual((await client.request("POST", url, (), b"1")).code, 200)
            with self.assertRaises(NoResponse):
                await client.request("POST", url, (), b"2")
            self.assertEqual([r.body for r in server.requests], [b"1", b"2"])
            self.assertEqual(len(server.connections), 1)

        return ensureDeferred(go())

    def test_a_fresh_connection_closing_is_not_resent(self) -> None:
        async def go() -> None:
            server = RawServer(lambda request: request.connection.transport.loseConnection())  # type: ignore[union-attr]
            port = self.serve(server)
            with self.assertRaises(NoResponse):
                await self.client().request("GET", f"http://127.0.0.1:{port}/")
            self.assertEqual(len(server.requests), 1)

        return ensureDeferred(go())


class DeadlineTests(TestCase):
    """The deadline on a ``Clock``, over an in-memory connection whose peer the test writes for."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.peers: List[Protocol] = []
        self.pipes: List[Pipe] = []
        self.client = HTTPClient(self.clock, self)

    def endpoint_for(self, scheme: str, host: str, port: int) -> DeadlineTests:
        return self

    def connect(self, factory: Any) -> Deferred:
        protocol = factory.buildProtocol(None)
        peer = Protocol()
        self.peers.append(peer)
        self.pipes.append(Pipe(protocol, peer))
        return succeed(protocol)

    def test_the_deadline_covers_the_body(self) -> None:
        d = self.client.request("POST", "http://slow.example/", (), b"{}", 10)
        self.clock.advance(4)
        self.peers[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")  # type: ignore[union-attr]
        self.clock.advance(5.5)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        failure = self.failureResultOf(d, TimedOut)
        self.assertEqual(describe_failure(failure, 10), "timed out after 10s")
        self.assertTrue(self.pipes[0].closed)
        self.assertEqual(self.client.pool.idle_count(), 0)

    def test_an_answer_in_time_cancels_the_deadline(self) -> None:
        d = self.client.request("POST", "http://fast.example/", (), b"{}", 10)
        self.peers[0].transport.write(OK)  # type: ignore[union-attr]
        self.assertEqual(self.successResultOf(d).body, b"ok")
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.getTime() <= 10], [])

    def test_idle_connections_expire(self) -> None:
        d = self.client.request("POST", "http://idle.example/", (), b"{}", 10)
        self.peers[0].transport.write(OK)  # type: ignore[union-attr]
        self.successResultOf(d)
        self.assertEqual(self.client.pool.idle_count(), 1)
        self.clock.advance(119)
        self.assertEqual((self.client.pool.idle_count(), self.pipes[0].closed), (1, False))
        self.clock.advance(16)
        self.assertEqual((self.client.pool.idle_count(), self.pipes[0].closed), (0, True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelling_drops_the_connection(self) -> None:
        d = self.client.request("GET", "http://cancel.example/", (), None, 10)
        d.cancel()
        self.failureResultOf(d)
        self.assertTrue(self.pipes[0].closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TLSTests(SocketTestCase):
    def tls_client(self, tls_policy: Any = None) -> HTTPClient:
        endpoints = GuardedEndpointFactory(
            reactor, AddressPolicy(allowed_networks=["127.0.0.0/8"]), resolve=FakeResolver("127.0.0.1"), tls_policy=tls_policy
        )
        client = HTTPClient(reactor, endpoints)
        self.addCleanup(client.close)
        return client

    def test_https_with_a_trusted_certificate_keeps_its_connection(self) -> None:
        async def go() -> None:
            options, certificate = self_signed_tls("hooks.example.test")
            server = RawServer()
            port = self.serve(server, tls=options)
            client = self.tls_client(BrowserLikePolicyForHTTPS(trustRoot=certificate))
            for _ in range(3):
                response = await client.request("POST", f"https://hooks.example.test:{port}/hook", (), b"{}")
                self.assertEqual((response.code, response.body), (200, b"ok"))
            self.assertEqual(len(server.connections), 1)
            self.assertIn(f"\r\nHost: hooks.example.test:{port}\r\n".encode(), server.requests[0].head)

        return ensureDeferred(go())

    def test_an_untrusted_certificate_fails_the_request_as_tls(self) -> None:
        async def go() -> None:
            options, _ = self_signed_tls("hooks.example.test")
            server = RawServer()
            port = self.serve(server, tls=options)
            try:
                await self.tls_client().request("POST", f"https://hooks.example.test:{port}/hook", (), b"{}")
            except Exception:
                text = describe_failure(Failure(), 30)
            else:
                self.fail("an untrusted certificate was accepted")
            self.assertTrue(text.startswith("TLS failed: "), text)
            self.assertIn("certificate verify failed", text)
            self.assertEqual(server.requests, [])

        return ensureDeferred(go())


async def _all(requests: List[Deferred]) -> List[Any]:
    return [await d for d in requests]
