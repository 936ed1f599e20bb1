"""
When to try a delivery again: the schedule, its jitter and ``Retry-After``.

Pure functions of their inputs (the random source is a parameter), so the
whole retry policy is testable without a reactor.
"""

from __future__ import annotations

import email.utils
import random as _random
from typing import Callable, Optional, Sequence

import attr

from hookah.model import DELIVERED, FAILED, SCHEDULED, DeliveryStatus

# Spread retries by +-20% so that deliveries which failed together (an
# endpoint's outage) do not all come back at the same second.
JITTER = 0.2

# A Retry-After larger than this is treated as this: a target cannot park a
# delivery for weeks.
MAX_RETRY_AFTER = 86400.0


def backoff(
    schedule: Sequence[float],
    retry_number: int,
    rand: Callable[[], float] = _random.random,
    jitter: float = JITTER,
) -> float:
    """
    Seconds to wait before retry ``retry_number`` (0 for the first retry);
    past the end of the schedule its last step repeats, so ``_retries`` may
    ask for more retries than the schedule lists.
    """
    if not schedule:
        return 0.0
    base = schedule[min(retry_number, len(schedule) - 1)]
    return max(0.0, base * (1 + jitter * (2 * rand() - 1)))


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds from ``now`` a ``Retry-After`` value asks for (delta or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    # ASCII digits only: str.isdigit() also accepts "\xb2" (a latin-1
    # header byte), which float() then rejects.
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Decision:
    """What becomes of a delivery after an attempt."""

    status: DeliveryStatus
    next_attempt_at: Optional[float] = None
    reason: str = ""

    @property
    def final(self) -> bool:
        return self.status != SCHEDULED


# Frozen, so every success shares it (one per webhook otherwise).
_DELIVERED = Decision(DELIVERED, reason="delivered")


def decide(
    *,
    status_code: Optional[int],
    retry_after: Optional[str],
    attempts_made: int,
    retries: int,
    schedule: Sequence[float],
    now: float,
    rand: Callable[[], float] = _random.random,
) -> Decision:
    """
    Apply the delivery rules to one attempt's outcome.

    ``attempts_made`` counts the attempt just finished; ``retries`` is how
    many retries the delivery may have after its first attempt. A missing
    ``status_code`` means the attempt failed without a response (refused,
    timed out, reset).
    """
    if status_code is not None and 200 <= status_code < 300:
        return _DELIVERED
    if status_code == 410:
        return Decision(FAILED, reason="410 Gone: permanent failure")
    if attempts_made > retries:
        return Decision(FAILED, reason="retries exhausted")
    wait = backoff(schedule, attempts_made - 1, rand)
    if status_code in (429, 503):
        asked = parse_retry_after(retry_after, now)
        if asked is not None:
            wait = max(wait, asked)
    return Decision(SCHEDULED, next_attempt_at=now + wait, reason="retry")
