"""
A receiver that is down for two seconds, over real sockets: Hookah in this
process on a loopback port, a receiver whose port refuses connections until
it starts listening there.

Every wait polls against a deadline. The one timed wait is the outage
itself (two seconds of refused connections, the scenario under test); the
bound on delivery after the receiver's return is generous (the retry
interval is under a second, the bound fifteen).
"""

from __future__ import annotations

import json
import time
from typing import Any, List
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.support import http_client, listen_sink, poll, start_hookah
from tests.test_e2e_durability import reserve_port, treq_json

COUNT = 40
OUTAGE = 2.0
AFTER_RETURN = 15.0  # "within a few seconds", with slack for a loaded machine
WAIT = 60.0


class ShortOutageTests(TestCase):
    timeout = 120

    def test_forty_webhooks_arrive_soon_after_a_two_second_outage(self) -> Deferred:
        return ensureDeferred(self._outage())

    async def _outage(self) -> None:
        service, base = await start_hookah(self, retry_schedule=(0.2, 0.4, 0.8))
        reserved = reserve_port(self)
        port = reserved.getsockname()[1]
        target = f"http://127.0.0.1:{port}/hook"
        client = http_client(self)

        async def dispatch(n: int) -> str:
            response = await client.post(
                f"{base}/dispatch?_url={quote(target, safe='')}&_retries=40",
                data=json.dumps({"n": n}).encode(),
                headers={b"Content-Type": [b"application/json"]},
            )
            body = await response.content()
            self.assertEqual(response.code, 202, body)
            return str(json.loads(body)["id"])

        down_at = time.monotonic()
        ids: List[str] = await gatherResults([ensureDeferred(dispatch(n)) for n in range(COUNT)])

        async def replies() -> List[Any]:
            return list(await gatherResults([ensureDeferred(treq_json(client, f"{base}/dispatch/{i}")) for i in ids]))

        async def all_refused_twice() -> bool:
            return all(len(r["attempts"]) >= 2 for r in await replies())

        await poll("every delivery to be refused twice", all_refused_twice, WAIT, interval=0.1)
        # While the receiver is down each delivery says it waits for its own
        # retry schedule: a burst of refusals does not pause the host.
        for reply in await replies():
            self.assertIn(reply["status"], ("scheduled", "delivering"), reply)
            if reply["status"] == "scheduled":
                self.assertIn(reply["waiting"]["reason"], ("retry", "due"), reply)
            else:
                self.assertIsNone(reply["waiting"], reply)
            self.assertTrue(all(a["status_code"] is None for a in reply["attempts"]), reply)
        left = OUTAGE - (time.monotonic() - down_at)
        if left > 0:
            await deferLater(reactor, left, lambda: None)  # the rest of the outage

        reserved.close()
        sink, _ = listen_sink(self, port=port)
        up_at = time.monotonic()
        expected = {json.dumps({"n": n}).encode() for n in range(COUNT)}
        await poll(f"all {COUNT} webhooks at the receiver", lambda: {r.body for r in sink.received} >= expected, WAIT)
        took = time.monotonic() - up_at
        self.assertLessEqual(took, AFTER_RETURN, f"the last webhook arrived {took:.1f}s after the receiver's return")

        async def all_delivered() -> bool:
            return all(r["status"] == "delivered" and r["waiting"] is None for r in await replies())

        await poll("every delivery to say delivered", all_delivered, WAIT, interval=0.1)
