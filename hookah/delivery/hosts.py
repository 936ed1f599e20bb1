"""
Per-host protection: a cap on attempts in flight to one destination host,
and a circuit breaker that pauses a host after consecutive failures and
probes it again after a cool-down.

Together they keep one dead or slow endpoint from taking the dispatcher's
capacity away from every other host: its deliveries wait their turn (a
bounded number in memory) or are pushed back in storage, spread over the
time the host needs to work through them, so each one is pushed back about
once instead of being claimed and returned over and over.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Deque, List, Optional

from twisted.internet.interfaces import IReactorTime

# Verdicts of ``HostGate.admit``.
GO = "go"  # send now
WAIT = "wait"  # hold in memory; a slot frees soon
DEFER = "defer"  # push back in storage until ``retry_at``

# Longest a delivery is pushed back because its host is busy (not paused).
MAX_BUSY_DEFER = 300.0
# Attempt duration assumed for a host not yet measured, in seconds: a fast
# answer. The first burst to a new host is spread at this pace before any
# answer is in, so a guess too high holds a fast host's first burst back for
# the guess (at 50 ms, the first of 200 notifications to one new host took
# ~0.4 s instead of ~40 ms); a guess too low only brings a delivery back
# early, to be deferred again at the pace the host has shown by then (a host
# whose attempts are out unanswered counts as slow as the oldest of them).
INITIAL_DURATION = 0.002


class HostState:
    __slots__ = (
        "in_flight", "waiting", "failures", "paused_until", "probing", "trips", "avg_duration", "cursor", "progress_at",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting: Deque[Any] = deque()
        self.failures = 0
        self.paused_until: Optional[float] = None
        self.probing = False
        self.trips = 0
        self.avg_duration = INITIAL_DURATION
        # The latest time a busy-host deferral was given: the next one goes
        # after it, so a backlog is spread at the host's own pace.
        self.cursor = 0.0
        # When an attempt to this host last finished (or the first started):
        # a host whose attempts run long without finishing is slower than
        # its average says.
        self.progress_at = 0.0

    def idle(self, now: float) -> bool:
        paused = self.paused_until is not None and self.paused_until > now
        return self.in_flight == 0 and not self.waiting and not paused


class HostGate:
    """
    Decides, per destination host, whether an attempt may start now.

    A host is paused when ``threshold`` consecutive attempts failed (no
    response, a ``5xx`` or a ``429``); after ``cooldown`` seconds one probe
    is let through, and its success closes the breaker while its failure
    pauses the host again, for twice as long each time (at most 16x).
    Failures of attempts that were already in flight when the host was
    paused do not lengthen the pause.

    State is kept for at most ``max_hosts`` hosts (least recently used idle
    ones are forgotten first), so memory follows the hosts in use, not every
    host ever seen, while a host's measured pace outlives a quiet moment.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int = 16,
        threshold: int = 5,
        cooldown: float = 60.0,
        max_waiting: Optional[int] = None,
        max_hosts: int = 10000,
    ) -> None:
        self.clock = clock
        self.limit = limit
        self.threshold = threshold
        self.cooldown = cooldown
        self.max_waiting = limit if max_waiting is None else max_waiting
        self.max_hosts = max_hosts
        self._hosts: OrderedDict[str, HostState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hosts)

    def state(self, host: str) -> HostState:
        state = self._hosts.get(host)
        if state is None:
            state = self._hosts[host] = HostState()
            self._evict()
        else:
            self._hosts.move_to_end(host)
        return state

    def _evict(self) -> None:
        if len(self._hosts) <= self.max_hosts:
            return
        now = self.clock.seconds()
        for host in list(self._hosts):
            if len(self._hosts) <= self.max_hosts:
                break
            if self._hosts[host].idle(now):
                del self._hosts[host]

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

    def room(self, host: str) -> int:
        """How many more deliveries ``admit`` would now let go or wait (no side effects)."""
        state = self._hosts.get(host)
        if state is None:
            return self.limit + self.max_waiting
        if state.paused_until is not None:
            ready = self.clock.seconds() >= state.paused_until and not state.probing
            return 1 if ready else 0
        return max(0, self.limit - state.in_flight) + max(0, self.max_waiting - len(state.waiting))

    def retry_at(self, host: str) -> float:
        """
        When a deferred delivery to ``host`` should come back: when the
        pause ends, or (a busy host) after the deliveries deferred before it,
        at the rate the host has been answering.
        """
        state = self.state(host)
        now = self.clock.seconds()
        if state.paused_until is not None and state.paused_until > now:
            return state.paused_until
        # A busy host, or a paused one whose probe is out: spread the
        # backlog at the pace the host has shown (a stalled probe counts).
        stalled = now - state.progress_at if state.in_flight else 0.0
        spacing = max(state.avg_duration, stalled, 0.001) / self.limit
        state.cursor = max(state.cursor, now) + spacing
        return min(state.cursor, now + MAX_BUSY_DEFER)

    def started(self, host: str) -> None:
        state = self.state(host)
        if not state.in_flight:
            state.progress_at = self.clock.seconds()
        state.in_flight += 1

    def finished(self, host: str, healthy: bool, duration: float = 0.0) -> None:
        """Record an attempt's end; ``healthy`` when the host answered sanely."""
        state = self.state(host)
        state.in_flight -= 1
        state.progress_at = self.clock.seconds()
        state.avg_duration += 0.2 * (duration - state.avg_duration)
        if healthy:
            state.failures = 0
            state.paused_until = None
            state.probing = False
            state.trips = 0
        else:
            state.failures += 1
            now = self.clock.seconds()
            paused = state.paused_until is not None and state.paused_until > now
            if state.probing or (not paused and state.failures >= self.threshold):
                state.paused_until = now + self.cooldown * min(2**state.trips, 16)
                state.trips += 1
                state.probing = False

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
