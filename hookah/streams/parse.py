"""
The reading side of ``/stream``: an incremental parser for each format,
fed a response body as it arrives, in whatever pieces the network cuts it
into. Each ``feed`` returns the messages completed so far and keeps the
unfinished rest for the next call.

``hookah tail`` (``hookah.cli.client.follow``) reads streams with them, and
the tests feed every encoding of ``hookah.streams.format`` through them, so
the writing and the reading side of each format are held to each other.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

import attr

__all__ = [
    "JsonLinesParser",
    "LengthDelimitedParser",
    "SSEMessage",
    "SSEParser",
    "StreamParseError",
    "parser_for",
]


class StreamParseError(ValueError):
    """The bytes do not follow the format: the stream cannot be trusted past here."""


class JsonLinesParser:
    """``\\r\\n``-terminated JSON objects; blank lines are keep-alives."""

    def __init__(self) -> None:
        self._buffer = b""
        self.keepalives = 0

    def feed(self, data: bytes) -> List[Any]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\r\n")
        messages = []
        for line in lines:
            if line:
                messages.append(json.loads(line))
            else:
                self.keepalives += 1
        return messages


class LengthDelimitedParser:
    """
    ``<length>\\r\\n<message>``, the length counting the message's bytes
    (its own ``\\r\\n`` included); a line with no digits is a keep-alive.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._need: Optional[int] = None
        self.keepalives = 0

    def feed(self, data: bytes) -> List[Any]:
        self._buffer += data
        messages: List[Any] = []
        while True:
            if self._need is None:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return messages
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                if not line.strip():
                    self.keepalives += 1
                    continue
                if not line.isdigit():
                    raise StreamParseError(f"expected a length, got {line[:40]!r}")
                self._need = int(line)
            if len(self._buffer) < self._need:
                return messages
            message, self._buffer = self._buffer[: self._need], self._buffer[self._need :]
            self._need = None
            messages.append(json.loads(message))


@attr.s(auto_attribs=True, frozen=True)
class SSEMessage:
    data: str
    event: str = "message"
    id: Optional[str] = None
    retry: Optional[int] = None

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """
    The event-stream interpretation of the HTML standard: lines end with
    CRLF, LF or CR; ``:`` starts a comment; a blank line dispatches the
    message if it has data; ``id`` persists across messages.
    """

    def __init__(self) -> None:
        self._text = ""
        self._decoder = _Utf8Decoder()
        self._data: List[str] = []
        self._event = ""
        self._retry: Optional[int] = None
        self.last_event_id: Optional[str] = None
        self.retry: Optional[int] = None
        self.comments = 0
        self._started = False

    def feed(self, data: bytes) -> List[SSEMessage]:
        self._text += self._decoder.decode(data)
        if not self._started and self._text:
            self._started = True
            if self._text.startswith("\ufeff"):
                self._text = self._text[1:]
        messages: List[SSEMessage] = []
        while True:
            cut = _line_end(self._text)
            if cut is None:
                return messages
            end, after = cut
            line, self._text = self._text[:end], self._text[after:]
            message = self._line(line)
            if message is not None:
                messages.append(message)

    def _line(self, line: str) -> Optional[SSEMessage]:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self.last_event_id = value
        elif field == "retry" and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> Optional[SSEMessage]:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEMessage("\n".join(data), event or "message", self.last_event_id, self.retry)


def _line_end(text: str) -> Optional[Tuple[int, int]]:
    """(end of line, start of next) for the first complete line, or None."""
    cr, lf = text.find("\r"), text.find("\n")
    if cr < 0 and lf < 0:
        return None
    if cr < 0 or (0 <= lf < cr):
        return lf, lf + 1
    if cr + 1 == len(text):
        return None  # a CR at the end may be the first half of a CRLF
    return cr, cr + (2 if text[cr + 1] == "\n" else 1)


class _Utf8Decoder:
    """Incremental UTF-8 (a character may be split across reads)."""

    def __init__(self) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def decode(self, data: bytes) -> str:
        return self._decoder.decode(data)


def parser_for(format_name: str) -> Any:
    """A fresh parser for ``json``, ``length`` or ``sse``."""
    return {"json": JsonLinesParser, "length": LengthDelimitedParser, "sse": SSEParser}[format_name]()
