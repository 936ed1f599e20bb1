"""
Whole answers in one send (``HookahRequest.respond`` through
``HookahChannel.gather`` and ``hookah.fastwrite``), over real sockets on
127.0.0.1: a client receives exactly the same bytes with the fast path on
and off, for pipelined requests, ``HEAD``, errors, ``Connection: close``
and HTTP/1.0; only the number of direct sends differs.
"""

from __future__ import annotations

import json
import re
from typing import Any, List, Tuple
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from twisted.web.http import datetimeToString

from hookah import fastwrite
from hookah.web.common import HttpDate
from tests.support import listen_sink, start_hookah

# What differs between two runs whatever the write path: the Date header,
# and the ids Hookah makes (ULIDs, in bodies and Location headers).
DATE = re.compile(rb"Date: [^\r]*\r\n")
ULID = re.compile(rb"[0-9A-HJKMNP-TV-Z]{26}")


class RawClient(Protocol):
    """Writes ``request`` at once (several pipelined requests may be in it) and keeps every byte until the close."""

    transport: Any

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(self.data)


def normalised(data: bytes) -> bytes:
    return ULID.sub(b"<id>", DATE.sub(b"Date: <date>\r\n", data))


def answers(data: bytes) -> List[Tuple[bytes, dict, bytes]]:
    """Each answer of ``data`` (Content-Length framed): status line, headers (lower-case names), body."""
    parsed = []
    while data:
        head, data = data.split(b"\r\n\r\n", 1)
        status, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, value = line.split(b":", 1)
            headers[name.strip().lower()] = value.strip()
        length = int(headers[b"content-length"])
        parsed.append((status, headers, data[:length]))
        data = data[length:]
    return parsed


