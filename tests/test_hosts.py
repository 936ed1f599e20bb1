"""
Per-host protection: ``HostGate`` on its own, and the dispatcher's handling
of a host whose backlog it cannot send yet (each delivery pushed back about
once, never claimed and returned in a loop).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from hookah.delivery.dispatcher import Dispatcher
from hookah.delivery.hosts import DEFER, GO, WAIT, HostGate
from hookah.ids import IdGenerator
from hookah.model import Delivery
from hookah.storage.memory import MemoryStore
from tests.storeflavours import LaterFlavour, MemoryFlavour, run_on
from tests.support import FakeClient, start_hookah, submit

T0 = 1_700_000_000.0


def clock_at(t: float = T0) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


def fail(gate: HostGate, host: str = "h", count: int = 1, lasting: float = 0.0) -> None:
    """``count`` attempts to ``host`` that fail now, each started ``lasting`` seconds ago."""
    now = gate.clock.seconds()
    for _ in range(count):
        gate.started(host)
        gate.finished(host, healthy=False, started=now - lasting)


class HostGateTests(TestCase):
    def test_limit_then_wait_then_defer(self) -> None:
        gate = HostGate(clock_at(), limit=2, max_waiting=1)
        verdicts = []
        for _ in range(4):
            verdict = gate.admit("h")
            verdicts.append(verdict)
            if verdict == GO:
                gate.started("h")
            elif verdict == WAIT:
                gate.hold("h", object())
        self.assertEqual(verdicts, [GO, GO, WAIT, DEFER])

    def test_a_burst_of_fast_refusals_does_not_open_the_breaker(self) -> None:
        # A receiver restarting refuses every connection for a moment.
        clock = clock_at()
        gate = HostGate(clock, threshold=5, window=10.0, first_pause=2.0, cooldown=60.0)
        for _ in range(5):
            fail(gate)
            clock.advance(0.001)
        fail(gate, count=35)
        self.assertIsNone(gate.paused_until("h"))
        self.assertEqual(gate.admit("h"), GO)

    def test_sustained_failures_open_the_breaker(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, threshold=5, window=10.0, first_pause=2.0, cooldown=60.0)
        for _ in range(5):  # a failure every 2 s: 8 s of failing, not yet 10
            fail(gate)
            clock.advance(2.0)
        self.assertIsNone(gate.paused_until("h"))
        fail(gate)  # 10 s since the first failed attempt started
        self.assertEqual(gate.paused_until("h"), T0 + 10.0 + 2.0)
        self.assertEqual(gate.admit("h"), DEFER)

    def test_failing_attempts_count_from_when_they_started(self) -> None:
        # A hanging host: sixteen attempts time out together after 30 s.
        clock = clock_at()
        gate = HostGate(clock, threshold=5, window=10.0, first_pause=2.0)
        clock.advance(30.0)
        fail(gate, count=16, lasting=30.0)
        self.assertEqual(gate.paused_until("h"), T0 + 30.0 + 2.0)

    def test_too_few_failures_do_not_open_the_breaker(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, threshold=5, window=10.0)
        for _ in range(4):
            fail(gate)
            clock.advance(9.0)
        self.assertIsNone(gate.paused_until("h"))

    def test_a_success_or_a_quiet_gap_ends_a_failing_streak(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, threshold=3, window=10.0)
        fail(gate, count=2)
        clock.advance(9.0)
        gate.started("h")
        gate.finished("h", healthy=True, started=clock.seconds())
        clock.advance(2.0)
        fail(gate)  # 11 s after the first failure, but a success came between
        self.assertIsNone(gate.paused_until("h"))
        clock.advance(60.0)
        fail(gate, count=5)  # a minute of silence since: a new streak
        self.assertIsNone(gate.paused_until("h"))

    def test_first_pause_is_short_and_doubles_up_to_the_cooldown(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, threshold=1, window=0.0, first_pause=2.0, cooldown=20.0)
        fail(gate)
        pauses = []
        for _ in range(6):
            paused_until = gate.paused_until("h")
            assert paused_until is not None
            pauses.append(paused_until - clock.seconds())
            clock.advance(paused_until - clock.seconds() - 0.001)
            self.assertEqual(gate.admit("h"), DEFER)
            clock.advance(0.001)
            self.assertEqual(gate.admit("h"), GO)  # the probe
            self.assertEqual(gate.admit("h"), DEFER)  # only one probe at a time
            fail(gate)
        self.assertEqual(pauses, [2.0, 4.0, 8.0, 16.0, 20.0, 20.0])
        clock.advance(20.0)
        self.assertEqual(gate.admit("h"), GO)
        gate.started("h")
        gate.finished("h", healthy=True, started=clock.seconds())
        self.assertIsNone(gate.paused_until("h"))
        self.assertEqual(gate.admit("h"), GO)
        # Open again later: short again.
        fail(gate)
        self.assertEqual(gate.paused_until("h"), clock.seconds() + 2.0)

    def test_in_flight_failures_do_not_lengthen_a_pause(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, limit=16, threshold=5, window=10.0, first_pause=2.0, cooldown=60.0)
        for _ in range(16):
            self.assertEqual(gate.admit("h"), GO)
            gate.started("h")
        clock.advance(30.0)
        for _ in range(16):
            gate.finished("h", healthy=False, started=T0)
        self.assertEqual(gate.paused_until("h"), T0 + 32.0)

    def test_resume_probes_a_host_not_seen_yet(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, first_pause=2.0)
        gate.resume("h")
        self.assertEqual(gate.admit("h"), GO)  # the probe
        self.assertEqual(gate.admit("h"), DEFER)
        gate.started("h")
        gate.finished("h", healthy=False, started=clock.seconds())
        self.assertEqual(gate.paused_until("h"), T0 + 2.0)
        # A host already known is left as it is.
        gate.started("k")
        gate.finished("k", healthy=True, started=clock.seconds())
        gate.resume("k")
        self.assertIsNone(gate.paused_until("k"))
        self.assertEqual(gate.admit("k"), GO)

    def test_busy_host_deferrals_are_spread_at_its_pace(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, limit=2)
        gate.started("h")
        gate.finished("h", healthy=True, started=T0 - 1.0)
        times = [gate.retry_at("h") for _ in range(4)]
        self.assertEqual(times, sorted(times))
        self.assertEqual(len(set(times)), 4)
        self.assertLessEqual(times[-1] - T0, 4 * 1.0 / 2 + 1e-9)

    def test_an_old_spread_does_not_push_later_deferrals_out(self) -> None:
        # A stalled host's backlog was spread far out; once the host has
        # caught up (nothing in flight or waiting), the next deferral is
        # spread from now, not after that old backlog.
        clock = clock_at()
        gate = HostGate(clock, limit=1)
        gate.started("h")
        clock.advance(100.0)
        far = [gate.retry_at("h") for _ in range(10)]
        self.assertGreater(far[-1], clock.seconds() + 200)
        gate.finished("h", healthy=True, started=T0)
        gate.started("h")
        gate.finished("h", healthy=True, started=clock.seconds() - 0.01)
        self.assertLess(gate.retry_at("h"), clock.seconds() + 100.0)

    def test_a_hanging_probe_does_not_push_the_backlog_past_the_pause(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, limit=16, threshold=1, window=0.0, first_pause=2.0, cooldown=60.0)
        fail(gate)
        clock.advance(2.0)
        self.assertEqual(gate.admit("h"), GO)  # the probe, which hangs
        gate.started("h")
        clock.advance(25.0)
        times = [gate.retry_at("h") for _ in range(500)]
        self.assertLessEqual(max(times), clock.seconds() + 2.0)
        # The probe answers at last: the next deferral is spread from now.
        gate.finished("h", healthy=True, started=T0 + 2.0)
        gate.started("h")
        self.assertLess(gate.retry_at("h"), clock.seconds() + 1.0)

    def test_state_is_bounded_by_max_hosts(self) -> None:
        gate = HostGate(clock_at(), threshold=1000, max_hosts=100)
        for n in range(10_000):
            host = f"http://dead{n}.example:80"
            gate.started(host)
            gate.finished(host, healthy=False, started=T0)
        self.assertLessEqual(len(gate), 100)

    def test_an_idle_host_keeps_its_measured_pace(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, limit=16)
        for _ in range(50):
            gate.started("h")
            gate.finished("h", healthy=True, started=clock.seconds() - 0.001)
        clock.advance(60)
        # The next burst is spread at the pace measured before, not a guess.
        first, second = gate.retry_at("h"), gate.retry_at("h")
        self.assertLess(second - first, 0.001)

    def test_room_counts_slots_and_waiting_places(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, limit=2, max_waiting=3, threshold=1, window=0.0, first_pause=10.0)
        self.assertEqual(gate.room("h"), 5)
        gate.started("h")
        gate.hold("h", object())
        self.assertEqual(gate.room("h"), 3)
        gate.finished("h", healthy=False, started=T0)  # trips the breaker
        self.assertEqual(gate.room("h"), 0)
        clock.advance(10)
        self.assertEqual(gate.room("h"), 1)  # one probe

    def test_reserved_places_count_against_the_room(self) -> None:
        clock = clock_at()
        gate = HostGate(clock, limit=2, max_waiting=1)
        gate.reserve("h")
        gate.reserve("h")
        self.assertEqual(gate.room("h"), 1)
        # A delivery without a reservation takes the place left over...
        self.assertEqual(gate.admit("h"), GO)
        gate.started("h")
        self.assertEqual(gate.room("h"), 0)
        # ...and none beyond it, while the reserved ones still get theirs.
        self.assertEqual(gate.admit("h"), DEFER)
        self.assertEqual(gate.admit("h", reserved=True), GO)
        gate.started("h")
        self.assertEqual(gate.admit("h", reserved=True), WAIT)
        gate.hold("h", object())
        self.assertEqual(gate.room("h"), 0)
        # A reservation given back (its write failed) frees its place.
        gate.reserve("k")
        self.assertEqual(gate.room("k"), 2)
        gate.unreserve("k")
        self.assertEqual(gate.room("k"), 3)

    def test_a_fast_host_may_hold_more_waiting_a_slow_or_stalled_one_does_not(self) -> None:
        # Waiting places beyond max_waiting: what the host works through in
        # WAIT_HORIZON (0.1 s) at its pace, at most max_burst.
        clock = clock_at()
        gate = HostGate(clock, limit=16, max_waiting=64, max_burst=176)
        # Not measured yet: taken for a fast host (2 ms per attempt).
        self.assertEqual(gate.room("new"), 16 + 176)
        # 5 ms per attempt: 16 x 0.1 / 0.005 = 320, so max_burst.
        for _ in range(40):
            gate.started("fast")
            gate.finished("fast", healthy=True, started=clock.seconds() - 0.005)
        self.assertEqual(gate.room("fast"), 16 + 176)
        verdicts = []
        for _ in range(200):
            verdict = gate.admit("fast")
            verdicts.append(verdict)
            if verdict == GO:
                gate.started("fast")
            elif verdict == WAIT:
                gate.hold("fast", object())
        self.assertEqual((verdicts.count(GO), verdicts.count(WAIT), verdicts.count(DEFER)), (16, 176, 8))
        # 20 ms: 80 waiting places; 1 s: max_waiting.
        for host, seconds, waiting in (("medium", 0.02, 80), ("slow", 1.0, 64)):
            for _ in range(40):
                gate.started(host)
                gate.finished(host, healthy=True, started=clock.seconds() - seconds)
            self.assertEqual(gate.room(host), 16 + waiting, host)
        # A fast host whose attempts stall counts as slow as the stall.
        gate.started("stalls")
        self.assertEqual(gate.room("stalls"), 15 + 176)
        clock.advance(1.0)
        self.assertEqual(gate.room("stalls"), 15 + 64)
        self.assertEqual(gate.admit("fast"), DEFER)  # the stall is its own host's
        # Without max_burst, max_waiting holds for every host.
        plain = HostGate(clock, limit=16, max_waiting=64)
        self.assertEqual(plain.room("new"), 16 + 64)


class CountingStore(MemoryStore):
    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.claimed = 0
        self.rescheduled = 0

    def claim_due(self, now: float, limit: int, lease_until: float) -> Deferred:
        d = super().claim_due(now, limit, lease_until)
        d.addCallback(self._count)
        return d

    def _count(self, rows: List[Any]) -> List[Any]:
        self.claimed += len(rows)
        return rows

    def reschedule(self, delivery_id: str, next_attempt_at: float, deferred: Optional[str] = None, claim_token: Optional[str] = None) -> Deferred:
        self.rescheduled += 1
        return super().reschedule(delivery_id, next_attempt_at, deferred, claim_token)


class BusyHostTests(MemoryFlavour, TestCase):
    def fast_host(self, prefix: str, host: str, **gate: Any) -> Tuple[Clock, CountingStore, FakeClient, Dispatcher, List[Delivery]]:
        """
        A running dispatcher with 256 slots and 16 per host (``gate``: the
        rest of ``HostGate``'s settings), a receiver that answers every
        request after 1 ms, and 200 deliveries of one event to ``host``.
        """
        clock = clock_at()
        store = CountingStore(clock)

        def answer(sent: Any) -> None:
            clock.callLater(0.001, sent.respond, 200, (), b"ok")

        client = FakeClient(clock, answer)
        dispatcher = Dispatcher(
            self.make_store(clock, store), client, clock, IdGenerator(clock.seconds), (5.0,), timeout=30.0, concurrency=256,
            hosts=HostGate(clock, limit=16, **gate), rand=lambda: 0.5,
        )
        dispatcher.startService()
        burst = [
            Delivery(id=f"{prefix}{n:04d}", url=f"http://{host}/cb/{n}", body=b"x", created_at=T0, next_attempt_at=T0)
            for n in range(200)
        ]
        return clock, store, client, dispatcher, burst

    def test_a_burst_to_one_fast_host_is_delivered_at_its_pace(self) -> None:
        # 200 notifications of one event to subscribers on one host: those
        # beyond the host's slots are stored already spread out (never
        # claimed and put back), and all arrive within a fraction of a second.
        clock, store, client, dispatcher, burst = self.fast_host("E", "one.example", max_waiting=64)
        self.successResultOf(submit(dispatcher, burst))
        self.assertEqual(store.rescheduled, 0)
        clock.pump([0.001] * 1000)  # one second
        self.assertEqual(len({s.url for s in client.sent}), 200)
        self.assertLessEqual(max(s.at for s in client.sent) - T0, 0.5)
        self.assertLessEqual(client.max_per_host["one.example"], 16)

    def test_a_burst_to_one_fast_host_within_its_burst_room_is_sent_from_memory(self) -> None:
        # The same burst with room to hold it (max_burst): every delivery is
        # claimed as it is stored and sent from memory as slots free; none
        # is stored pushed back and claimed again (a store round trip and a
        # timer on the fan-out's critical path).
        clock, store, client, dispatcher, burst = self.fast_host("M", "one.example", max_waiting=64, max_burst=184)
        intake = dispatcher.intake(burst)
        self.assertEqual({d.status for d in intake.deliveries}, {"delivering"})
        self.successResultOf(intake.when_stored(dispatcher.store.add_deliveries(intake.deliveries)))
        clock.pump([0.001] * 1000)
        self.assertEqual(len({s.url for s in client.sent}), 200)
        self.assertEqual((store.claimed, store.rescheduled), (0, 0))
        # 200 / 16 slots x 1 ms, less the rounding of pump steps.
        self.assertLessEqual(max(s.at for s in client.sent) - T0, 0.03)
        self.assertLessEqual(client.max_per_host["one.example"], 16)

    def test_the_first_burst_to_a_new_host_is_not_held_to_a_guessed_pace(self) -> None:
        # The first event to 200 subscribers on one host nobody has measured
        # yet: with the default waiting room (16) most of them are stored
        # pushed back before any answer is in. They must come back at about
        # the pace of a fast host, not of a guess: at a 50 ms guess the last
        # one left 0.5 s after the event, ten times the later events' time.
        clock, _, client, dispatcher, burst = self.fast_host("F", "new.example")
        self.successResultOf(submit(dispatcher, burst))
        clock.pump([0.001] * 1000)
        self.assertEqual(len({s.url for s in client.sent}), 200)
        self.assertLessEqual(max(s.at for s in client.sent) - T0, 0.1)
        self.assertLessEqual(client.max_per_host["new.example"], 16)

    def test_a_hanging_hosts_backlog_is_not_claimed_in_a_loop(self) -> None:
        clock = clock_at()
        store = CountingStore(clock)
        backlog = 5000
        self.successResultOf(
            store.add_deliveries(
                [
                    Delivery(id=f"A{n:05d}", url="http://hang.example/hook", body=b"x", created_at=T0, next_attempt_at=T0)
                    for n in range(backlog)
                ]
                + [
                    Delivery(id=f"B{n:05d}", url="http://ok.example/hook", body=b"y", created_at=T0, next_attempt_at=T0 + 1)
                    for n in range(10)
                ]
            )
        )
        client = FakeClient(clock, lambda sent: None if "hang" in sent.url else (200, (), b"ok"))
        dispatcher = Dispatcher(
            self.make_store(clock, store),
            client,
            clock,
            IdGenerator(clock.seconds),
            (5.0,),
            timeout=30.0,
            concurrency=256,
            hosts=HostGate(clock, limit=16, max_waiting=64),
            rand=lambda: 0.5,
        )
        dispatcher.startService()
        self.addCleanup(client.fail_outstanding)
        clock.pump([0.1] * 250)  # 25 s, before any attempt could time out
        to_ok = [s for s in client.sent if "ok.example" in s.url]
        to_hang = [s for s in client.sent if "hang" in s.url]
        # The other host is served on time, the hanging one at its cap...
        self.assertEqual(len(to_ok), 10)
        self.assertLessEqual(max(s.at for s in to_ok) - T0, 6.0)
        self.assertEqual(len(to_hang), 16)
        # ...and its backlog is pushed back a couple of times (first at the
        # guessed pace, then, once its attempts are seen to stall, far out),
        # not claimed over and over: the first version did 15x the backlog.
        self.assertLessEqual(store.rescheduled, 3 * backlog)
        self.assertLessEqual(store.claimed, 3 * backlog + 100)


class SlowWriteStore(CountingStore):
    """
    Every write commits ``latency`` seconds after it is asked for, as a
    database under a burst does (PostgreSQL at 20-40 ms): intakes keep
    arriving while the earlier ones are still being written.
    """

    def __init__(self, clock: Clock, latency: float) -> None:
        super().__init__(clock)
        self.clock = clock
        self.latency = latency
        self.busy_deferred: List[str] = []

    def _later(self, write: Any, *args: Any, **kwargs: Any) -> Deferred:
        d: Deferred = Deferred()
        self.clock.callLater(self.latency, lambda: write(*args, **kwargs).chainDeferred(d))
        return d

    def add_deliveries(self, deliveries: Any) -> Deferred:
        return self._later(super().add_deliveries, deliveries)

    def finish_attempt(self, *args: Any, **kwargs: Any) -> Deferred:
        return self._later(super().finish_attempt, *args, **kwargs)

    def reschedule(self, delivery_id: str, next_attempt_at: float, deferred: Optional[str] = None, claim_token: Optional[str] = None) -> Deferred:
        if deferred == "host_busy":
            self.busy_deferred.append(delivery_id)
        return self._later(super().reschedule, delivery_id, next_attempt_at, deferred, claim_token)


class SlowWriteTests(MemoryFlavour, TestCase):
    def unanswered(self, clock: Clock, hosts: HostGate) -> Tuple[FakeClient, Dispatcher]:
        """A started dispatcher on a memory store whose client never answers (the test looks at what it sent)."""
        client = FakeClient(clock, lambda sent: None)
        self.addCleanup(client.fail_outstanding)
        dispatcher = Dispatcher(
            self.make_store(clock, MemoryStore(clock)), client, clock, IdGenerator(clock.seconds), (5.0,), timeout=30.0,
            concurrency=256, hosts=hosts, rand=lambda: 0.5,
        )
        dispatcher.startService()
        return client, dispatcher

    def test_intake_claims_no_more_than_the_host_can_take_while_writes_are_out(self) -> None:
        # 2,000 dispatches to one host at 2,000/s, each written 30 ms after
        # it is taken in; the host answers in 20 ms with 16 slots (800/s).
        # Every delivery claimed at intake must find its place at the host
        # when its write commits: none is claimed, then pushed back busy
        # (before places were held from intake on, about half of them were,
        # and the rest of the backlog was spread behind them).
        clock = clock_at()
        store = SlowWriteStore(clock, latency=0.03)

        def answer(sent: Any) -> None:
            clock.callLater(0.02, sent.respond, 200, (), b"ok")

        client = FakeClient(clock, answer)
        dispatcher = Dispatcher(
            self.make_store(clock, store), client, clock, IdGenerator(clock.seconds), (5.0,), timeout=30.0, concurrency=256,
            hosts=HostGate(clock, limit=16), rand=lambda: 0.5,
        )
        dispatcher.startService()
        claimed_at_intake = set()
        for n in range(2000):
            delivery = Delivery(
                id=f"S{n:05d}", url=f"http://one.example/cb/{n}", body=b"x", created_at=clock.seconds(), next_attempt_at=clock.seconds()
            )
            intake = dispatcher.intake([delivery])
            claimed_at_intake.update(d.id for d in intake.deliveries if d.status == "delivering")
            intake.when_stored(dispatcher.store.add_deliveries(intake.deliveries))
            clock.advance(0.0005)
        clock.pump([0.005] * 1000)  # 5 s
        self.assertEqual(len({s.url for s in client.sent}), 2000)
        self.assertLessEqual(client.max_per_host["one.example"], 16)
        self.assertGreater(len(claimed_at_intake), 16)
        self.assertEqual(claimed_at_intake & set(store.busy_deferred), set())
        # All of it at about the host's pace: 2,000 / 16 slots x 20 ms.
        self.assertLessEqual(max(s.at for s in client.sent) - T0, 2.5 * 1.2)
        # Pushed back at most about once each, in all.
        self.assertLessEqual(store.rescheduled, 2000)

    def test_one_intake_to_several_hosts_claims_each_hosts_room(self) -> None:
        # Interleaved deliveries to three hosts in one intake: each host gets
        # as many claims as its room (one of them already has one in flight
        # and one place reserved), the rest are stored pushed back; every
        # claim has a token of its own and a lease for its own timeout.
        clock = clock_at()
        hosts = HostGate(clock, limit=2, max_waiting=1)
        client, dispatcher = self.unanswered(clock, hosts)
        hosts.started("http://b.example:80")
        hosts.reserve("http://b.example:80")
        burst = [
            Delivery(id=f"H{n:02d}", url=f"http://{'abc'[n % 3]}.example/{n}", body=b"x", created_at=T0,
                     next_attempt_at=T0, timeout=90.0 if n == 0 else None)
            for n in range(15)
        ]
        intake = dispatcher.intake(burst)
        claimed = [d for d in intake.deliveries if d.status == "delivering"]
        by_host = {h: [d.id for d in claimed if d.url.startswith(f"http://{h}.")] for h in "abc"}
        self.assertEqual(by_host, {"a": ["H00", "H03", "H06"], "b": ["H01"], "c": ["H02", "H05", "H08"]})
        self.assertEqual({d.deferred for d in intake.deliveries if d.status != "delivering"}, {"host_busy"})
        self.assertEqual(len({d.claim_token for d in claimed}), 7)
        self.assertEqual({len(d.claim_token or "") for d in claimed}, {32})
        self.assertEqual(claimed[0].claimed_until, T0 + 90.0 + 60.0)
        self.assertEqual({d.claimed_until for d in claimed[1:]}, {T0 + 30.0 + 60.0})
        # Every place is held until the write: no more room at any of them.
        self.assertEqual([hosts.room(f"http://{h}.example:80") for h in "abc"], [0, 0, 0])
        self.successResultOf(intake.when_stored(dispatcher.store.add_deliveries(intake.deliveries)))
        self.assertEqual(sorted(s.url for s in client.sent), [
            "http://a.example/0", "http://a.example/3", "http://b.example/1", "http://c.example/2", "http://c.example/5",
        ])

    def test_a_failed_write_gives_its_places_at_the_host_back(self) -> None:
        clock = clock_at()
        hosts = HostGate(clock, limit=2, max_waiting=0)
        client, dispatcher = self.unanswered(clock, hosts)
        first = dispatcher.intake([Delivery(id=f"X{n}", url="http://two.example/", body=b"x", created_at=T0, next_attempt_at=T0) for n in range(2)])
        self.assertEqual([d.status for d in first.deliveries], ["delivering", "delivering"])
        self.assertEqual(hosts.room("http://two.example:80"), 0)
        write: Deferred = Deferred()
        failed = first.when_stored(write)
        write.errback(RuntimeError("disk full"))
        self.failureResultOf(failed, RuntimeError)
        second = dispatcher.intake([Delivery(id=f"Y{n}", url="http://two.example/", body=b"x", created_at=T0, next_attempt_at=T0) for n in range(3)])
        self.assertEqual([d.status for d in second.deliveries], ["delivering", "delivering", "scheduled"])
        self.successResultOf(second.when_stored(dispatcher.store.add_deliveries(second.deliveries)))
        self.assertEqual(sorted(s.url for s in client.sent), ["http://two.example/", "http://two.example/"])


class SlowRescheduleStore(MemoryStore):
    """Reschedules commit a little later, as SQLite's writer thread does."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.clock = clock

    def reschedule(self, delivery_id: str, next_attempt_at: float, deferred: Optional[str] = None, claim_token: Optional[str] = None) -> Deferred:
        d: Deferred = Deferred()
        self.clock.callLater(
            0.01, lambda: super(SlowRescheduleStore, self).reschedule(delivery_id, next_attempt_at, deferred, claim_token).chainDeferred(d)
        )
        return d


class StarvationTests(MemoryFlavour, TestCase):
    def test_a_claim_of_only_deferred_rows_does_not_stop_the_loop(self) -> None:
        clock = clock_at()
        store = SlowRescheduleStore(clock)
        self.successResultOf(
            store.add_deliveries(
                [Delivery(id=f"P{n:03d}", url="http://paused.example/", body=b"x", created_at=T0, next_attempt_at=T0) for n in range(30)]
                + [Delivery(id=f"Q{n:03d}", url="http://fine.example/", body=b"y", created_at=T0, next_attempt_at=T0 + 3) for n in range(5)]
            )
        )
        client = FakeClient(clock, lambda sent: (500, (), b"no") if "paused" in sent.url else (200, (), b"ok"))
        dispatcher = Dispatcher(
            self.make_store(clock, store), client, clock, IdGenerator(clock.seconds), (1.0,), timeout=30.0, concurrency=4,
            hosts=HostGate(clock, limit=4, threshold=1, window=0.0, first_pause=60.0, cooldown=60.0), rand=lambda: 0.5,
        )
        dispatcher.startService()
        self.addCleanup(client.fail_outstanding)
        clock.pump([0.01] * 1200)  # 12 s
        fine = [s for s in client.sent if "fine" in s.url]
        self.assertEqual(len(fine), 5)
        self.assertLessEqual(max(s.at for s in fine) - T0, 4.0)


run_on(globals(), LaterFlavour)


class ServerBurstTests(TestCase):
    def test_the_server_claims_one_events_200_notifications_to_one_host_at_once(self) -> Deferred:
        # With the default --concurrency (256) and --host-concurrency (16), a
        # host not measured yet (taken for a fast one) may have all of one
        # event's 200 notifications claimed as they are stored, 16 sent and
        # the rest waiting in memory; a slow host, a quarter of the slots.
        async def go() -> None:
            service, _ = await start_hookah(self)
            burst = [
                Delivery(id=f"W{n:04d}", url=f"http://127.0.0.1:9/cb/{n}", body=b"x", created_at=T0, next_attempt_at=0.0)
                for n in range(200)
            ]
            intake = service.dispatcher.intake(burst)
            claimed = [d.status for d in intake.deliveries].count("delivering")
            # Not stored after all: the claims and places are given back.
            failed = intake.when_stored(defer.fail(RuntimeError("not stored")))
            failed.addErrback(lambda f: f.trap(RuntimeError))
            await failed
            self.assertEqual(claimed, 200)
            self.assertEqual(service.dispatcher.in_flight, 0)
            hosts = service.dispatcher.hosts
            for _ in range(20):
                hosts.started("http://127.0.0.1:10")
                hosts.finished("http://127.0.0.1:10", healthy=True, started=hosts.clock.seconds() - 1.0)
            self.assertEqual(hosts.room("http://127.0.0.1:10"), 16 + 64)

        return ensureDeferred(go())
