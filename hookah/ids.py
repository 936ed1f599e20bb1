"""
Identifiers: ULIDs (time-ordered, 26 Crockford base32 characters).

Ordering by id is ordering by creation on one node, which is what
``after=<id>`` pagination and stream resume rely on; the random tail keeps
ids unguessable and unique across nodes.
"""

from __future__ import annotations

import os
from typing import Callable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _encode(value: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class IdGenerator:
    """Monotonic ULIDs: within one millisecond the random part counts up."""

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self._last_ms = -1
        self._last_rand = 0

    def __call__(self) -> str:
        ms = int(self._seconds() * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            rand = self._last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1
        self._last_ms, self._last_rand = ms, rand
        return _encode((ms << 80) | (rand & ((1 << 80) - 1)))
