"""
A request head read in one go: when a whole, plain request head arrives in
one piece at the start of a request, ``HookahChannel`` hands it here rather
than to twisted.web's line-by-line parser. This is the one module in
hookah.web that reads and sets Twisted's private parser state; everything
else uses public API (``hookah.fastwrite`` is its counterpart for writes).

Why it exists: ``HTTPChannel`` takes a head one line at a time, each line a
trip through ``LineReceiver.dataReceived``, ``HookahChannel.lineReceived``,
``HTTPChannel.lineReceived`` and ``headerReceived``: about a tenth of the
server's CPU per ``POST /dispatch``. Here the head is split once, checked
once, and the request is built with the same calls Twisted makes
(``requestFactory``, ``Headers.addRawHeader``, ``_maybeChooseTransferDecoder``,
``allHeadersReceived``, ``allContentReceived`` or ``setRawMode``).

Only what Twisted would accept without a word takes this path: a request
line of a token method, a target of printable characters and HTTP/1.0 or
1.1; header lines that are ``token: value`` (no folding, no NUL, CR or LF);
at most one of ``Content-Length`` (digits) and ``Transfer-Encoding``
(``chunked`` or ``identity``); every line ending in CRLF; the head within
``MAX_HEAD`` and Twisted's own limits. Anything else (every malformed,
oversized or unusual head) goes through Twisted's parser, which answers it
as before, so refusals never come from here.

What it relies on, none of it public:

- ``LineReceiver``: ``_buffer`` (bytes not yet parsed), ``_busyReceiving``,
  ``line_mode``, ``paused``, ``delimiter``;
- ``HTTPChannel``: ``_HTTPChannel__first_line`` (1 between requests) and
  ``_HTTPChannel__header`` (a header line held for folding), ``_command``,
  ``_path``, ``_version``, ``_receivedHeaderCount``,
  ``_receivedHeaderSize``, ``_transferDecoder``, ``_handlingRequest``,
  ``_maybeChooseTransferDecoder`` and ``length``.

A Twisted release may change any of that, so the first channel of each
class is checked (``FastHead.check``): the attributes and their kinds, and
that ``HTTPChannel.lineReceived`` and ``LineReceiver.dataReceived`` still
use the names above. If anything is off, the fast path turns itself off for
the life of the process with one log line, and every head goes through
Twisted's parser.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Set, Tuple

import twisted
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.web.http import HTTPChannel
from twisted.web.iweb import INonQueuedRequestFactory

__all__ = ["FastHead", "fast_head"]

log = Logger()

# RFC 9110 token (a method, a header name), as Twisted's _istoken checks it.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What _parseRequestLine refuses in a request target (c <= 32 or c > 176).
_BAD_TARGET = re.compile(rb"[\x00-\x20\xb1-\xff]")

# The private state read or set, and the kind each must be.
_EXPECTED = (
    ("_buffer", bytes),
    ("_busyReceiving", int),
    ("line_mode", int),
    ("paused", int),
    ("delimiter", bytes),
    ("_HTTPChannel__first_line", int),
    ("_HTTPChannel__header", bytes),
    ("_receivedHeaderCount", int),
    ("_receivedHeaderSize", int),
    ("_handlingRequest", int),
    ("length", int),
    ("maxHeaders", int),
    ("totalHeadersSize", int),
    ("MAX_LENGTH", int),
    ("requests", list),
)
# Names the line-by-line code must still use for this module to stand in for it.
_USED_BY_LINE_RECEIVED = {
    "_HTTPChannel__first_line", "_HTTPChannel__header", "_command", "_path", "_version", "requestFactory",
    "headerReceived", "allHeadersReceived", "allContentReceived", "setRawMode", "length", "persistent",
    "_receivedHeaderSize",
}
_USED_BY_HEADER_RECEIVED = {"_maybeChooseTransferDecoder", "requests", "_receivedHeaderCount", "maxHeaders"}
_USED_BY_DATA_RECEIVED = {"_busyReceiving", "_buffer", "line_mode", "paused", "lineReceived", "rawDataReceived"}


def _parse(head: bytes, max_headers: int) -> Optional[Tuple[bytes, bytes, bytes, List[Tuple[bytes, bytes]], Optional[bytes]]]:
    """
    The method, target, version, headers and the framing header (its
    canonical name, or None) of a plain head (module docstring); None for
    any other.
    """
    lines = head.split(b"\r\n")
    if b"\n" in head and head.count(b"\n") != len(lines) - 1 or b"\r" in head and head.count(b"\r") != len(lines) - 1:
        return None  # a bare LF or CR
    if b"\x00" in head or len(lines) - 1 > max_headers:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if (
        (version != b"HTTP/1.1" and version != b"HTTP/1.0")
        or not target
        or _TOKEN.fullmatch(method) is None
        or _BAD_TARGET.search(target) is not None
    ):
        return None
    headers = []
    framing: Optional[bytes] = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            return None  # folded, empty or malformed: Twisted's to judge
        value = value.strip(b" \t")
        lowered = name.lower()
        if lowered == b"content-length" or lowered == b"transfer-encoding":
            if framing is not None:
                return None
            if lowered == b"content-length":
                if not value.isdigit():
                    return None
                framing = b"Content-Length"
            else:
                kind = value.lower()
                if kind != b"chunked" and kind != b"identity":
                    return None
                framing = b"Transfer-Encoding"
        headers.append((name, value))
    return method, target, version, headers, framing


class FastHead:
    """Reads whole plain heads for ``HookahChannel`` while it is on (module docstring)."""

    def __init__(self) -> None:
        self.enabled = True
        # Heads read here rather than line by line.
        self.heads = 0
        self._checked: Set[type] = set()
        # Whether a request factory takes the queue position (Twisted's
        # INonQueuedRequestFactory test, made once per factory).
        self._queued: Dict[Any, bool] = {}

    def disable(self, reason: str) -> None:
        """Turn the fast path off for the life of the process."""
        if self.enabled:
            self.enabled = False
            log.warn(
                "request head fast path off ({reason}, Twisted {version}): heads are read line by line",
                reason=reason, version=twisted.__version__,
            )

    def check(self, channel: Any) -> Optional[str]:
        """What about ``channel``'s class is not as this module expects, or None."""
        if not isinstance(channel, HTTPChannel) or not isinstance(channel, LineReceiver):
            return f"{type(channel).__name__} is not an HTTPChannel"
        for name, kind in _EXPECTED:
            if not hasattr(channel, name):
                return f"{type(channel).__name__} has no {name}"
            if not isinstance(getattr(channel, name), kind):
                return f"{type(channel).__name__}.{name} is a {type(getattr(channel, name)).__name__}, not {kind.__name__}"
        if not hasattr(channel, "_transferDecoder"):
            return f"{type(channel).__name__} has no _transferDecoder"
        if channel.delimiter != b"\r\n":
            return "the line delimiter is not CRLF"
        for method, names in (
            (HTTPChannel.lineReceived, _USED_BY_LINE_RECEIVED),
            (HTTPChannel.headerReceived, _USED_BY_HEADER_RECEIVED),
            (LineReceiver.dataReceived, _USED_BY_DATA_RECEIVED),
        ):
            missing = names - set(method.__code__.co_names)
            if missing:
                return f"{method.__qualname__} no longer uses {', '.join(sorted(missing))}"
        if not callable(getattr(channel, "_maybeChooseTransferDecoder", None)):
            return "HTTPChannel has no _maybeChooseTransferDecoder"
        return None

    def read(self, channel: Any, data: bytes, max_head: int) -> bool:
        """
        Take ``data``, the first bytes of a request head, if it holds the
        whole head, within ``max_head`` bytes, and the head is plain: build the request as Twisted
        would, then go on with the rest of ``data`` as Twisted would. False,
        and nothing done, when Twisted's parser should have it.
        """
        if not self.enabled:
            return False
        if type(channel) not in self._checked:
            self._checked.add(type(channel))
            problem = self.check(channel)
            if problem is not None:
                self.disable(problem)
                return False
        end = data.find(b"\r\n\r\n")
        if (
            end <= 0
            or end + 4 > max_head
            or end + 4 > channel.MAX_LENGTH
            or end > channel.totalHeadersSize
            or channel._buffer
            or channel._busyReceiving
            or not channel.line_mode
            or channel.paused
            or not channel.persistent
            or channel._handlingRequest
            or channel._HTTPChannel__first_line != 1
            or channel._HTTPChannel__header
            or channel._transferDecoder is not None
        ):
            return False
        parsed = _parse(data[:end], channel.maxHeaders)
        if parsed is None:
            return False
        method, target, version, headers, framing = parsed
        self.heads += 1
        channel.resetTimeout()  # as HTTPChannel.dataReceived does for every read
        # The rest is Twisted's, in LineReceiver's buffer, as if the head's
        # lines had been taken from it one by one (and data arriving while
        # this request is handled goes after it).
        channel._buffer = data[end + 4:]
        channel._busyReceiving = True
        try:
            channel._receivedHeaderSize = end - 2 * len(headers)  # the lines without their CRLFs
            factory = channel.requestFactory
            queued = self._queued.get(factory)
            if queued is None:
                queued = self._queued[factory] = not INonQueuedRequestFactory.providedBy(factory)
            if not queued:
                request = factory(channel)
            else:
                request = factory(channel, len(channel.requests))
            channel.requests.append(request)
            channel._HTTPChannel__first_line = 0
            channel._command, channel._path, channel._version = method, target, version
            add = request.requestHeaders.addRawHeader
            for name, value in headers:
                if framing is not None and len(name) == len(framing) and name.lower() == framing.lower():
                    if not channel._maybeChooseTransferDecoder(framing, value):
                        return True
                add(name, value)
            channel._receivedHeaderCount = len(headers)
            channel.allHeadersReceived()
            if channel.length == 0:
                channel.allContentReceived()
            else:
                channel.setRawMode()
        finally:
            channel._busyReceiving = False
        transport = channel.transport
        if channel._buffer and not (transport is not None and transport.disconnecting):
            LineReceiver.dataReceived(channel, b"")
        return True


# The one HookahChannel uses.
fast_head = FastHead()
