"""
Limits and deadlines at the socket (issue 13, part 2): head deadline and
minimum body rate (on a ``Clock``), and over real loopback sockets the
connection and stream caps, immediate ``413``, ``414``/``431``, parse-level
``400`` with ``Connection: close``, bare-LF heads and ``Server: hookah``.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource

from hookah.config import Config, with_backlog
from hookah.web.channel import BAD_REQUEST_HOOK, BODY_WINDOW, SocketLimits
from hookah.web.common import HookahSite, make_site
from tests.support import poll, start_hookah


class Echo(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"ok"

    def render_POST(self, request: Any) -> bytes:
        return b"got %d" % len(request.content.read())


def parse(answer: bytes) -> Tuple[int, Dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


class ClockedConnection:
    """A ``HookahSite`` connection over ``StringTransport`` on a ``Clock``."""

    def __init__(self, site: HookahSite) -> None:
        self.transport = StringTransport()
        self.channel = site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answer(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


class DeadlineTests(TestCase):
    """Time on a ``Clock``: nothing here waits for real seconds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.refused: List[str] = []
        self.site = make_site(
            Echo(), 1000, reactor=self.clock, limits=SocketLimits(head_timeout=10, min_body_rate=1000), on_refusal=self.refused.append,
        )

    def connect(self) -> ClockedConnection:
        return ClockedConnection(self.site)

    def test_head_trickled_a_byte_a_second_gets_408_at_the_deadline(self) -> None:
        conn = self.connect()
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for i in range(9):
            conn.send(head[i:i + 1])
            self.clock.advance(1)
        self.assertEqual(conn.answer(), b"")
        self.assertFalse(conn.closing)
        conn.send(head[9:10])  # every byte resets the idle timeout; not this deadline
        self.clock.advance(1)
        status, headers, body = parse(conn.answer())
        self.assertEqual(status, 408)
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(json.loads(body)["error"], "request_timeout")
        self.assertTrue(conn.closing)
        self.assertEqual(self.refused, ["head_timeout"])

    def test_silent_connection_owes_its_first_head_within_the_deadline(self) -> None:
        conn = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(conn.closing)
        self.clock.advance(0.2)
        # Closed without a 408: no request began, so no one waits for one.
        self.assertTrue(conn.closing)
        self.assertEqual(conn.answer(), b"")
        self.assertEqual(self.refused, ["head_timeout"])

    def test_idle_keep_alive_is_not_a_slow_head(self) -> None:
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = parse(conn.answer())
        self.assertEqual((status, body), (200, b"ok"))
        self.clock.advance(30)  # idle, under Twisted's 60 s idle timeout
        self.assertEqual(conn.answer(), b"")
        self.assertFalse(conn.closing)
        conn.send(b"GET / HT")  # the next head's first bytes start its deadline
        self.clock.advance(9)
        self.assertEqual(conn.answer(), b"")
        self.clock.advance(1.5)
        self.assertEqual(parse(conn.answer())[0], 408)

    def test_head_in_time_cancels_the_deadline(self) -> None:
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\n")
        self.clock.advance(9)
        conn.send(b"Host: x\r\n\r\n")
        self.assertEqual(parse(conn.answer())[0], 200)
        self.clock.advance(20)
        self.assertEqual(conn.answer(), b"")
        self.assertEqual(self.refused, [])

    def test_body_slower_than_the_minimum_rate_gets_408(self) -> None:
        conn = self.connect()
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n")
        for _ in range(int(BODY_WINDOW)):
            conn.send(b"x" * 100)  # 100 bytes/s, under 1000
            self.clock.advance(1)
        status, _, body = parse(conn.answer())
        self.assertEqual(status, 408)
        self.assertIn("bytes per second", json.loads(body)["message"])
        self.assertEqual(self.refused, ["body_too_slow"])

    def test_a_chunk_size_over_max_body_is_413_without_waiting(self) -> None:
        # The size line says it all: refused before any of its data, with
        # no time passing (not the body-rate 408 of a client that waits).
        conn = self.connect()
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(b"fffffffffffffffffffff\r\nabc")
        status, headers, body = parse(conn.answer())
        self.assertEqual((status, headers["connection"], json.loads(body)["error"]), (413, "close", "body_too_large"))
        self.assertEqual(self.refused, ["body_too_large"])

    def test_chunked_bodies_within_max_body_and_what_follows_them_are_read(self) -> None:
        # Sizes adding up to max_body exactly pass; after the last chunk the
        # next pipelined request is a request, not chunk sizes (its body
        # line would declare 0xfffff).
        conn = self.connect()
        conn.send(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"1f4\r\n" + b"a" * 500 + b"\r\n1F4;ext=1\r\n" + b"b" * 500 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
            + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\nfffff\r\n"
        )
        answer = conn.answer()
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d+) ", answer), [b"200", b"200"])
        self.assertIn(b"got 1000", answer)
        self.assertTrue(answer.endswith(b"got 7"), answer)
        self.assertEqual(self.refused, [])

    def test_body_at_the_minimum_rate_is_read(self) -> None:
        site = make_site(Echo(), 100000, reactor=self.clock, limits=SocketLimits(head_timeout=10, min_body_rate=1000))
        conn = ClockedConnection(site)
        total = int(1000 * BODY_WINDOW * 3)
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(int(BODY_WINDOW * 3)):
            conn.send(b"x" * 1000)
            self.clock.advance(1)
        status, _, body = parse(conn.answer())
        self.assertEqual((status, body), (200, b"got %d" % total))

    def test_pipelined_bare_lf_head_is_answered_at_once(self) -> None:
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\nHost: x\n\n")
        answer = conn.answer()
        first, _, second = answer.partition(b"\r\n\r\nok")
        self.assertEqual(parse(first + b"\r\n\r\nok")[0], 200)
        self.assertEqual(parse(second)[0], 400)
        self.assertTrue(conn.closing)

    def test_idle_keep_alive_times_out_after_twisteds_idle_timeout(self) -> None:
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(parse(conn.answer())[0], 200)
        idle = conn.channel.timeOut
        self.assertTrue(idle)
        self.clock.advance(idle - 0.5)
        self.assertFalse(conn.closing)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a request restarts the idle time
        self.assertEqual(parse(conn.answer())[0], 200)
        self.clock.advance(idle - 0.5)
        self.assertFalse(conn.closing)
        self.clock.advance(1)
        self.assertTrue(conn.closing)
        self.assertEqual(conn.answer(), b"")

    def test_a_shorter_idle_timeout_set_later_is_kept(self) -> None:
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(parse(conn.answer())[0], 200)
        conn.channel.setTimeout(1)
        self.clock.advance(0.9)
        self.assertFalse(conn.closing)
        self.clock.advance(0.2)
        self.assertTrue(conn.closing)

    def test_a_busy_connection_keeps_one_timer_and_every_deadline(self) -> None:
        # Deadlines that begin and end with every request (head, body rate,
        # idle) share one DelayedCall: 200 requests over 20 s schedule a
        # handful, not three per request.
        scheduled = []
        call_later = self.clock.callLater

        def counting(*args: Any, **kwargs: Any) -> Any:
            scheduled.append(args[0])
            return call_later(*args, **kwargs)

        self.clock.callLater = counting  # type: ignore[method-assign]
        conn = self.connect()
        for _ in range(200):
            conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
            self.assertEqual(parse(conn.answer())[0], 200)
            self.assertLessEqual(len(self.clock.getDelayedCalls()), 1)
            self.clock.advance(0.1)
        self.assertFalse(conn.closing)
        self.assertLessEqual(len(scheduled), 10)
        # The next head, trickled, still gets its 408 at its own deadline.
        conn.send(b"GET / HTTP/1.1\r\n")
        self.clock.advance(9.9)
        self.assertEqual(conn.answer(), b"")
        self.clock.advance(0.2)
        self.assertEqual(parse(conn.answer())[0], 408)
        self.assertEqual(self.refused, ["head_timeout"])

    def test_the_private_hook_for_parse_errors_still_exists(self) -> None:
        # hookah.web.channel overrides it to answer 400s with a body and
        # Connection: close; a Twisted that renamed it would silently fall
        # back to its bare 400.
        self.assertTrue(callable(getattr(HTTPChannel, BAD_REQUEST_HOOK, None)))


