"""
The abuse suite's malformed request heads (``bench/abuse.py``, ``HEADS``)
as a regression test on real loopback sockets: each is answered with a
status below 500, or closed, within a bound; nothing reaches storage; the
service stays healthy.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import ROOT, start_hookah

BENCH = os.path.join(ROOT, "bench")


def load_abuse() -> Any:
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location("abuse", os.path.join(BENCH, "abuse.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class MalformedHeadTests(TestCase):
    def test_every_malformed_head_is_answered_or_closed(self) -> None:
        abuse = load_abuse()

        async def go() -> None:
            service, base = await start_hookah(self, max_body=abuse.MAX_BODY, head_timeout=2)
            port = int(base.rsplit(":", 1)[1])
            sink = "http://127.0.0.1:9/hook"
            self.assertGreaterEqual(len(abuse.HEADS), 30)
            for name, head in abuse.HEADS:
                status, received, how = await deferToThread(abuse.exchange, port, abuse.head_bytes(head, sink), 15.0)
                self.assertNotEqual((status, how), (None, "no answer in time"), name)
                self.assertIn(how, ("answered", "closed", "reset"), (name, how))
                if status is not None:
                    self.assertLess(status, 500, (name, received[:200]))
                    if status >= 400:
                        self.assertIn(b"\r\nServer: hookah\r\n", received, name)
            counts = await service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 0)
            status, _, _ = await deferToThread(abuse.exchange, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 10.0)
            self.assertEqual(status, 200)

        return ensureDeferred(go())