class AnswerSendTestCase(TestCase):
    async def exchange(self, port: int, request: bytes) -> bytes:
        client = RawClient(request)
        factory = ClientFactory.forProtocol(lambda: client)  # type: ignore[arg-type]
        connector = reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[attr-defined]
        self.addCleanup(connector.disconnect)
        data: bytes = await client.closed
        return data

    async def both_ways(self, request: bytes) -> Tuple[bytes, int]:
        """The bytes ``request`` gets with the fast path off, then on (checked equal); the direct sends made with it on."""
        service, base = await start_hookah(self)
        port = int(base.rsplit(":", 1)[1])
        self.patch(fastwrite.fast_path, "enabled", False)
        self.patch(fastwrite.fast_path, "counting", True)
        sends = fastwrite.fast_path.sends
        without = await self.exchange(port, request)
        self.assertEqual(fastwrite.fast_path.sends, sends, "nothing is sent directly with the fast path off")
        fastwrite.fast_path.enabled = True
        with_fast = await self.exchange(port, request)
        self.assertEqual(normalised(with_fast), normalised(without))
        return with_fast, fastwrite.fast_path.sends - sends

    def dispatch_request(self, sink: str, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
        body = b'{"a": 1}'
        return (
            b"POST /dispatch?_url=" + quote(sink + "/hook", safe="").encode() + b" " + version + b"\r\n"
            b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )

    async def test_pipelined_answers_are_the_same_bytes_in_order(self) -> None:
        _, sink = listen_sink(self)
        request = (
            self.dispatch_request(sink)
            + b"GET /dispatch/01NOSUCHDELIVERY0000000000 HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"HEAD /dispatch?status=failed HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"POST /dispatch HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            + b"GET /dispatch?status=failed&limit=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            + self.dispatch_request(sink, b"Connection: close\r\n")
        )
        data, sends = await self.both_ways(request)
        statuses = re.findall(rb"HTTP/1.1 (\d+) ", data)
        self.assertEqual(statuses, [b"202", b"404", b"200", b"400", b"200", b"202"])
        # The last answer ends the connection, once it is out.
        last = data.rsplit(b"HTTP/1.1 ", 1)[1]
        self.assertIn(b"Connection: close\r\n", last)
        self.assertTrue(last.endswith(b"0\r\n\r\n"), last)
        # HEAD: headers, and not a byte of body before the next answer.
        head = data.split(b"HTTP/1.1 200 ", 1)[1].split(b"HTTP/1.1 ", 1)[0]
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)
        self.assertGreaterEqual(sends, 3, "the asynchronous answers went out in direct sends")

    async def test_one_answer_is_one_send(self) -> None:
        _, sink = listen_sink(self)
        data, sends = await self.both_ways(self.dispatch_request(sink, b"Connection: close\r\n"))
        self.assertEqual(sends, 1)
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 202 Accepted\r\n"), head)
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertRegex(body, rb'^[0-9a-f]+\r\n\{"id":"[0-9A-Z]{26}","status":"scheduled"\}\n\r\n0\r\n\r\n$')

    async def test_http_1_0_answers_are_the_same(self) -> None:
        _, sink = listen_sink(self)
        data, sends = await self.both_ways(self.dispatch_request(sink, version=b"HTTP/1.0"))
        self.assertTrue(data.startswith(b"HTTP/1.0 202 Accepted\r\n"), data)
        self.assertNotIn(b"chunked", data)
        self.assertEqual(sends, 1)

    async def test_refusals_and_sync_answers_are_unchanged(self) -> None:
        # A body over the limit (413, answered at the socket), then nothing more.
        request = b"POST /dispatch?_url=http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n"
        data, _ = await self.both_ways(request)
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data)
        statuses: List[bytes] = re.findall(rb"HTTP/1.1 (\d+) ", data)
        self.assertEqual(statuses, [b"413"])

    async def test_options_star_is_answered_like_the_rest(self) -> None:
        # OPTIONS * (RFC 9110 9.3.7): 200, Allow, no content; another method
        # on * is Hookah's JSON 405 allowing OPTIONS; then the connection
        # goes on, its framing intact.
        request = (
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n"
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data, _ = await self.both_ways(request)
        (options, options_headers, options_body), (other, other_headers, other_body), (last, last_headers, _) = answers(data)
        self.assertEqual(options, b"HTTP/1.1 200 OK")
        self.assertEqual(
            {k: v for k, v in options_headers.items() if k != b"date"},
            {b"server": b"hookah", b"allow": b"GET, HEAD, OPTIONS, POST", b"content-length": b"0"},
        )
        self.assertRegex(options_headers[b"date"], rb"^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT$")
        self.assertEqual(options_body, b"")
        self.assertEqual(other, b"HTTP/1.1 405 Method Not Allowed")
        self.assertEqual((other_headers[b"server"], other_headers[b"allow"], other_headers[b"content-type"]),
                         (b"hookah", b"OPTIONS", b"application/json"))
        self.assertEqual(json.loads(other_body)["error"], "method_not_allowed")
        self.assertEqual((last, last_headers[b"server"], last_headers[b"connection"]), (b"HTTP/1.1 200 OK", b"hookah", b"close"))


class HttpDateTestCase(TestCase):
    def test_formatted_once_per_second_as_twisted_formats_it(self) -> None:
        now = [1700000000.25]
        date = HttpDate(lambda: now[0])
        first = date()
        self.assertEqual(first, datetimeToString(1700000000))
        self.assertEqual(first, b"Tue, 14 Nov 2023 22:13:20 GMT")
        now[0] = 1700000000.99
        self.assertIs(date(), first)
        now[0] = 1700000001.0
        self.assertEqual(date(), b"Tue, 14 Nov 2023 22:13:21 GMT")

    async def test_every_answer_has_a_date_and_names_hookah(self) -> None:
        service, base = await start_hookah(self)
        port = int(base.rsplit(":", 1)[1])
        request = (
            b"GET /dispatch/01NOSUCHDELIVERY0000000000 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await AnswerSendTestCase.exchange(self, port, request)  # type: ignore[arg-type]
        heads = [part.split(b"\r\n\r\n", 1)[0] for part in data.split(b"HTTP/1.1 ")[1:]]
        self.assertEqual(len(heads), 3, data)
        for head in heads:
            self.assertRegex(head, rb"\r\nDate: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")
            self.assertIn(b"\r\nServer: hookah\r\n", head)
            self.assertNotIn(b"Twisted", head)
