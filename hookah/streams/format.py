"""
The bytes of a stream: how one event is framed for each ``/stream`` format,
what a keep-alive looks like, and HTTP chunk framing.

Fan-out to a thousand readers is only cheap if the work per reader is a
``transport.write`` of bytes that already exist, so everything here turns
an event into finished bytes once; ``FrameCache`` holds them for one
publish and every stream of the same format and transfer coding gets the
very same ``bytes`` object.

Formats (as the README's "Streams" section documents them):

- ``json``: the event object (``hookah.streams.eventjson``) as one line, ``\\r\\n``
  terminated.
- ``length``: ``delimited=length``, the same line preceded by its length in
  bytes (terminator included) and ``\\r\\n``, as Twitter's streaming API did.
- ``sse``: Server-Sent Events, ``id:``, ``event: <topic>`` and ``data:``
  lines, the data being that same JSON object; a ``retry:`` hint opens the
  stream.

The JSON object never holds a raw line break (JSON escapes CR and LF, and
``U+0085``/``U+2028``/``U+2029`` are escaped here too, for readers that split
lines on them), so a line-based reader of any language frames it right.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Tuple

import attr

from hookah.streams.eventjson import event_to_json
from hookah.model import Event

__all__ = [
    "FORMATS",
    "JSON_LINES",
    "LENGTH_DELIMITED",
    "SSE",
    "FrameCache",
    "StreamFormat",
    "chunk",
    "encode_event",
    "sse_field_value",
    "sse_message",
]

# Milliseconds an EventSource waits before reconnecting; sent once per stream.
SSE_RETRY_MS = 3000

_LINE_SEPARATORS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def encode_event(event: Event) -> bytes:
    """The event's JSON object as compact UTF-8 with no line break of any kind."""
    text = json.dumps(event_to_json(event), ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        text = text.translate(_LINE_SEPARATORS)
    return text.encode("utf-8")


def sse_field_value(value: str) -> str:
    """
    A value safe for a one-line SSE field (``event:``, ``id:``): CR and LF
    would end the field early and NUL makes browsers ignore an ``id``, so
    they are percent-escaped. Values without them (nearly all) pass
    unchanged, so the field is a label, not an exact encoding: the JSON
    data carries the exact topic.
    """
    if "\r" in value or "\n" in value or "\0" in value:
        value = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A").replace("\0", "%00")
    return value


def sse_message(data: str, event: Optional[str] = None, id: Optional[str] = None) -> bytes:
    """
    One SSE message. ``data`` may hold any line breaks (CRLF, CR, LF): each
    line becomes its own ``data:`` field, which a reader joins back with LF.
    """
    lines = []
    if id is not None:
        lines.append("id: " + sse_field_value(id))
    if event is not None:
        lines.append("event: " + sse_field_value(event))
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append("data: " + line)
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk, framed once for every chunked stream."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@attr.s(frozen=True, slots=True, eq=False, repr=False)
class StreamFormat:
    """
    One way of framing events. Instances are shared singletons and compare
    by identity, so a frame cache keyed by format is a cheap dict lookup.
    """

    name: str = attr.ib()
    content_type: bytes = attr.ib()
    # Written once when the stream opens (may be empty).
    preamble: bytes = attr.ib()
    # Written every keep-alive period; a reader skips it.
    keepalive: bytes = attr.ib()

    def frame(self, event: Event, line: bytes) -> bytes:
        """The bytes for ``event``, given its encoded JSON object ``line``."""
        if self is SSE:
            return b"id: %s\nevent: %s\ndata: %s\n\n" % (
                sse_field_value(event.id).encode("utf-8"),
                sse_field_value(event.topic).encode("utf-8"),
                line,
            )
        if self is LENGTH_DELIMITED:
            return b"%d\r\n%s\r\n" % (len(line) + 2, line)
        return line + b"\r\n"

    def message(self, obj: dict, sse_event: bytes = b"hookah-error") -> bytes:
        """
        A control message in this format: the error line before a stream is
        closed, or the gap notice (``sse_event`` ``hookah-gap``) before a
        resumed replay. A JSON object with no ``id``; in SSE a message of
        its own event type with no ``id:`` field, so an ``EventSource``
        keeps its last event id.
        """
        line = json.dumps(obj, separators=(",", ":")).encode("ascii")
        if self is SSE:
            return b"event: %s\ndata: %s\n\n" % (sse_event, line)
        if self is LENGTH_DELIMITED:
            return b"%d\r\n%s\r\n" % (len(line) + 2, line)
        return line + b"\r\n"

    def __repr__(self) -> str:
        return f"<StreamFormat {self.name}>"


JSON_LINES = StreamFormat("json", b"application/json; charset=utf-8", b"", b"\r\n")
LENGTH_DELIMITED = StreamFormat("length", b"application/json; charset=utf-8", b"", b"\r\n")
SSE = StreamFormat(
    "sse", b"text/event-stream; charset=utf-8", b"retry: %d\n\n" % SSE_RETRY_MS, b":\n\n"
)
FORMATS: Dict[str, StreamFormat] = {f.name: f for f in (JSON_LINES, LENGTH_DELIMITED, SSE)}


class FrameCache:
    """
    The frames of one event, made on first demand: the JSON object is
    encoded once, then framed once per (format, chunked) pair in use. One
    cache lives for one publish, so it needs no eviction.
    """

    __slots__ = ("event", "burst", "_line", "_frames")

    def __init__(self, event: Event, burst: bool = False) -> None:
        self.event = event
        # Part of a burst of events: streams may queue the frame for the
        # next reactor turn so that several events leave in one send.
        self.burst = burst
        self._line: Optional[bytes] = None
        self._frames: Dict[Tuple[StreamFormat, bool], bytes] = {}

    def get(self, fmt: StreamFormat, chunked: bool) -> bytes:
        key = (fmt, chunked)
        frame = self._frames.get(key)
        if frame is None:
            if self._line is None:
                self._line = encode_event(self.event)
            frame = fmt.frame(self.event, self._line)
            if chunked:
                frame = chunk(frame)
            self._frames[key] = frame
        return frame