def exchange(port: int, data: bytes, send_after: bytes = b"", timeout: float = 20.0) -> bytes:
    """Send ``data``, read until the server closes (or ``timeout``), in a thread."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        if send_after:
            chunks.append(s.recv(65536))
            try:
                s.sendall(send_after)
            except OSError:
                pass
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


class SocketTests(TestCase):
    """Over real loopback sockets, against a running ``HookahService``."""

    async def start(self, **settings: Any) -> int:
        self.service, base = await start_hookah(self, **settings)
        return int(base.rsplit(":", 1)[1])

    async def ask(self, port: int, data: bytes, **kwargs: Any) -> Tuple[int, Dict[str, str], bytes]:
        answer = await deferToThread(exchange, port, data, **kwargs)
        self.assertTrue(answer, "the server closed without answering")
        return parse(answer)

    def test_declared_body_over_max_body_is_413_before_it_is_sent(self) -> None:
        async def go() -> None:
            port = await self.start(max_body=1000)
            head = (
                b"POST /dispatch?_url=http%3A%2F%2F127.0.0.1%3A9%2F HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 50000000\r\n"
            )
            # With Expect: 100-continue the client sends nothing more and
            # must hear 413 (not 100, not silence).
            status, headers, body = await self.ask(port, head + b"Expect: 100-continue\r\n\r\n")
            self.assertEqual(status, 413)
            self.assertEqual(headers["connection"], "close")
            self.assertEqual(json.loads(body)["error"], "body_too_large")
            # Without it the answer comes while the client is still sending.
            status, headers, body = await self.ask(port, head + b"\r\n" + b"x" * 5000)
            self.assertEqual(status, 413)
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 0)

        return ensureDeferred(go())

    def test_chunked_body_is_refused_once_it_passes_max_body(self) -> None:
        async def go() -> None:
            port = await self.start(max_body=1000)
            head = (
                b"POST /dispatch?_url=http%3A%2F%2F127.0.0.1%3A9%2F HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            # No terminating chunk: the answer cannot wait for the end.
            status, headers, body = await self.ask(port, head + b"800\r\n" + b"x" * 2048 + b"\r\n")
            self.assertEqual(status, 413)
            self.assertEqual(headers["connection"], "close")

        return ensureDeferred(go())

    def test_chunk_sizes_over_max_body_are_413_at_the_size_line(self) -> None:
        async def go() -> None:
            port = await self.start(max_body=1000)
            head = (
                b"POST /dispatch?_url=http%3A%2F%2F127.0.0.1%3A9%2F HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            # The client sends a size line and waits (it was a 408 once the
            # body-rate window ran out); sizes adding up past the limit are
            # refused before the chunk that passes it.
            for body in (
                b"fffffffffffffffffffff\r\nabc\r\n",
                b"3e9\r\n",
                b"1f4\r\n" + b"x" * 500 + b"\r\n1f5\r\n",
            ):
                status, headers, answer = await self.ask(port, head + body)
                self.assertEqual((status, headers["connection"]), (413, "close"), body[:30])
                self.assertEqual(headers["server"], "hookah")
                self.assertEqual(json.loads(answer)["error"], "body_too_large")
            # Up to the limit exactly, it is accepted.
            within = b"1f4\r\n" + b"x" * 500 + b"\r\n1f4\r\n" + b"y" * 500 + b"\r\n0\r\n\r\n"
            status, _, _ = await self.ask(port, head.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1) + within)
            self.assertEqual(status, 202)
            counts = await self.service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 1)

        return ensureDeferred(go())

    def test_oversized_request_line_and_headers_get_414_and_431(self) -> None:
        async def go() -> None:
            port = await self.start()
            status, headers, body = await self.ask(port, b"GET /healthz?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual((status, json.loads(body)["error"]), (414, "uri_too_long"))
            self.assertEqual(headers["connection"], "close")
            many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20))
            status, headers, body = await self.ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
            self.assertEqual((status, json.loads(body)["error"]), (431, "headers_too_large"))
            one = b"X-Long: " + b"c" * 17000 + b"\r\n"
            status, _, _ = await self.ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + one + b"\r\n")
            self.assertEqual(status, 431)

        return ensureDeferred(go())

    def test_parse_errors_are_400_with_a_body_and_connection_close(self) -> None:
        async def go() -> None:
            port = await self.start()
            for head in (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
                b"POST /dispatch HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"POST /dispatch HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            ):
                status, headers, body = await self.ask(port, head)
                self.assertEqual(status, 400, head)
                self.assertEqual(headers["connection"], "close", head)
                self.assertEqual(json.loads(body)["error"], "bad_request", head)

        return ensureDeferred(go())

    def test_bare_lf_head_is_answered_at_once(self) -> None:
        async def go() -> None:
            # No head deadline: only the bare-LF rule can answer.
            port = await self.start(head_timeout=0)
            for head in (b"GET /healthz HTTP/1.1\nHost: x\n\n", b"GET /healthz HTTP/1.1\rHost: x\r\r"):
                status, headers, _ = await self.ask(port, head, timeout=15)
                self.assertEqual(status, 400, head)
                self.assertEqual(headers["connection"], "close")

        return ensureDeferred(go())

    def test_server_header_names_no_version(self) -> None:
        async def go() -> None:
            port = await self.start()
            for request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
                answer = await deferToThread(exchange, port, request)
                self.assertIn(b"\r\nServer: hookah\r\n", answer)
                self.assertNotIn(b"Twisted", answer)

        return ensureDeferred(go())

    def test_head_deadline_over_a_socket(self) -> None:
        async def go() -> None:
            port = await self.start(head_timeout=0.5)
            status, headers, body = await self.ask(port, b"GET /healthz HTTP/1.1\r\nHost:")
            self.assertEqual(status, 408)
            self.assertEqual(json.loads(body)["error"], "request_timeout")

        return ensureDeferred(go())

    def test_connections_over_the_cap_get_503_and_streams_count_apart(self) -> None:
        async def go() -> None:
            port = await self.start(max_connections=2, max_streams=2, head_timeout=0)
            site = self.service.site
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            try:
                await poll("two idle connections", lambda: site.request_connections == 2)
                status, headers, body = await self.ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertEqual(status, 503)
                self.assertEqual(headers["retry-after"], "1")
                self.assertEqual(json.loads(body)["error"], "too_many_connections")
                metrics = await self.metrics(idle[0])
                self.assertIn('hookah_http_refusals_total{reason="connections"} 1.0', metrics)
            finally:
                for s in idle:
                    s.close()
            await poll("the idle connections closed", lambda: site.request_connections == 0)
            # Streams do not use up the request connections, nor the reverse.
            streams = [self.open_stream(port) for _ in range(2)]
            try:
                await poll("two streams", lambda: site.streams == 2)
                status, _, _ = await self.ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                self.assertEqual(status, 200)
                status, headers, body = await self.ask(
                    port, b"GET /stream?topic=t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                self.assertEqual((status, json.loads(body)["error"]), (503, "too_many_streams"))
                self.assertIn("retry-after", headers)
            finally:
                for s in streams:
                    s.close()
            await poll("the streams ended", lambda: site.streams == 0 and site.request_connections == 0)
            status, _, _ = await self.ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertEqual(status, 200)

        return ensureDeferred(go())

    def open_stream(self, port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /stream?topic=t HTTP/1.1\r\nHost: x\r\n\r\n")
        return s

    async def metrics(self, sock: Optional[socket.socket]) -> str:
        assert sock is not None

        def get() -> bytes:
            sock.settimeout(20)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return data
                data += chunk

        return (await deferToThread(get)).decode()

    def test_listen_backlog_is_sized_for_bursts(self) -> None:
        async def go() -> None:
            self.service, _ = await start_hookah(self, backlog=777)
            port = await self.service.listening()
            self.assertEqual(port.backlog, 777)

        return ensureDeferred(go())

    def test_backlog_goes_into_endpoint_strings_that_take_it(self) -> None:
        self.assertEqual(with_backlog("tcp:8080", 1024), "tcp:8080:backlog=1024")
        self.assertEqual(with_backlog("unix:/tmp/s", 5), "unix:/tmp/s:backlog=5")
        self.assertEqual(with_backlog("tcp:80:backlog=9", 1024), "tcp:80:backlog=9")
        self.assertEqual(Config().backlog, 1024)


