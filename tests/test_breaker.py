"""
The per-host breaker as a delivery sees it, on a ``Clock``: a short outage
costs about the outage plus the retry interval; a delivery keeps its own
schedule unless its host is truly paused; a pause starts short and grows;
a restart releases what a pause held, probing the host first.
"""

from __future__ import annotations

import itertools
from typing import Any, List

from twisted.internet import error as neterror

from hookah.delivery.hosts import HostGate
from hookah.model import DELIVERED, HOST_PAUSED, SCHEDULED, Delivery
from tests.storeflavours import LaterFlavour, SQLiteFlavour, run_on
from tests.support import Sent
from tests.test_dispatcher import T0, DispatcherTestCase

DEAD = "http://dead.example:80"


def refused() -> Exception:
    return neterror.ConnectionRefusedError("refused")


class BreakerTests(DispatcherTestCase):
    def attempts_of(self, dispatcher: Any, ids: List[str]) -> List[Delivery]:
        return [self.get(dispatcher, i) for i in ids]

    def test_a_two_second_outage_costs_about_two_seconds(self) -> None:
        # The scenario: 40 dispatches with _retries=40 and a schedule
        # of 0.2, 0.4, 0.8 s to a receiver that refuses connections for 2 s.
        clock = self.clock()
        up_at = T0 + 2.0

        def answer(sent: Sent) -> Any:
            return refused() if sent.at < up_at else (200, (), b"ok")

        clock, client, dispatcher = self.fake(answer, clock=clock, schedule=(0.2, 0.4, 0.8), hosts=HostGate(clock))
        ids = [f"R{n:02d}" for n in range(40)]
        self.submit(dispatcher, *[self.delivery(i, url="http://dead.example/hook", retries=40) for i in ids])
        clock.pump([0.05] * 40)  # 2 s
        self.assertIsNone(dispatcher.hosts.paused_until(DEAD))  # a burst, not a sustained failure
        clock.pump([0.05] * 40)  # 2 s more
        deliveries = self.attempts_of(dispatcher, ids)
        self.assertEqual({d.status for d in deliveries}, {DELIVERED})
        # Each delivered on its first attempt after the receiver came back,
        # within one retry interval (0.8 s, no jitter here) of its return.
        for d in deliveries:
            self.assertLessEqual(d.attempts[-1].at, up_at + 0.8 + 1e-6, d.id)
            self.assertEqual([a.status_code for a in d.attempts[:-1]], [None] * (len(d.attempts) - 1))

    def test_other_deliveries_keep_their_own_schedule(self) -> None:
        # Three plain dispatches to a receiver that is down, with jitter:
        # every retry happens when its own schedule says, never pushed out
        # by the others' failures (the issue saw 65 s where 5 s was due).
        clock = self.clock()
        jitter = itertools.cycle([0.0, 1.0, 0.3, 0.9, 0.1, 0.6])
        clock, client, dispatcher = self.fake(
            lambda sent: refused(), clock=clock, schedule=(5.0, 30.0, 120.0), hosts=HostGate(clock),
            rand=lambda: next(jitter),
        )
        ids = ["A", "B", "C"]
        self.submit(dispatcher, *[self.delivery(i, url="http://dead.example/hook") for i in ids])
        clock.pump([0.5] * 400)  # 200 s
        for d in self.attempts_of(dispatcher, ids):
            self.assertEqual(len(d.attempts), 4, d.id)
            gaps = [b.at - a.at for a, b in zip(d.attempts, d.attempts[1:])]
            for gap, interval in zip(gaps, (5.0, 30.0, 120.0)):
                # The schedule's interval with its +-20 % jitter, plus the
                # half-second steps of this clock.
                self.assertGreaterEqual(gap, interval * 0.8 - 1e-6, (d.id, gaps))
                self.assertLessEqual(gap, interval * 1.2 + 0.5, (d.id, gaps))
        self.assertIsNone(dispatcher.hosts.paused_until(DEAD))

    def test_sustained_failure_pauses_briefly_then_longer(self) -> None:
        clock = self.clock()
        clock, client, dispatcher = self.fake(
            lambda sent: refused(), clock=clock, schedule=(1.0,),
            hosts=HostGate(clock, threshold=5, window=10.0, first_pause=2.0, cooldown=16.0),
        )
        ids = [f"S{n:02d}" for n in range(20)]
        self.submit(dispatcher, *[self.delivery(i, url="http://dead.example/hook", retries=1000) for i in ids])
        clock.pump([0.1] * 99)  # 9.9 s: failing all along, not yet for 10 s
        self.assertIsNone(dispatcher.hosts.paused_until(DEAD))
        self.assertEqual(len(client.sent), 20 * 10)  # every second, as scheduled
        clock.pump([0.1] * 15)  # the attempts of the 11th second fail
        opened = dispatcher.hosts.paused_until(DEAD)
        self.assertIsNotNone(opened)
        self.assertGreater(len(client.sent), 20 * 10)  # the failure that opened it, at 10 s
        sent_when_opened = len(client.sent)
        clock.pump([0.1] * 800)  # 80 s
        probes = [s.at for s in client.sent[sent_when_opened:]]
        gaps = [b - a for a, b in zip(probes, probes[1:])]
        # One probe at a time, each pause twice the one before, up to the
        # cap; a deferred delivery comes back within a second of the pause's
        # end (0.5 s here, rand() == 0.5), on this clock's next 0.1 s step.
        self.assertGreaterEqual(len(gaps), 5)
        for gap, pause in zip(gaps, [4.0, 8.0, 16.0, 16.0, 16.0]):
            self.assertTrue(pause + 0.5 - 1e-6 <= gap <= pause + 0.6 + 1e-6, gaps)
        self.assertTrue(0.5 - 1e-6 <= probes[0] - opened <= 0.6 + 1e-6, (probes[0], opened))  # type: ignore[operator]
        # Paused deliveries are not charged attempts while they wait.
        waiting = [d for d in self.attempts_of(dispatcher, ids) if d.status == SCHEDULED]
        self.assertEqual(len(waiting), 20)
        self.assertEqual(sum(len(d.attempts) for d in waiting), len(client.sent))

    def test_a_paused_hosts_deliveries_say_so_in_storage(self) -> None:
        clock = self.clock()
        clock, client, dispatcher = self.fake(
            lambda sent: refused(), clock=clock, schedule=(1.0,),
            hosts=HostGate(clock, threshold=1, window=0.0, first_pause=30.0),
        )
        self.submit(dispatcher, self.delivery("P1", url="http://dead.example/", retries=100))
        clock.advance(0.1)
        self.submit(dispatcher, self.delivery("P2", url="http://dead.example/", retries=100))
        clock.pump([0.1] * 20)
        p1, p2 = self.attempts_of(dispatcher, ["P1", "P2"])
        self.assertEqual((p2.status, p2.attempts, p2.deferred), (SCHEDULED, (), HOST_PAUSED))
        self.assertEqual(p2.next_attempt_at, T0 + 30.0 + 0.5)
        self.assertEqual((p1.status, p1.deferred), (SCHEDULED, HOST_PAUSED))
        self.assertEqual(p1.next_attempt_at, T0 + 30.0 + 0.5)

    def restarted(self, answer: Any, store: Any, clock: Any, **kwargs: Any) -> Any:
        """A new dispatcher on ``store`` after a restart: claims released, a fresh gate."""
        self.successResultOf(store.release_claims(clock.seconds()))
        return self.fake(answer, clock=clock, store=store, hosts=HostGate(clock), **kwargs)

    def paused_backlog(self) -> Any:
        # Ten deliveries held by a long pause (stored ~10 minutes out).
        clock = self.clock()
        clock, client, first = self.fake(
            lambda sent: refused(), clock=clock, schedule=(1.0,),
            hosts=HostGate(clock, threshold=1, window=0.0, first_pause=600.0, cooldown=600.0),
        )
        ids = [f"K{n}" for n in range(10)]
        self.submit(first, *[self.delivery(i, url="http://dead.example/hook", retries=100) for i in ids])
        clock.pump([0.1] * 20)
        for d in self.attempts_of(first, ids):
            self.assertEqual(d.deferred, HOST_PAUSED)
            self.assertGreater(d.next_attempt_at, T0 + 600)
        self.successResultOf(first.stopService())
        return clock, first.store, ids

    def test_a_restart_releases_paused_deliveries_after_one_probe(self) -> None:
        clock, store, ids = self.paused_backlog()
        clock, client, second = self.restarted(lambda sent: None, store, clock)
        clock.pump([0.01] * 10)
        # The receiver is back; the first delivery claimed probes it, alone.
        self.assertEqual(len(client.sent), 1)
        client.sent[0].respond(200)
        clock.pump([0.01] * 100)  # one second
        self.assertEqual(len(client.sent), 10)
        for sent in client.outstanding():
            sent.respond(200)
        deliveries = self.attempts_of(second, ids)
        self.assertEqual({d.status for d in deliveries}, {DELIVERED})
        self.assertLessEqual(max(d.attempts[-1].at for d in deliveries), T0 + 4.0)
        self.assertEqual({d.deferred for d in deliveries}, {None})

    def test_a_restart_with_the_host_still_down_pauses_it_briefly(self) -> None:
        clock, store, ids = self.paused_backlog()
        restart_at = clock.seconds()
        clock, client, second = self.restarted(lambda sent: refused(), store, clock)
        clock.pump([0.01] * 100)  # one second
        self.assertEqual(len(client.sent), 1)  # the probe, refused
        paused_until = second.hosts.paused_until(DEAD)
        self.assertIsNotNone(paused_until)
        self.assertLessEqual(paused_until, restart_at + 2.0 + 0.1)  # type: ignore[operator]
        deliveries = self.attempts_of(second, ids)
        self.assertEqual({d.status for d in deliveries}, {SCHEDULED})
        [probe] = [d for d in deliveries if len(d.attempts) == 2]
        self.assertEqual(probe.next_attempt_at, probe.attempts[-1].at + 20.0)  # its own schedule
        for d in deliveries:
            if d is not probe:
                # Back when the new, short pause ends, not at the stored time.
                self.assertEqual(d.deferred, HOST_PAUSED)
                self.assertLess(d.next_attempt_at, restart_at + 5.0)


run_on(globals(), LaterFlavour, SQLiteFlavour)
