"""
Request heads read in one go (``hookah.web.fasthead``): over real sockets
on 127.0.0.1, the same requests get the same answers, byte for byte, with
the fast path on and off (plain, pipelined, 100-continue, chunked, HTTP/1.0,
folded headers, and every malformed head of ``bench/abuse.py``); the
socket-limit, deadline, answer and request tests run again with it off; it
checks itself and turns itself off with one log line when Twisted's
private state is not as it expects.
"""

from __future__ import annotations

import re
from typing import Any, List, Tuple
from urllib.parse import quote

from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from hookah.web.common import make_site
from hookah.web.fasthead import FastHead, fast_head
from tests import test_answer_send, test_request_parse, test_socket_limits
from tests.support import listen_sink, start_hookah
from tests.test_malformed_heads import load_abuse
from tests.test_answer_send import RawClient
from tests.test_socket_limits import Echo, parse

DATE = re.compile(rb"Date: [^\r]*\r\n")
ULID = re.compile(rb"[0-9A-HJKMNP-TV-Z]{26}")


CLOSING = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def normalised(data: bytes) -> bytes:
    return ULID.sub(b"<id>", DATE.sub(b"Date: <date>\r\n", data))


def requests(sink: str) -> List[Tuple[str, bytes]]:
    url = quote(sink + "/hook", safe="").encode()
    body = b'{"a":1}'
    dispatch = (
        b"POST /dispatch?_url=" + url + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    closing = CLOSING
    return [
        ("dispatch", dispatch + closing),
        ("pipelined", dispatch * 3 + closing),
        ("100-continue", dispatch.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n") + closing),
        ("chunked", b"POST /dispatch?_url=" + url + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n" + closing),
        ("HTTP/1.0", b"GET /healthz HTTP/1.0\r\n\r\n"),
        ("folded header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: a\r\n b\r\nConnection: close\r\n\r\n"),
        ("lower-case framing", dispatch.replace(b"Content-Length", b"content-length") + closing),
        ("identity", dispatch.replace(b"Host: x\r\n", b"Host: x\r\nTransfer-Encoding: identity\r\n") + closing),
        ("no such resource", b"DELETE /nowhere/x%2Fy?a=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("over max_body", dispatch.replace(b"Content-Length: 7", b"Content-Length: 999999")),
        ("head then body later", dispatch[: dispatch.index(b"\r\n\r\n") + 4]),
    ]


class SameAnswersTests(TestCase):
    async def answers(self, port: int, cases: List[Tuple[str, bytes]]) -> List[bytes]:
        """Every case on its own connection, all at once, each read until the server closes it."""
        clients = []
        for _, data in cases:
            client = RawClient(data)
            factory = ClientFactory.forProtocol(lambda client=client: client)  # type: ignore[misc]
            connector = reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[attr-defined]
            self.addCleanup(connector.disconnect)
            clients.append(client.closed)
        return [normalised(data) for data in await gatherResults(clients)]

    async def test_same_bytes_with_and_without(self) -> None:
        abuse = load_abuse()
        _, sink = listen_sink(self)
        service, base = await start_hookah(self, max_body=abuse.MAX_BODY, head_timeout=1)
        port = int(base.rsplit(":", 1)[1])
        # Each malformed head, then a request that closes the connection
        # (whatever became of the head, the server ends the exchange).
        cases = requests(sink) + [(name, abuse.head_bytes(head, sink + "/hook") + CLOSING) for name, head in abuse.HEADS]
        before = fast_head.heads
        with_fast = await self.answers(port, cases)
        self.assertGreater(fast_head.heads - before, 10, "the fast path took the plain heads")
        self.patch(fast_head, "enabled", False)
        before = fast_head.heads
        without = await self.answers(port, cases)
        self.assertEqual(fast_head.heads, before)
        for (name, _), ours, theirs in zip(cases, with_fast, without):
            self.assertEqual(ours, theirs, name)
        self.assertIn(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202", with_fast[2])
        self.assertEqual(with_fast[1].count(b"HTTP/1.1 202 "), 3)
        self.assertIn(b"HTTP/1.1 413 ", with_fast[9])
        self.assertIn(b"HTTP/1.1 408 ", with_fast[10])
        counts = await service.store.count_deliveries()
        self.assertEqual(sum(counts.values()), 2 * 8)  # dispatch, 3 pipelined, 100-continue, chunked, lower-case, identity


class SelfCheckTests(TestCase):
    def test_twisted_is_as_the_fast_path_expects(self) -> None:
        channel = make_site(Echo(), 1000, reactor=Clock()).buildProtocol(None)
        channel.makeConnection(StringTransport())
        self.assertIsNone(FastHead().check(channel))

    def test_a_channel_not_as_expected_turns_it_off_with_one_log_line(self) -> None:
        events: List[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fast = FastHead()
        self.patch(fast_head, "enabled", False)  # the channel's own path: Twisted's
        site = make_site(Echo(), 1000, reactor=Clock())
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.delimiter = b"\n"  # not as the fast path expects
        self.assertFalse(fast.read(channel, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 16384))
        self.assertFalse(fast.enabled)
        self.assertFalse(fast.read(channel, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 16384))
        self.assertEqual(fast.heads, 0)
        warnings = [e for e in events if "fast path off" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertIn("delimiter", warnings[0]["reason"])

    def test_a_head_in_pieces_is_read_by_twisted(self) -> None:
        site = make_site(Echo(), 1000, reactor=Clock())
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        before = fast_head.heads
        channel.dataReceived(b"GET / HTTP/1.1\r\nHo")
        channel.dataReceived(b"st: x\r\n\r\n")
        self.assertEqual(parse(transport.value())[0], 200)
        self.assertEqual(fast_head.heads, before)
        transport.clear()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(parse(transport.value())[0], 200)
        self.assertEqual(fast_head.heads, before + 1)


class _Off:
    """Runs a test case's tests with the fast path off."""

    def setUp(self) -> Any:
        self.patch(fast_head, "enabled", False)  # type: ignore[attr-defined]
        return super().setUp()  # type: ignore[misc]


class SocketTestsWithoutFastHead(_Off, test_socket_limits.SocketTests):
    pass


class DeadlineTestsWithoutFastHead(_Off, test_socket_limits.DeadlineTests):
    pass


class AnswerSendWithoutFastHead(_Off, test_answer_send.AnswerSendTestCase):
    pass


class SameAsTwistedWithoutFastHead(_Off, test_request_parse.SameAsTwistedTests):
    pass
