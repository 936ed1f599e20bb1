"""
Per-host protection: a cap on attempts in flight to one destination host,
and a circuit breaker that pauses a host whose attempts keep failing and
probes it again after a pause that grows while it stays down.

Together they keep one dead or slow endpoint from taking the dispatcher's
capacity away from every other host: its deliveries wait their turn (a
bounded number in memory) or are pushed back in storage, spread over the
time the host needs to work through them, so each one is pushed back about
once instead of being claimed and returned over and over.

The breaker opens on *sustained* failure only. A receiver restarting
during a deploy refuses a burst of connections within milliseconds; that
alone must not cost its deliveries a long pause, since their own retry
schedule already spaces them out. So the rule (``HostGate.finished``):

- a *failing streak* is a run of failed attempts (no response, a ``5xx``,
  a ``429``) with no success between them, where each attempt started at
  most ``window`` seconds after the previous failure ended (a host that
  was left alone for longer starts a new streak);
- the breaker opens when a streak holds at least ``threshold`` failures
  and has lasted ``window`` seconds: from the start of its first attempt
  to the end of its latest failure;
- the first pause lasts ``first_pause`` seconds; then one probe is let
  through; its failure doubles the pause (at most ``cooldown``), its
  success closes the breaker. Failures of attempts already in flight when
  the host was paused do not lengthen the pause.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Deque, List, Optional

from twisted.internet.interfaces import IReactorTime

from hookah import defaults
from hookah.model import HOST_BUSY, HOST_PAUSED, TextEnum


class Verdict(TextEnum):
    """What ``HostGate.admit`` says of an attempt to a host."""

    GO = "go"  # send now
    WAIT = "wait"  # hold in memory; a slot frees soon
    DEFER = "defer"  # push back in storage until ``retry_at``


GO = Verdict.GO
WAIT = Verdict.WAIT
DEFER = Verdict.DEFER

# Why a delivery was pushed back, stored with it (``Delivery.deferred``).
PAUSED = HOST_PAUSED
BUSY = HOST_BUSY

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
# A host that answers fast may hold more deliveries waiting in memory than
# ``max_waiting``: as many as it works through in this many seconds at the
# pace it has shown (at most ``max_burst``). A burst to one fast host (an
# event's 200 notifications to subscribers on one host) is then sent from
# memory, each the moment a slot frees, rather than stored pushed back and
# claimed again in pieces (a store round trip and a timer each, on the
# critical path of the fan-out). A waiting delivery holds one of the
# dispatcher's slots, but for no longer than about this; a slow or stalled
# host keeps ``max_waiting``.
WAIT_HORIZON = 0.1


class HostState:
    __slots__ = (
        "in_flight", "waiting", "reserved", "failures", "failing_since", "last_failure", "paused_until", "probing",
        "probe_started", "pause", "avg_duration", "cursor", "progress_at",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting: Deque[Any] = deque()
        # Deliveries claimed at intake whose write has not committed yet
        # (``HostGate.reserve``): they hold a place in the host's room, so
        # the intakes of a burst claim no more than the host can take.
        self.reserved = 0
        # The failing streak: how many failures, since when (the start of its
        # earliest attempt), and when its latest failure ended.
        self.failures = 0
        self.failing_since = 0.0
        self.last_failure = 0.0
        # The breaker: open while ``paused_until`` is set; once that time has
        # passed one probe goes (``probing``, sent at ``probe_started``).
        self.paused_until: Optional[float] = None
        self.probing = False
        self.probe_started = 0.0
        self.pause = 0.0
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
        return self.in_flight == 0 and not self.waiting and not self.reserved and not paused


class HostGate:
    """
    Decides, per destination host, whether an attempt may start now, and
    keeps the breaker described in the module docstring.

    State is kept for at most ``max_hosts`` hosts (least recently used idle
    ones are forgotten first), so memory follows the hosts in use, not every
    host ever seen, while a host's measured pace outlives a quiet moment.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int = defaults.HOST_CONCURRENCY,
        threshold: int = defaults.BREAKER_THRESHOLD,
        cooldown: float = defaults.BREAKER_COOLDOWN,
        max_waiting: Optional[int] = None,
        max_hosts: int = 10000,
        window: float = defaults.BREAKER_WINDOW,
        first_pause: float = defaults.BREAKER_PAUSE,
        max_burst: Optional[int] = None,
    ) -> None:
        self.clock = clock
        self.limit = limit
        self.threshold = threshold
        self.cooldown = cooldown
        self.window = window
        self.first_pause = min(first_pause, cooldown)
        self.max_waiting = limit if max_waiting is None else max_waiting
        # The most a fast host may hold waiting (``WAIT_HORIZON``).
        self.max_burst = max(self.max_waiting, self.max_waiting if max_burst is None else max_burst)
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
        """
        When the host's pause ends, while its breaker is open (also once
        that time has passed, until a probe closes it); ``None`` when closed.
        """
        state = self._hosts.get(host)
        return state.paused_until if state is not None else None

    def probing(self, host: str) -> bool:
        """Whether the probe of a paused host is in flight."""
        state = self._hosts.get(host)
        return state is not None and state.probing

    def resume(self, host: str) -> None:
        """
        A delivery that a pause held before a restart came due: a host this
        gate has not seen yet starts half-open, so its first attempt is a
        probe and the others wait for its outcome (a failed probe pauses the
        host for ``first_pause``), rather than all meeting a host that may
        still be down.
        """
        if host not in self._hosts:
            state = self.state(host)
            state.paused_until = self.clock.seconds()

    def admit(self, host: str, reserved: bool = False) -> Verdict:
        """
        ``GO`` (the caller must then call ``started``), ``WAIT`` or ``DEFER``.
        ``reserved``: the delivery holds a place taken by ``reserve``, which
        this uses up; others are let in only while places are left over after
        every reservation, so a reserved delivery is never pushed back for a
        busy host (only for a pause).
        """
        state = self.state(host)
        if reserved:
            state.reserved = max(0, state.reserved - 1)
        elif state.paused_until is None and state.reserved and self._room(state) <= 0:
            return DEFER
        if state.paused_until is not None:
            now = self.clock.seconds()
            if now < state.paused_until or state.probing:
                return DEFER
            # Half-open: this one attempt probes whether the host is back.
            state.probing = True
            state.probe_started = now
            return GO
        if state.in_flight < self.limit:
            return GO
        if len(state.waiting) < self._waiting_room(state):
            return WAIT
        return DEFER

    def _waiting_room(self, state: HostState) -> int:
        """How many deliveries may wait for the host in memory (``WAIT_HORIZON``)."""
        if self.max_burst <= self.max_waiting:
            return self.max_waiting
        pace = self._pace(state, self.clock.seconds())
        return max(self.max_waiting, min(self.max_burst, int(self.limit * WAIT_HORIZON / pace)))

    @staticmethod
    def _pace(state: HostState, now: float) -> float:
        """Seconds per attempt the host has shown; attempts stalled since count as that slow."""
        stalled = now - state.progress_at if state.in_flight else 0.0
        return max(state.avg_duration, stalled, 0.001)

    def room(self, host: str) -> int:
        """
        How many more deliveries ``admit`` would now let go or wait, places
        already reserved left out (no side effects).
        """
        state = self._hosts.get(host)
        if state is None:
            return self._room(HostState())
        return self._room(state)

    def _room(self, state: HostState) -> int:
        if state.paused_until is not None:
            ready = self.clock.seconds() >= state.paused_until and not state.probing
            return 1 if ready and not state.reserved else 0
        free = max(0, self.limit - state.in_flight) + max(0, self._waiting_room(state) - len(state.waiting))
        return max(0, free - state.reserved)

    def reserve(self, host: str, count: int = 1) -> None:
        """
        Hold ``count`` places of ``room`` for deliveries claimed now but
        started only once their write commits: ``admit(host, reserved=True)``
        uses one place up, ``unreserve`` gives one back (the write failed).
        """
        self.state(host).reserved += count

    def unreserve(self, host: str) -> None:
        state = self._hosts.get(host)
        if state is not None:
            state.reserved = max(0, state.reserved - 1)

    def retry_at(self, host: str) -> float:
        """
        When a deferred delivery to ``host`` should come back: when the
        pause ends, or (a busy host, or a paused one whose probe is out)
        after the deliveries deferred before it, at the rate the host has
        been answering; never more than ``MAX_BUSY_DEFER`` from now, and
        while a probe is out never more than the host's current pause (a
        probe that hangs must not leave the backlog far beyond it).
        """
        state = self.state(host)
        now = self.clock.seconds()
        if state.paused_until is not None and state.paused_until > now:
            return state.paused_until
        # Spread the backlog at the pace the host has shown (attempts that
        # have stalled since count as that slow).
        spacing = self._pace(state, now) / self.limit
        state.cursor = max(state.cursor, now) + spacing
        longest = MAX_BUSY_DEFER if state.paused_until is None else max(state.pause, self.first_pause)
        return min(state.cursor, now + longest)

    def started(self, host: str) -> None:
        state = self.state(host)
        if not state.in_flight:
            state.progress_at = self.clock.seconds()
        state.in_flight += 1

    def finished(self, host: str, healthy: bool, started: float) -> None:
        """
        Record the end of an attempt that started at ``started``; ``healthy``
        when the host answered sanely.
        """
        state = self.state(host)
        now = self.clock.seconds()
        state.in_flight -= 1
        state.progress_at = now
        state.avg_duration += 0.2 * ((now - started) - state.avg_duration)
        if healthy:
            state.failures = 0
            if state.paused_until is not None:
                state.paused_until = None
                state.probing = False
                state.pause = 0.0
                # The backlog spread while the probe was out is due soon:
                # what is deferred next is spread from now.
                state.cursor = min(state.cursor, now)
        elif state.paused_until is not None:
            if state.probing and started >= state.probe_started:
                # The probe failed: the host stays down, pause it for longer.
                state.pause = min(max(2 * state.pause, self.first_pause), self.cooldown)
                state.paused_until = now + state.pause
                state.probing = False
            # Otherwise an attempt sent before the pause: already counted.
        else:
            if state.failures == 0 or started - state.last_failure > self.window:
                state.failures = 0
                state.failing_since = started
            state.failures += 1
            state.failing_since = min(state.failing_since, started)
            state.last_failure = max(state.last_failure, now)
            if state.failures >= self.threshold and now - state.failing_since >= self.window:
                state.pause = self.first_pause
                state.paused_until = now + state.pause
                state.probing = False
        if state.idle(now):
            # Nothing left in flight or waiting here: a spread computed from
            # an earlier burst or stall must not push the next deferral out.
            state.cursor = min(state.cursor, now)

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
