"""
The outgoing client's response parser (``hookah.outbound.parser``): any valid
response, cut anywhere, reads the same; malformed heads fail with a
``MalformedResponse`` that says why, never hang and never raise anything else.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from hypothesis import given, settings, strategies as st
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from hookah.outbound.client import HTTPClient
from hookah.outbound.outcome import MalformedResponse, NoResponse, ResponseBroken, TimedOut, describe_failure
from hookah.outbound.parser import MAX_HEAD, ResponseParser

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=12)
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=20).map(
    lambda v: v.strip()
)
_FRAMING = ("content-length", "transfer-encoding", "connection")
_HEADERS = st.lists(st.tuples(_TOKEN, _VALUE), max_size=6).map(lambda hs: [(n, v) for n, v in hs if n.lower() not in _FRAMING])


@st.composite
def responses(draw: st.DrawFn) -> Tuple[bytes, int, List[Tuple[str, str]], bytes, str]:
    """(wire bytes, code, headers as sent, body, framing) of a valid HTTP/1.1 response, maybe after interim 1xx."""
    code = draw(st.sampled_from([200, 201, 202, 400, 404, 410, 500, 503]))
    headers = draw(_HEADERS)
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    wire = b""
    for interim in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        wire += f"HTTP/1.1 {interim} Interim\r\nX-Interim: 1\r\n\r\n".encode()
    reason = draw(st.sampled_from(["", " OK", " Some Reason"]))
    sent = list(headers)
    if framing == "length":
        sent.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        sent.append(("Transfer-Encoding", "chunked"))
    else:
        sent.append(("Connection", "close"))
    wire += f"HTTP/1.1 {code}{reason}\r\n".encode()
    wire += b"".join(n.encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n" for n, v in sent) + b"\r\n"
    if framing == "chunked":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)]) if b > a]
        for piece in pieces:
            extension = draw(st.sampled_from([b"", b";name=value", b"; x"]))
            wire += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
        wire += b"0\r\n"
        if draw(st.booleans()):
            wire += b"X-Trailer: done\r\n"
        wire += b"\r\n"
    else:
        wire += body
    return wire, code, sent, body, framing


def cut(data: bytes, points: Sequence[int]) -> List[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def parse(pieces: Sequence[bytes], head: bool = False, cap: int = 1 << 20, eof: bool = True) -> ResponseParser:
    parser = ResponseParser(head, cap)
    for piece in pieces:
        if parser.done:
            break
        parser.feed(piece)
    if eof and not parser.done:
        parser.eof()
    return parser


class ValidResponseTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(responses(), st.lists(st.integers(0, 2000), max_size=8))
    def test_any_split_reads_the_same(self, response: Tuple[bytes, int, List[Tuple[str, str]], bytes, str], points: List[int]) -> None:
        wire, code, sent, body, framing = response
        parser = parse(cut(wire, points), eof=framing == "close")
        self.assertTrue(parser.done)
        self.assertEqual((parser.code, parser.body, parser.truncated), (code, body, False))
        self.assertEqual(list(parser.headers), sent)
        # Length and chunks leave the connection reusable; read-until-close does not.
        self.assertEqual(parser.reusable, framing != "close")

    @settings(max_examples=200, deadline=None)
    @given(responses(), st.integers(0, 299), st.lists(st.integers(0, 2000), max_size=4))
    def test_the_cap_truncates(self, response: Tuple[bytes, int, List[Tuple[str, str]], bytes, str], cap: int, points: List[int]) -> None:
        wire, code, sent, body, framing = response
        parser = parse(cut(wire, points), cap=cap)
        self.assertTrue(parser.done)
        self.assertEqual(parser.body, body[:cap])
        self.assertEqual(parser.truncated, len(body) > cap)
        if parser.truncated:
            self.assertFalse(parser.reusable)

    def test_no_body_for_head_204_304(self) -> None:
        for wire, head in [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", True),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
            (b"HTTP/1.1 204 No Content\r\n\r\n", False),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n", False),
        ]:
            parser = parse([wire], head=head, eof=False)
            self.assertTrue(parser.done, wire)
            self.assertEqual(parser.body, b"")
            self.assertTrue(parser.reusable, wire)

    def test_what_is_not_reused(self) -> None:
        for wire in [
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ]:
            parser = parse([wire], eof=False)
            self.assertTrue(parser.done, wire)
            self.assertEqual(parser.body, b"ok")
            self.assertFalse(parser.reusable, wire)

    def test_repeated_equal_lengths_are_one(self) -> None:
        parser = parse([b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok"], eof=False)
        self.assertEqual((parser.done, parser.body, parser.reusable), (True, b"ok", True))

    def test_a_length_larger_than_the_cap_ends_at_the_cap(self) -> None:
        parser = parse([b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"x" * 10], cap=10, eof=False)
        self.assertEqual((parser.done, parser.body, parser.truncated, parser.reusable), (True, b"x" * 10, True, False))

    def test_cut_short(self) -> None:
        for wire in [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-",
        ]:
            parser = ResponseParser(False, 1000)
            parser.feed(wire)
            self.assertFalse(parser.done)
            self.assertTrue(parser.started)
            self.assertFalse(parser.eof(), wire)
        self.assertFalse(ResponseParser(False, 1000).started)


MALFORMED = [
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\n\r\n", "obsolete line folding"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", "conflicting Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n", "conflicting Content-Length"),
    (b"HTTP/2 200\r\n\r\n", "bad status line"),
    (b"ICY 200 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 099 Low\r\n\r\n", "bad status code"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
    (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "bad header"),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "bad header name"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "control character"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n", "chunk not followed by CRLF"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", "larger than 64 KiB"),
    (b"HTTP/1.1 200 OK\r\n" + b"a" * (MAX_HEAD + 10), "larger than 64 KiB"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 5000, "chunk-size line too long"),
]


class MalformedResponseTests(SynchronousTestCase):
    def test_examples_fail_with_the_reason(self) -> None:
        for wire, reason in MALFORMED:
            for pieces in ([wire], [wire[i : i + 7] for i in range(0, len(wire), 7)]):
                parser = ResponseParser(False, 1000)
                with self.assertRaises(MalformedResponse, msg=wire[:60]) as caught:
                    for piece in pieces:
                        parser.feed(piece)
                self.assertIn(reason, str(caught.exception), wire[:60])

    @settings(max_examples=400, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=400),
            st.lists(st.sampled_from([b"HTTP/1.1 ", b"200", b" OK", b"\r\n", b":", b"Content-Length", b"Transfer-Encoding",
                                      b"chunked", b"5", b"ff", b";x", b" ", b"\t", b"\n", b"\x00", b"abc"]), max_size=40).map(b"".join),
        ),
        st.lists(st.integers(0, 500), max_size=6),
    )
    def test_any_bytes_end_in_a_response_a_clear_failure_or_a_wait(self, data: bytes, points: List[int]) -> None:
        parser = ResponseParser(False, 100)
        try:
            for piece in cut(data, points):
                parser.feed(piece)
        except MalformedResponse as e:
            self.assertTrue(str(e))
            return
        # Waiting: the end of the connection decides.
        complete = parser.eof()
        self.assertEqual(complete, parser.done)


class _Endpoint:
    """Connects every request to a ``StringTransport`` the test feeds."""

    def __init__(self) -> None:
        self.connections: List[object] = []

    def endpoint_for(self, scheme: str, host: str, port: int) -> _Endpoint:
        return self

    def connect(self, factory: object) -> object:
        protocol = factory.buildProtocol(None)  # type: ignore[attr-defined]
        protocol.makeConnection(StringTransport())
        self.connections.append(protocol)
        return succeed(protocol)


class ClientOverBytesTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=5), st.booleans())
    def test_whatever_arrives_the_request_ends_cleanly(self, data: bytes, points: List[int], close: bool) -> None:
        """dataReceived never raises; the request ends in a Response or a described failure (or waits for its deadline)."""
        clock = Clock()
        endpoint = _Endpoint()
        client = HTTPClient(clock, endpoint, max_response_body=64)
        d = client.request("POST", "http://hook.example/x", (), b"{}", 5)
        [protocol] = endpoint.connections
        for piece in cut(b"HTTP/1.1 200 OK\r\n" + data, points):
            protocol.dataReceived(piece)  # type: ignore[attr-defined]
        if close:
            protocol.connectionLost()  # type: ignore[attr-defined]
        else:
            clock.advance(5)
        outcome: List[object] = []
        d.addBoth(outcome.append)
        [result] = outcome
        if hasattr(result, "check"):
            self.assertIsNotNone(result.check(MalformedResponse, ResponseBroken, NoResponse, TimedOut))  # type: ignore[union-attr]
            self.assertTrue(describe_failure(result, 5.0))  # type: ignore[arg-type]
        else:
            self.assertLessEqual(len(result.body), 64)  # type: ignore[attr-defined]
        # The deadline's timer is gone either way.
        self.assertEqual([c for c in clock.getDelayedCalls() if c.getTime() <= 5], [])

    def test_request_bytes(self) -> None:
        clock = Clock()
        endpoint = _Endpoint()
        client = HTTPClient(clock, endpoint, user_agent="hookah/test")
        requests = [
            client.request("POST", "http://Hook.example:8080/a b?q=1", [("X-One", "1"), ("Content-Length", "99"), ("Host", "evil")], b"{}", 5),
            client.request("GET", "https://[::1]/t", (), None, 5),
        ]
        written = [c.transport.value() for c in endpoint.connections]  # type: ignore[attr-defined]
        self.assertEqual(written[0], b"POST /a%20b?q=1 HTTP/1.1\r\nHost: hook.example:8080\r\nUser-Agent: hookah/test\r\n"
                         b"X-One: 1\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(written[1], b"GET /t HTTP/1.1\r\nHost: [::1]\r\nUser-Agent: hookah/test\r\n\r\n")
        clock.advance(5)
        for d in requests:
            self.failureResultOf(d, TimedOut)

    def test_a_header_with_a_line_break_is_not_sent(self) -> None:
        client = HTTPClient(Clock(), _Endpoint())
        failure = self.failureResultOf(client.request("POST", "http://h.example/", [("X-A", "1\r\nX-Injected: 2")], b"", 5))
        self.assertIn("line break", describe_failure(failure, 5))
