"""
Reading a ``/stream`` response off raw socket bytes, for tests that hold
many streams and cannot afford a full HTTP client for each: the status and
headers, the body with chunked framing removed, and an event's payload
bytes back from its JSON object. These are the tests' oracles; the server
never needs them, so they are not part of the package.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, Optional

from hookah.streams.parse import StreamParseError


def body_of(obj: Dict[str, Any]) -> bytes:
    """
    The payload bytes of an event object: base64 decoded, text as UTF-8, a
    JSON value re-serialised compactly (same value, not the same spacing).
    """
    data = obj.get("data")
    if obj.get("encoding") == "base64":
        return base64.b64decode(data or "")
    if isinstance(data, str) and not _is_json(obj.get("content_type")):
        return data.encode("utf-8")
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _is_json(content_type: Optional[str]) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class ChunkedDecoder:
    """HTTP/1.1 ``Transfer-Encoding: chunked``: chunk payloads out, framing dropped."""

    def __init__(self) -> None:
        self._buffer = b""
        self._need: Optional[int] = None  # bytes left in the current chunk
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while not self.done:
            if self._need is None:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    break
                size = self._buffer[:end].split(b";", 1)[0].strip()
                try:
                    self._need = int(size, 16)
                except ValueError:
                    raise StreamParseError(f"bad chunk size {size[:20]!r}")
                self._buffer = self._buffer[end + 2 :]
                if self._need == 0:
                    self.done = True
                    break
            if len(self._buffer) < self._need + 2:
                break
            out.append(self._buffer[: self._need])
            self._buffer = self._buffer[self._need + 2 :]
            self._need = None
        return b"".join(out)


class ResponseReader:
    """
    A raw HTTP/1.x response read off a socket: the status and headers, then
    the body with chunked framing removed. Meant for clients that hold many
    streams and cannot afford a full HTTP client per stream.
    """

    def __init__(self) -> None:
        self._head = b""
        self.status: Optional[int] = None
        self.headers: Dict[str, str] = {}
        self._chunked: Optional[ChunkedDecoder] = None

    @property
    def done(self) -> bool:
        return self._chunked is not None and self._chunked.done

    def feed(self, data: bytes) -> bytes:
        """Body bytes contained in ``data`` (none until the head is complete)."""
        if self.status is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return b""
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split(" ", 2)[1])
            for line in header_lines:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                self._chunked = ChunkedDecoder()
        if self._chunked is not None:
            return self._chunked.feed(data)
        return data
