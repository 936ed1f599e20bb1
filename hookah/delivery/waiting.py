"""
Why a scheduled delivery is not being attempted yet, in words a person
inspecting it can act on (``GET /dispatch/<id>``, the status page).

A delivery waits for its own reason (a ``_delay``, its retry schedule or a
``Retry-After``) or for its host's: the host's breaker is open, or the host
has no free slot. Storage knows which (``Delivery.deferred``); the live
per-host gate adds when a paused host is probed next.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from hookah.delivery.hosts import HostGate
from hookah.model import SCHEDULED, Deferral, Delivery, TextEnum
from hookah.urls import host_key


class WaitReason(TextEnum):
    """The reasons, as ``waiting.reason`` says them."""

    DUE = "due"  # due now, waiting for a free slot or the next claim
    DELAY = "delay"  # the dispatch's own _delay, before its first attempt
    RETRY = "retry"  # its retry schedule (or a Retry-After) after a failed attempt
    HOST_PAUSED = Deferral.HOST_PAUSED.value  # its host's breaker is open
    HOST_BUSY = Deferral.HOST_BUSY.value  # its host has no free slot


DUE = WaitReason.DUE
DELAY = WaitReason.DELAY
RETRY = WaitReason.RETRY
HOST_PAUSED = WaitReason.HOST_PAUSED
HOST_BUSY = WaitReason.HOST_BUSY


def why_waiting(delivery: Delivery, now: float, hosts: HostGate) -> Optional[Dict[str, Any]]:
    """
    ``None`` unless the delivery is ``scheduled``; otherwise ``{"reason",
    "until"}`` (``until``: when it is tried next), with ``"host"`` for a
    host's reason, and for a paused host ``"probe_at"``: when the host's
    next probe goes (``None`` when its probe is in flight, or when this
    process has not paused it: the mark is from before a restart, or the
    pause has just ended).
    """
    if delivery.status != SCHEDULED:
        return None
    until = delivery.next_attempt_at
    if delivery.deferred is Deferral.HOST_PAUSED:
        host = host_key(delivery.url)
        paused_until = hosts.paused_until(host)
        probe_at = None
        if paused_until is not None and not hosts.probing(host):
            probe_at = max(paused_until, now)
        return {"reason": HOST_PAUSED, "host": host, "until": until, "probe_at": probe_at}
    if delivery.deferred is Deferral.HOST_BUSY:
        return {"reason": HOST_BUSY, "host": host_key(delivery.url), "until": until}
    if until is None or until <= now:
        return {"reason": DUE, "until": until}
    return {"reason": RETRY if delivery.current_attempts else DELAY, "until": until}


def describe(waiting: Optional[Dict[str, Any]]) -> str:
    """The reason as a few words, for people."""
    if waiting is None:
        return ""
    reason = waiting["reason"]
    if reason == HOST_PAUSED:
        return "host paused"
    if reason == HOST_BUSY:
        return "host busy"
    if reason == RETRY:
        return "retry schedule"
    if reason == DELAY:
        return "delayed"
    return "due"
