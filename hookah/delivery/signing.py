"""
Standard Webhooks signatures (https://www.standardwebhooks.com/) for
``/dispatch`` deliveries: ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature``.

Several secrets may be configured at once so that a secret can be rotated
without a window where receivers reject deliveries: each secret adds one
``v1,<signature>``, space-separated, and a receiver accepts any it knows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import List, Sequence, Tuple

PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """
    The HMAC key for a configured secret: ``whsec_<base64>`` is decoded as
    the spec defines; anything else is used as its UTF-8 bytes.
    """
    if secret.startswith(PREFIX):
        try:
            return base64.b64decode(secret[len(PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ signing secret must be base64 after the prefix")
    return secret.encode("utf-8")


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>`` per key."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
        for key in keys
    )


class Signer:
    """Adds the three Standard Webhooks headers to a delivery attempt."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.keys = [secret_key(s) for s in secrets]

    def headers(self, msg_id: str, now: float, body: bytes) -> List[Tuple[str, str]]:
        # The timestamp is the attempt's, not the delivery's: receivers
        # reject old timestamps to stop replays, and a retry a day later
        # must still verify.
        timestamp = int(now)
        return [
            ("webhook-id", msg_id),
            ("webhook-timestamp", str(timestamp)),
            ("webhook-signature", sign(self.keys, msg_id, timestamp, body)),
        ]
