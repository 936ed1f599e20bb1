"""
Framing of ``/stream``: every body survives each format's encoder and the
matching parser, however the network splits the bytes.
"""

from __future__ import annotations

import json
from typing import Any, List

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from hookah.model import Event
from hookah.streams.format import FORMATS, JSON_LINES, LENGTH_DELIMITED, SSE, FrameCache, chunk, encode_event, sse_field_value, sse_message
from hookah.streams.parse import SSEParser, parser_for
from tests.streamwire import ChunkedDecoder, body_of

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)

# (content type, body) pairs of the three kinds the formats must carry.
bodies = st.one_of(
    json_values.map(lambda v: ("application/json", json.dumps(v, indent=1).encode())),
    st.text().map(lambda t: ("text/plain; charset=utf-8", t.encode("utf-8"))),
    st.binary().map(lambda b: ("application/octet-stream", b)),
)
topics = st.text(min_size=1, max_size=30)


def split(data: bytes, cuts: List[int]) -> List[bytes]:
    """``data`` cut at the given offsets, as reads from a socket would be."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points + [len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


def parse_all(format_name: str, wire: bytes, cuts: List[int]) -> List[Any]:
    return parse_with(parser_for(format_name), wire, cuts)


def parse_with(parser: Any, wire: bytes, cuts: List[int]) -> List[Any]:
    messages: List[Any] = []
    for piece in split(wire, cuts):
        messages.extend(parser.feed(piece))
    return messages


def as_object(format_name: str, message: Any) -> Any:
    return message.json() if format_name == "sse" else message


class RoundTripTests(TestCase):
    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(st.tuples(topics, bodies), min_size=1, max_size=4),
        st.sampled_from(sorted(FORMATS)),
        st.lists(st.integers(min_value=0), max_size=8),
        st.booleans(),
    )
    def test_any_body_round_trips(self, items: List[Any], format_name: str, cuts: List[int], keepalives: bool) -> None:
        """
        Events of every kind, framed for one format (with keep-alives and
        chunked transfer coding between them), parse back to the same ids,
        topics, content types and bodies.
        """
        fmt = FORMATS[format_name]
        events = [
            Event(id=f"01ID{i:04d}", topic=topic, body=body, content_type=ctype, created_at=1.5 + i)
            for i, (topic, (ctype, body)) in enumerate(items)
        ]
        wire = chunk(fmt.preamble) if fmt.preamble else b""
        for event in events:
            wire += FrameCache(event).get(fmt, True)
            if keepalives:
                wire += chunk(fmt.keepalive)
        decoder = ChunkedDecoder()
        body = b"".join(decoder.feed(piece) for piece in split(wire + b"0\r\n\r\n", cuts))
        self.assertTrue(decoder.done)
        parser = parser_for(format_name)
        messages = parse_with(parser, body, cuts)
        self.assertEqual(len(messages), len(events))
        skipped = parser.comments if format_name == "sse" else parser.keepalives
        self.assertEqual(skipped, len(events) if keepalives else 0)
        for event, message in zip(events, messages):
            obj = as_object(format_name, message)
            self.assertEqual((obj["id"], obj["topic"], obj["content_type"], obj["time"]), (event.id, event.topic, event.content_type, event.created_at))
            if event.content_type == "application/json":
                self.assertEqual(obj["data"], json.loads(event.body))
            else:
                self.assertEqual(body_of(obj), event.body)
            if format_name == "sse":
                self.assertEqual((message.id, message.event), (event.id, sse_field_value(event.topic)))
                self.assertNotIn("\n", message.event)
        if format_name == "sse":
            self.assertEqual(messages[0].retry, 3000)

    @settings(max_examples=150, deadline=None)
    @given(st.text(), st.lists(st.integers(min_value=0), max_size=6))
    def test_sse_multiline_data(self, data: str, cuts: List[int]) -> None:
        """Data with CR, LF or CRLF breaks becomes several data: lines and joins back with LF."""
        wire = sse_message(data, event="t", id="1")
        expected = data.replace("\r\n", "\n").replace("\r", "\n")
        self.assertEqual(wire.count(b"\ndata: ") + wire.startswith(b"data: "), expected.count("\n") + 1)
        messages = parse_all("sse", wire, cuts)
        self.assertEqual([(m.data, m.event, m.id) for m in messages], [(expected, "t", "1")])

    @given(st.text(alphabet=st.sampled_from(["a", "\u2028", "\u2029", "\x85", "\n", "\r", "é"])))
    def test_encoded_event_has_no_line_break(self, text: str) -> None:
        """No character that any common reader treats as a line end appears raw."""
        line = encode_event(Event(id="1", topic=text or "t", body=text.encode(), content_type="text/plain"))
        self.assertEqual(line.decode("utf-8").splitlines(), [line.decode("utf-8")])
        self.assertEqual(json.loads(line)["data"], text)


class KeepaliveTests(TestCase):
    def test_keepalives_are_skipped_by_readers(self) -> None:
        event = Event(id="A", topic="t", body=b"1", content_type="application/json")
        for fmt in (JSON_LINES, LENGTH_DELIMITED, SSE):
            parser = parser_for(fmt.name)
            wire = fmt.preamble + fmt.keepalive + FrameCache(event).get(fmt, False) + fmt.keepalive
            messages = parser.feed(wire)
            self.assertEqual(len(messages), 1, fmt)
            counted = parser.comments if fmt is SSE else parser.keepalives
            self.assertEqual(counted, 2, fmt)

    def test_length_prefix_counts_bytes(self) -> None:
        event = Event(id="A", topic="t", body="é\u2028".encode(), content_type="text/plain")
        frame = FrameCache(event).get(LENGTH_DELIMITED, False)
        head, _, rest = frame.partition(b"\r\n")
        self.assertEqual(int(head), len(rest))
        self.assertTrue(rest.endswith(b"\r\n"))

    def test_frames_are_shared(self) -> None:
        """One publish encodes once per (format, chunked) and hands out the same object."""
        frames = FrameCache(Event(id="A", topic="t", body=b"x"))
        self.assertIs(frames.get(SSE, True), frames.get(SSE, True))
        self.assertIsNot(frames.get(SSE, True), frames.get(SSE, False))

    def test_sse_fields_cannot_break_lines(self) -> None:
        event = Event(id="A", topic="a\nid: forged", body=b"x", content_type="text/plain")
        messages = SSEParser().feed(FrameCache(event).get(SSE, False))
        self.assertEqual((messages[0].event, messages[0].id), ("a%0Aid: forged", "A"))
        self.assertEqual(messages[0].json()["topic"], "a\nid: forged")

    def test_error_message_in_each_format(self) -> None:
        for fmt in (JSON_LINES, LENGTH_DELIMITED, SSE):
            messages = parser_for(fmt.name).feed(fmt.message({"error": "too_slow", "message": "m"}))
            obj = messages[0].json() if fmt is SSE else messages[0]
            self.assertEqual(obj["error"], "too_slow")
            if fmt is SSE:
                self.assertEqual(messages[0].event, "hookah-error")
