"""
How long a claim on a delivery lasts: the one rule every caller uses.

A claim (``claimed_until``) must outlast the attempt it covers, or another
claimer takes the delivery while it is still in flight and sends it again;
it must not last much longer, or the work of a process that died waits that
long (a single-node store releases claims at start-up; several nodes on one
store have only the lease). So a claim lasts the attempt's own timeout plus
``CLAIM_MARGIN``, the time left to record the outcome.
"""

from __future__ import annotations

from typing import Optional

# How long a claim lasts beyond an attempt's own timeout: a process killed
# mid-attempt leaves claims that expire this long after, and are retried.
CLAIM_MARGIN = 60.0


def lease_seconds(timeout: float) -> float:
    """How long a claim on an attempt with this timeout lasts."""
    return timeout + CLAIM_MARGIN


def lease_until(now: float, timeout: float) -> float:
    """The ``claimed_until`` of a claim taken at ``now`` for an attempt with this timeout."""
    return now + lease_seconds(timeout)


def covers(claimed_until: Optional[float], start: float, timeout: float) -> bool:
    """
    Whether a claim still covers an attempt that starts at ``start``: it
    outlasts the attempt's deadline by at least half the margin. A claim
    taken with a shorter timeout (a claim of several deliveries at once) or
    long before the attempt starts (one held for a free slot) does not, and
    is renewed before the attempt is sent.
    """
    return claimed_until is not None and claimed_until >= start + timeout + CLAIM_MARGIN / 2
