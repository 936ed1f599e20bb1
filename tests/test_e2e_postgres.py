"""
Two real ``twistd -n hookah`` processes on one PostgreSQL database.

- Dispatches spread over both nodes each reach a recording receiver, and
  none twice (duplicates are counted: zero expected without faults).
- A node killed with ``SIGKILL`` while it holds claims: the other node
  delivers every one of them within the claim lease, the reaper's interval
  and a few seconds; duplicates are at most the dead node's attempts in
  flight.
- PostgreSQL restarted mid-run: every dispatch acknowledged with ``202``
  arrives; the nodes reconnect by themselves.

Every wait polls against a deadline; no sleep decides an outcome.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, List
from urllib.parse import quote

from twisted.internet.defer import DeferredSemaphore, ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from tests import pgsupport
from tests.pgsupport import fresh_database
from tests.support import http_client, listen_sink, poll, temp_dir
from tests.test_e2e_durability import HookahProcess

LEASE = 3.0  # --claim-lease for these nodes
REAPER = 5.0  # PostgresStore's reap interval


class TwoNodesE2ETests(TestCase):
    async def nodes(self, count: int = 2) -> List[HookahProcess]:
        self.db = fresh_database(self)
        directory = temp_dir(self)
        nodes = [
            HookahProcess(self, directory, [
                "--storage", self.db, "--allow-private-targets", "--claim-lease", str(LEASE),
                "--retry-schedule", "1,1,1,1,1,1,1,1,1,1",
            ])
            for _ in range(count)
        ]
        for node in nodes:
            await node.started()
        return nodes

    async def dispatch_all(self, client: Any, urls: List[str], target: str, count: int) -> List[str]:
        """Dispatch ``count`` webhooks round-robin over ``urls``; a 503 is tried again (it stored nothing)."""
        limit = DeferredSemaphore(32)

        async def one(n: int) -> str:
            while True:
                response = await client.post(
                    f"{urls[n % len(urls)]}/dispatch?_url={quote(f'{target}/{n}')}",
                    data=json.dumps({"n": n}).encode(), headers={"Content-Type": ["application/json"]},
                )
                body = await response.content()
                if response.code == 202:
                    return str(json.loads(body)["id"])
                self.assertEqual(response.code, 503, body)

        return await gatherResults([limit.run(lambda n=n: ensureDeferred(one(n))) for n in range(count)])

    def test_dispatches_spread_over_two_nodes_arrive_once_each(self) -> None:
        async def go() -> None:
            client = http_client(self)
            sink, target = listen_sink(self)
            a, b = await self.nodes()
            count = 10_000
            await self.dispatch_all(client, [a.url, b.url], target, count)
            await sink.wait_for(count, timeout=120)
            arrived = Counter(r.path for r in sink.received)
            self.assertEqual(set(arrived), {f"/{n}" for n in range(count)})
            duplicates = sum(arrived.values()) - len(arrived)
            self.assertEqual(duplicates, 0)

            async def delivered_by(node: HookahProcess) -> float:
                response = await client.get(node.url + "/metrics")
                text = (await response.content()).decode()
                return sum(
                    float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith('hookah_delivery_attempts_total{result="2xx"}')
                )

            # Both nodes did a share of the work.
            self.assertGreater(await delivered_by(a), 0)
            self.assertGreater(await delivered_by(b), 0)

        return ensureDeferred(go())

    def test_claims_of_a_killed_node_are_delivered_by_the_other(self) -> None:
        async def go() -> None:
            client = http_client(self)
            sink, target = listen_sink(self)
            # The first attempts hang: node A holds their claims when it dies.
            sink.respond = lambda r: None
            a, b = await self.nodes()
            held = 20
            ids = await self.dispatch_all(client, [a.url], target, held)
            await sink.wait_for(held, timeout=60)
            a.kill()
            sink.respond = lambda r: (200, {}, b"ok")
            started = self.clock()

            async def all_delivered() -> bool:
                response = await client.get(f"{b.url}/dispatch?status=delivered&limit=100")
                body = json.loads(await response.content())
                return len(body["deliveries"]) == held

            await poll("B to deliver A's claims", all_delivered, timeout=LEASE + REAPER + 20, interval=0.2)
            took = self.clock() - started
            self.assertLess(took, LEASE + REAPER + 10)
            answered = [r for r in sink.received[held:]]
            self.assertEqual(sorted(r.path for r in answered), sorted(f"/{n}" for n in range(held)))
            # Each was sent twice at most: once by A (its outcome lost), once by B.
            self.assertLessEqual(len(sink.received), 2 * held)
            self.assertEqual(len(ids), held)

        return ensureDeferred(go())

    def test_postgresql_restart_loses_nothing_acknowledged(self) -> None:
        async def go() -> None:
            client = http_client(self)
            sink, target = listen_sink(self)
            a, b = await self.nodes()
            count = 400
            restarted = []

            async def restart_midway() -> None:
                await sink.wait_for(count // 4, timeout=60)
                pgsupport.cluster().restart()
                restarted.append(True)

            sending = ensureDeferred(self.dispatch_all(client, [a.url, b.url], target, count))
            await gatherResults([sending, ensureDeferred(restart_midway())])
            self.assertEqual(restarted, [True])
            await sink.wait_for(count, timeout=120)

            async def everything_arrived() -> bool:
                return {r.path for r in sink.received} == {f"/{n}" for n in range(count)}

            await poll("every acknowledged dispatch to arrive", everything_arrived, timeout=60)

        return ensureDeferred(go())

    @staticmethod
    def clock() -> float:
        from twisted.internet import reactor

        return float(reactor.seconds())  # type: ignore[attr-defined]
