"""
Per-host protection: a cap on attempts in flight to one destination host,
and a circuit breaker that pauses a host after consecutive failures and
probes it again after a cool-down.

Together they keep one dead or slow endpoint from taking the dispatcher's
capacity away from every other host: its deliveries wait their turn (a
bounded number in memory) or are pushed back in storage, instead of each
one spending a full timeout.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional

from twisted.internet.interfaces import IReactorTime

# Verdicts of ``HostGate.admit``.
GO = "go"  # send now
WAIT = "wait"  # hold in memory; a slot frees soon
DEFER = "defer"  # push back in storage until ``retry_at``


class HostState:
    __slots__ = ("in_flight", "waiting", "failures", "paused_until", "probing")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting: Deque[Any] = deque()
        self.failures = 0
        self.paused_until: Optional[float] = None
        self.probing = False


class HostGate:
    """
    Decides, per destination host, whether an attempt may start now.

    A host is paused when ``threshold`` consecutive attempts failed (no
    response, a ``5xx`` or a ``429``); after ``cooldown`` seconds one probe
    is let through, and its success closes the breaker while its failure
    pauses the host again, for twice as long each time (at most 16x).
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int = 16,
        threshold: int = 5,
        cooldown: float = 60.0,
        max_waiting: Optional[int] = None,
    ) -> None:
        self.clock = clock
        self.limit = limit
        self.threshold = threshold
        self.cooldown = cooldown
        self.max_waiting = limit if max_waiting is None else max_waiting
        self._hosts: Dict[str, HostState] = {}
        self._trips: Dict[str, int] = {}

    def state(self, host: str) -> HostState:
        state = self._hosts.get(host)
        if state is None:
            state = self._hosts[host] = HostState()
        return state

    def paused_until(self, host: str) -> Optional[float]:
        state = self._hosts.get(host)
        return state.paused_until if state is not None else None

    def admit(self, host: str) -> str:
        """``GO`` (the caller must then call ``started``), ``WAIT`` or ``DEFER``."""
        state = self.state(host)
        if state.paused_until is not None:
            if self.clock.seconds() < state.paused_until or state.probing:
                return DEFER
            # Half-open: this one attempt probes whether the host is back.
            state.probing = True
            return GO
        if state.in_flight < self.limit:
            return GO
        if len(state.waiting) < self.max_waiting:
            return WAIT
        return DEFER

    def retry_at(self, host: str) -> float:
        """When a deferred delivery to ``host`` should be tried again."""
        state = self.state(host)
        now = self.clock.seconds()
        if state.paused_until is not None and state.paused_until > now:
            return state.paused_until
        return now + 1.0

    def started(self, host: str) -> None:
        self.state(host).in_flight += 1

    def finished(self, host: str, healthy: bool) -> None:
        """Record an attempt's end; ``healthy`` when the host answered sanely."""
        state = self.state(host)
        state.in_flight -= 1
        if healthy:
            state.failures = 0
            state.paused_until = None
            state.probing = False
            self._trips.pop(host, None)
        else:
            state.failures += 1
            if state.probing or state.failures >= self.threshold:
                trips = self._trips.get(host, 0)
                self._trips[host] = trips + 1
                state.paused_until = self.clock.seconds() + self.cooldown * min(2**trips, 16)
                state.probing = False
        self._forget_if_idle(host, state)

    def _forget_if_idle(self, host: str, state: HostState) -> None:
        # Nothing is kept for a healthy idle host, so memory follows the
        # hosts in use rather than every host ever seen.
        if state.in_flight == 0 and not state.waiting and state.paused_until is None and state.failures == 0:
            del self._hosts[host]

    def hold(self, host: str, item: Any) -> None:
        """Keep ``item`` until ``next_waiting`` hands it back (after ``WAIT``)."""
        self.state(host).waiting.append(item)

    def next_waiting(self, host: str) -> Optional[Any]:
        """A held delivery for ``host`` that may now start (the caller starts it)."""
        state = self._hosts.get(host)
        if state is None or not state.waiting or state.paused_until is not None:
            return None
        if state.in_flight >= self.limit:
            return None
        return state.waiting.popleft()

    def drain_waiting(self, host: Optional[str] = None) -> List[Any]:
        """
        Everything held for ``host`` (it was just paused), or for every host
        (the service is stopping): the caller defers it.
        """
        states = [self._hosts.get(host)] if host is not None else list(self._hosts.values())
        held: List[Any] = []
        for state in states:
            if state is not None:
                held.extend(state.waiting)
                state.waiting.clear()
        return held
