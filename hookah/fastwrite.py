"""
The fast write path: bytes go straight to the socket when Twisted has
nothing queued for that connection. This is the one module in Hookah that
reads Twisted's private transport state; everything else uses public API.
Streams write their frames through it, and any other writer on a plain TCP
connection may ask it for a write function the same way.

Why it exists: ``FileDescriptor.write`` queues the bytes, registers the
socket for writability and sends on the next reactor turn. For a thousand
open streams that is a thousand selector registrations per event, most of
the cost of a fan-out; sending at once when the kernel takes the bytes
halves the CPU a fan-out costs. Whatever the kernel does not take (and any
doubt: closing, TLS) goes through ``transport.write``, so ordering,
back-pressure and error handling stay Twisted's.

What it relies on, all of ``twisted.internet.abstract.FileDescriptor`` /
``twisted.internet.tcp.Connection``, none of it public:

- ``_tempDataBuffer`` (a list) and ``dataBuffer``/``offset`` (bytes, int):
  nothing is queued when the list is empty and ``offset`` has reached the
  end of ``dataBuffer``;
- ``socket``, the connected socket, sent to with ``send``;
- ``TLS``: set once ``startTLS`` made the connection TLS;
- ``connected``, ``disconnecting``;
- and that ``write`` is ``FileDescriptor.write`` (behind ``_newtls``'s
  switch to TLS), whose buffers those are.

A write side already shut (``loseWriteConnection``) needs no check of its
own: ``send`` on it fails (``EPIPE``) and the bytes go to
``transport.write``, which drops them as it always has.

A Twisted release may change any of that, so the first transport of each
class a stream offers is checked for each of them (``FastPath.writer``); if
one is missing or of another kind, the fast path turns itself off for the
life of the process with one log line, and every stream writes with
``transport.write``.
A transport of another kind than plain TCP (TLS, HTTP/2, a test's
``StringTransport``) is written to with its own ``write``; one log line per
kind says so.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Set

import twisted
from twisted.internet import abstract, tcp
from twisted.logger import Logger

__all__ = ["FastPath", "fast_path"]

log = Logger()

Write = Callable[[bytes], Any]

# The private state the fast path reads, and the kind each must be.
_EXPECTED = (
    ("_tempDataBuffer", list),
    ("dataBuffer", bytes),
    ("offset", int),
    ("TLS", int),  # bool, or Twisted's older 0/1
    ("connected", int),
    ("disconnecting", int),
)


class FastPath:
    """
    Hands each stream its write function: the direct one for a plain TCP
    transport while the fast path is on, else ``transport.write``.
    """

    def __init__(self, counting: bool = False) -> None:
        self.enabled = True
        # Frames (or parts of frames) the kernel took straight away, counted
        # by the writers made while ``counting`` is on (tests, diagnostics):
        # an int that grows by one per send is itself a measurable share of
        # a fan-out's CPU, so it is not counted otherwise.
        self.counting = counting
        self.sends = 0
        self._checked: Set[type] = set()
        self._reported: Set[str] = set()

    def writer(self, transport: Any) -> Write:
        """The function a stream writes ``transport``'s bytes with."""
        plain: Write = transport.write
        if not self.enabled:
            return plain
        kind = type(transport).__name__
        if not isinstance(transport, tcp.Connection):
            self._once(kind, "fast write path not used on {kind} transports: writes go through transport.write", kind=kind)
            return plain
        if type(transport) not in self._checked:
            self._checked.add(type(transport))
            problem = self._self_check(transport)
            if problem is not None:
                self.disable(problem)
                return plain
        if transport.TLS:
            self._once("TLS", "fast write path not used on TLS connections: writes go through transport.write")
            return plain
        return self._direct(transport)

    def disable(self, reason: str) -> None:
        """Turn the fast path off for every stream opened from now on."""
        if self.enabled:
            self.enabled = False
            log.warn(
                "fast write path off ({reason}, Twisted {version}): writes go through transport.write",
                reason=reason,
                version=twisted.__version__,
            )

    def _self_check(self, transport: Any) -> Optional[str]:
        """What about ``transport`` is not as this module expects, or None."""
        for klass in type(transport).__mro__:
            if klass is abstract.FileDescriptor:
                break
            # _newtls's write only routes to TLS once startTLS set TLS.
            if "write" in vars(klass) and klass.__module__ != "twisted.internet._newtls":
                return f"{klass.__name__}.write stands in front of FileDescriptor.write"
        else:
            return f"{type(transport).__name__} is not a FileDescriptor"
        for name, kind in _EXPECTED:
            if not hasattr(transport, name):
                return f"{type(transport).__name__} has no {name}"
            if not isinstance(getattr(transport, name), kind):
                return f"{type(transport).__name__}.{name} is a {type(getattr(transport, name)).__name__}, not {kind.__name__}"
        if not callable(getattr(getattr(transport, "socket", None), "send", None)):
            return f"{type(transport).__name__} has no socket to send to"
        return None

    def _direct(self, transport: Any) -> Write:
        return (_CountingWrite if self.counting else _DirectWrite)(transport, self).write

    def _once(self, key: str, message: str, **fields: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.info(message, **fields)


class _DirectWrite:
    """
    One transport's direct write. It is handed out as a bound method, so
    every stream's call site calls the one function ``write`` and CPython
    specializes the call; a closure per transport would be a new function
    object each time, and a call site that meets a thousand of them falls
    back to the generic call. Every check reads an attribute Twisted keeps
    on the instance or its class; each class attribute (``TLS``,
    ``disconnecting`` until set) is a full lookup on CPython 3.11, so there
    are no more of them than ordering and closing need.
    """

    __slots__ = ("transport", "plain", "path")

    def __init__(self, transport: Any, path: FastPath) -> None:
        self.transport = transport
        self.plain: Write = transport.write
        self.path = path

    def write(self, data: bytes) -> int:
        """Send ``data``, straight to the socket when nothing is ahead of it; the bytes the kernel took at once."""
        transport = self.transport
        if (
            transport._tempDataBuffer
            or transport.offset != len(transport.dataBuffer)
            or transport.TLS
            or transport.disconnecting
            or not transport.connected
        ):
            self.plain(data)
            return 0
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # would block, or the connection is failing: Twisted's path will tell
        if sent < len(data):
            self.plain(data[sent:] if sent else data)
        return sent


class _CountingWrite(_DirectWrite):
    """
    ``_DirectWrite`` that also counts its direct sends in ``FastPath.sends``
    (tests, diagnostics). It calls ``_DirectWrite.write`` for the bytes the
    kernel took rather than keeping a copy of it: the extra call is paid only
    while counting, and the production ``write`` stays one function.
    """

    __slots__ = ()

    def write(self, data: bytes) -> int:
        sent = _DirectWrite.write(self, data)
        if sent:
            self.path.sends += 1
        return sent


# The one the streams use.
fast_path = FastPath()
