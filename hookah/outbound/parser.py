"""
An incremental HTTP/1.1 response parser over buffered bytes.

Twisted's client parser reads a response a line at a time through
``LineReceiver`` and a state machine of dispatchers, and hands the body to a
protocol through a chain of Deferreds: a quarter of the reactor thread per
webhook, for a response that is usually one packet of a status line, three
headers and two bytes. This parser takes whatever bytes arrive, splits the
head once it is complete, and keeps at most the caller's cap of the body.

It knows nothing of sockets or Twisted: ``feed`` bytes, then ``eof`` when the
connection ends; ``done`` says when a response is complete. Anything it cannot
read is a ``MalformedResponse`` (whose message names what was wrong), never a
hang: every buffer it keeps is bounded.

Framing (RFC 9112 6.3): no body for a ``HEAD`` request or a 1xx, 204 or 304
answer; interim 1xx responses (other than 101) are skipped; a
``Transfer-Encoding`` ending in ``chunked`` is chunked (extensions and
trailers read and dropped); else ``Content-Length``; else the body runs until
the connection closes. Only an HTTP/1.1 response framed by its length or its
chunks, without ``Connection: close``, leaves the connection reusable.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

__all__ = ["MAX_HEAD", "MalformedResponse", "ResponseParser"]

# The largest response head (status line, headers, or a chunked trailer)
# read: bytes past it without the head ending are a malformed response.
MAX_HEAD = 64 * 1024
# A chunk-size line (size and extensions).
_MAX_CHUNK_LINE = 4096

_STATUS = re.compile(r"HTTP/1\.([01]) ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?\Z")
# A header line: a token, a colon, a value without controls other than tab.
_FIELD = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\x00-\x08\x0a-\x1f\x7f]*)\Z")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")

# States.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)

Headers = Tuple[Tuple[str, str], ...]


class MalformedResponse(Exception):
    """What the peer sent is not an HTTP/1.x response this client reads; the message says why."""


class ResponseParser:
    """
    One response on a connection. ``feed`` raises ``MalformedResponse``;
    once ``done``, ``code``, ``headers``, ``body``, ``truncated`` and
    ``reusable`` describe it. ``started`` turns true with the first byte
    received, which is what decides whether a request may be retried.
    """

    __slots__ = (
        "_head_request", "_max_body", "_buffer", "_state", "_remaining", "_chunks", "_size",
        "started", "code", "headers", "truncated", "reusable", "_close",
    )

    def __init__(self, head_request: bool, max_body: int) -> None:
        self._head_request = head_request
        self._max_body = max_body
        self._buffer = b""
        self._state = _HEAD
        self._remaining = 0
        self._chunks: List[bytes] = []
        self._size = 0
        self._close = False
        self.started = False
        self.code = 0
        self.headers: Headers = ()
        self.truncated = False
        self.reusable = False

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def body(self) -> bytes:
        return b"".join(self._chunks)

    def feed(self, data: bytes) -> None:
        """Take bytes from the connection; bytes after a complete response make it unreusable."""
        if not data:
            return
        self.started = True
        if self._state == _DONE:
            self.reusable = False
            return
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        while buffer and self._state != _DONE:
            buffer = self._step(buffer)
        if self._state == _DONE and buffer:
            # Nothing was asked for after this response.
            self.reusable = False

    def eof(self) -> bool:
        """
        The connection ended: True if that completes the response (a body
        read until close), False if the response was cut short.
        """
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            return True
        return self._state == _DONE

    # -- the states -----------------------------------------------------------

    def _step(self, buffer: bytes) -> bytes:
        state = self._state
        if state == _LENGTH:
            return self._take_length(buffer)
        if state == _HEAD:
            return self._head(buffer)
        if state == _UNTIL_CLOSE:
            self._keep(buffer)
            return b""
        if state == _CHUNK_DATA:
            if len(buffer) < self._remaining:
                self._remaining -= len(buffer)
                self._keep(buffer)
                return b""
            self._keep(buffer[: self._remaining])
            rest = buffer[self._remaining :]
            self._remaining = 0
            if self._state != _DONE:
                self._state = _CHUNK_END
            return rest
        if state == _CHUNK_END:
            return self._chunk_end(buffer)
        if state == _CHUNK_SIZE:
            return self._chunk_size(buffer)
        if state == _TRAILER:
            return self._trailer(buffer)
        raise AssertionError(f"parser state {state}")

    def _head(self, buffer: bytes) -> bytes:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise MalformedResponse(f"response head larger than {MAX_HEAD // 1024} KiB")
            self._buffer = buffer
            return b""
        if end > MAX_HEAD:
            raise MalformedResponse(f"response head larger than {MAX_HEAD // 1024} KiB")
        # Latin-1 maps every byte to one character: the head is read as text once.
        lines = buffer[:end].decode("latin-1").split("\r\n")
        rest = buffer[end + 4 :]
        status = _STATUS.match(lines[0])
        if status is None:
            raise MalformedResponse(f"bad status line {_show(lines[0])}")
        minor, code = status.group(1), int(status.group(2))
        if code < 100:
            raise MalformedResponse(f"bad status code {code}")
        headers = _headers(lines)
        if 100 <= code < 200:
            if code == 101:
                raise MalformedResponse("101 Switching Protocols, which was not asked for")
            return rest  # interim: the final response follows
        self.code = code
        self.headers = headers
        keep = minor == "1"
        chunked = False
        length: Optional[int] = None
        transfer_encoding = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = _content_length(value, length)
            elif lowered == "transfer-encoding":
                transfer_encoding = True
                codings = [c.strip().lower() for c in value.split(",")]
                chunked = codings[-1] == "chunked"
            elif lowered == "connection":
                if "close" in [t.strip().lower() for t in value.split(",")]:
                    keep = False
        self._close = not keep
        if self._head_request or code in (204, 304):
            self._finish(reusable=True)
        elif transfer_encoding:
            # Transfer-Encoding overrides Content-Length; a message with both
            # may be a smuggling attempt: never reuse its connection.
            if length is not None:
                self._close = True
            if chunked:
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                self._close = True
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH
            if length == 0:
                self._finish(reusable=True)
            elif length > self._max_body:
                # Known now: the cap ends the body early.
                self._remaining = self._max_body
                self.truncated = True
                if not self._max_body:
                    self._finish(reusable=False)
        else:
            self._state = _UNTIL_CLOSE
            self._close = True
        return rest

    def _take_length(self, buffer: bytes) -> bytes:
        remaining = self._remaining
        if len(buffer) < remaining:
            self._chunks.append(buffer)
            self._remaining = remaining - len(buffer)
            return b""
        self._chunks.append(buffer[:remaining] if len(buffer) > remaining else buffer)
        self._remaining = 0
        self._finish(reusable=not self.truncated)
        return buffer[remaining:]

    def _chunk_size(self, buffer: bytes) -> bytes:
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > _MAX_CHUNK_LINE:
                raise MalformedResponse("chunk-size line too long")
            self._buffer = buffer
            return b""
        line = buffer[:end]
        size_text = line.split(b";", 1)[0].strip(b" \t")
        if not _HEX.match(size_text):
            raise MalformedResponse(f"bad chunk size {_show(line)}")
        size = int(size_text, 16)
        if size == 0:
            self._state = _TRAILER
        else:
            self._remaining = size
            self._state = _CHUNK_DATA
        return buffer[end + 2 :]

    def _chunk_end(self, buffer: bytes) -> bytes:
        if len(buffer) < 2:
            if buffer != b"\r"[: len(buffer)]:
                raise MalformedResponse("chunk not followed by CRLF")
            self._buffer = buffer
            return b""
        if buffer[:2] != b"\r\n":
            raise MalformedResponse("chunk not followed by CRLF")
        self._state = _CHUNK_SIZE
        return buffer[2:]

    def _trailer(self, buffer: bytes) -> bytes:
        if buffer[:2] == b"\r\n":
            self._finish(reusable=True)
            return buffer[2:]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise MalformedResponse(f"chunked trailer larger than {MAX_HEAD // 1024} KiB")
            self._buffer = buffer
            return b""
        # Trailer fields are checked like headers, then dropped: nothing
        # Hookah reports reads them.
        _headers([""] + buffer[:end].decode("latin-1").split("\r\n"))
        self._finish(reusable=True)
        return buffer[end + 4 :]

    # -- helpers --------------------------------------------------------------

    def _keep(self, data: bytes) -> None:
        """Body bytes of a chunk or of a body read until close, within the cap."""
        room = self._max_body - self._size
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        if data:
            self._chunks.append(data)
            self._size += len(data)
        if self.truncated:
            self._finish(reusable=False)

    def _finish(self, reusable: bool) -> None:
        self._state = _DONE
        self.reusable = reusable and not self._close


def _headers(lines: List[str]) -> Headers:
    """The header fields of a head's lines (the first, the status line, skipped)."""
    headers = []
    match = _FIELD.match
    for line in lines[1:]:
        field = match(line)
        if field is None:
            raise MalformedResponse(_why(line))
        headers.append((field.group(1), field.group(2).strip(" \t")))
    return tuple(headers)


def _why(line: str) -> str:
    """What is wrong with a header line ``_FIELD`` refused."""
    if line[:1] in (" ", "\t"):
        return "obsolete line folding in a header"
    name, colon, _ = line.partition(":")
    if not colon or not name:
        return f"bad header line {_show(line)}"
    if not _TOKEN.match(name):
        return f"bad header name {_show(name)}"
    return f"control character in header {_show(name)}"


def _content_length(value: str, previous: Optional[int]) -> int:
    """One Content-Length (a list of equal values is one); differing or non-numeric ones are malformed."""
    lengths = {v.strip(" \t") for v in value.split(",")}
    if len(lengths) != 1:
        raise MalformedResponse("conflicting Content-Length values")
    text = lengths.pop()
    if not _DIGITS.match(text) or len(text) > 18:
        raise MalformedResponse(f"bad Content-Length {_show(text)}")
    length = int(text)
    if previous is not None and previous != length:
        raise MalformedResponse("conflicting Content-Length values")
    return length


def _show(data: bytes | str) -> str:
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    return repr(text[:60]) + ("..." if len(text) > 60 else "")
