"""
Identifiers: ULIDs (time-ordered, 26 Crockford base32 characters).

Ordering by id is ordering by creation on one node, which is what
``after=<id>`` pagination and stream resume rely on; the random tail keeps
ids unguessable and unique across nodes.

Every accepted webhook takes one, so encoding is table-driven: ten bits
(two characters) per lookup, and the time part (the first ten characters)
is encoded once per millisecond.
"""

from __future__ import annotations

import os
from typing import Callable, List

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every pair of characters, indexed by the ten bits they encode.
_PAIRS: List[str] = [a + b for a in _ALPHABET for b in _ALPHABET]


def _encode(value: int) -> str:
    """``value`` (up to 130 bits) as 26 characters, most significant first."""
    return _time_part(value >> 80) + _random_part(value)


def _time_part(ms: int) -> str:
    """The first ten characters: ``ms`` (48 bits, two spare bits above)."""
    p = _PAIRS
    return p[ms >> 40 & 1023] + p[ms >> 30 & 1023] + p[ms >> 20 & 1023] + p[ms >> 10 & 1023] + p[ms & 1023]


def _random_part(value: int) -> str:
    """The last sixteen characters: the low 80 bits of ``value``."""
    p = _PAIRS
    return (
        p[value >> 70 & 1023] + p[value >> 60 & 1023] + p[value >> 50 & 1023] + p[value >> 40 & 1023]
        + p[value >> 30 & 1023] + p[value >> 20 & 1023] + p[value >> 10 & 1023] + p[value & 1023]
    )


class IdGenerator:
    """Monotonic ULIDs: within one millisecond the random part counts up."""

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self._last_ms = -1
        self._last_rand = 0
        self._prefix = ""

    def __call__(self) -> str:
        ms = int(self._seconds() * 1000)
        if ms <= self._last_ms:
            # Counting up from below 2**79 (the draw is shifted right by
            # one), it cannot reach 80 bits within one millisecond.
            rand = self._last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1
            self._last_ms = ms
            self._prefix = _time_part(ms)
        self._last_rand = rand
        return self._prefix + _random_part(rand)
