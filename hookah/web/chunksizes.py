"""
How large a chunked request body says it is, as its bytes arrive.

A chunked body (RFC 9112 section 7.1) states its size one chunk at a time,
in each chunk's size line, before that chunk's data. ``HookahRequest``
counts the body bytes it is given and refuses the body (``413``) once they
pass ``--max-body``; a size line that alone declares more than that would
otherwise be refused only once that many bytes had come, and a client that
sends the line and then waits would get the body-rate deadline's ``408``.
``ChunkSizes`` follows the framing alongside Twisted's decoder (which still
decodes and delivers the body) and adds up the sizes declared so far, so
that ``HookahChannel`` refuses with ``413`` as soon as they pass the limit,
as it does for a ``Content-Length`` over it.

It only follows the framing; it judges nothing. A line it cannot read as a
chunk size, or one longer than Twisted's limit for it, ends its following:
Twisted's decoder refuses that body (``400``) as before. It stops at the
last chunk (size 0): what comes after (the trailer section, the next
pipelined request) is not its business.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["ChunkSizes", "MAX_SIZE_LINE"]

# Twisted's limit for a chunk-size line (twisted.web.http.maxChunkSizeLineLength).
MAX_SIZE_LINE = 1024

_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _size(line: bytes) -> Optional[int]:
    """The size a chunk-size line states (extensions after ``;`` ignored), or None if it is not one."""
    digits = line.split(b";", 1)[0]
    if not digits or digits.translate(None, _HEX_DIGITS):
        return None
    return int(digits, 16)


class ChunkSizes:
    """
    The framing of one chunked body, fed its bytes in order (``feed``):
    ``declared`` is the sum of the chunk sizes read so far; ``following``
    turns False at the last chunk, or at a line that is not a chunk size.
    """

    def __init__(self) -> None:
        self.declared = 0
        self.following = True
        # Bytes still to pass over: the current chunk's data and its CRLF.
        self._skip = 0
        # The start of a size line whose end has not arrived yet.
        self._line = b""

    def feed(self, data: bytes) -> int:
        """Follow ``data``, the body's next bytes; the sum of the sizes declared so far."""
        at = 0
        while self.following and at < len(data):
            if self._skip:
                step = min(self._skip, len(data) - at)
                self._skip -= step
                at += step
                continue
            if self._line:
                data, at, self._line = self._line + data[at:], 0, b""
            end = data.find(b"\r\n", at, at + MAX_SIZE_LINE + 2)
            if end < 0:
                rest = data[at:]
                if len(rest) > MAX_SIZE_LINE + 1:
                    self.following = False
                else:
                    self._line = rest
                break
            size = _size(data[at:end])
            at = end + 2
            if not size:
                self.following = False  # the last chunk, or not a size line
                break
            self.declared += size
            self._skip = size + 2
        return self.declared
