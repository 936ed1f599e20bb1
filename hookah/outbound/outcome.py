"""
What an outgoing request ends with: a ``Response``, or one of the failures
below, and the short sentence an attempt's ``error`` field shows for it.
"""

from __future__ import annotations

import socket
from typing import Optional, Tuple

import attr
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from hookah.outbound.parser import MalformedResponse

__all__ = ["MalformedResponse", "NoResponse", "Response", "ResponseBroken", "TimedOut", "describe_failure"]


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Response:
    """What a target answered, with at most the client's cap of its body."""

    code: int
    headers: Tuple[Tuple[str, str], ...]
    body: bytes
    truncated: bool = False

    def header(self, name: str) -> Optional[str]:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class TimedOut(Exception):
    """The request, body included, did not finish within its timeout."""


class NoResponse(Exception):
    """The connection closed or failed before the first byte of a response; ``reason`` says how."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(f"connection closed before a response: {reason.getErrorMessage()}")
        self.reason = reason


class ResponseBroken(Exception):
    """The connection was lost after a response had begun and before it ended."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(f"connection lost while reading the response: {reason.getErrorMessage()}")
        self.reason = reason


def _is_tls_failure(failure: Failure) -> bool:
    """A certificate or handshake failure (pyOpenSSL or service_identity)."""
    module = getattr(failure.type, "__module__", "") or ""
    return module.startswith(("OpenSSL", "service_identity"))


def describe_failure(failure: Failure, timeout: float) -> str:
    """One short sentence for an attempt's ``error`` field."""
    if failure.check(TimedOut, CancelledError, neterror.TimeoutError):
        return f"timed out after {timeout:g}s"
    if failure.check(neterror.ConnectionRefusedError):
        return "connection refused"
    if failure.check(neterror.DNSLookupError, socket.gaierror):
        return "DNS lookup failed"
    if failure.check(NoResponse):
        reason = failure.value.reason  # type: ignore[union-attr]
        if _is_tls_failure(reason):
            return f"TLS failed: {str(reason.value)[:250]}"
        return "connection closed before a response"
    if failure.check(ResponseBroken):
        reason = failure.value.reason  # type: ignore[union-attr]
        if _is_tls_failure(reason):
            return f"TLS failed: {str(reason.value)[:250]}"
        return "connection lost while reading the response"
    if failure.check(MalformedResponse):
        return f"malformed response: {str(failure.value)[:280]}"
    message = str(failure.value) or getattr(failure.type, "__name__", "error")
    return message[:300]
