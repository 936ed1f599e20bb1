"""
History readers that do not read cost a bounded amount of memory (issue 13,
part 1), measured on a real ``twistd hookah`` child through ``/proc``.

The issue's case was 300 events of 1 MB and four stalled readers holding
+1.15 GB. Here the history is 96 events of 256 KB (24 MB): a reader that
pinned the history, or an answer built whole, would hold 24 MB or more
each, so seven such readers would add well over 100 MB; read a page at a
time under back-pressure they add a few MB each.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from typing import Any, List

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hookah.model import Event
from tests.support import poll, start_hookah, temp_dir
from tests.test_e2e_durability import HookahProcess

EVENTS = 96
EVENT_SIZE = 256 * 1024
READERS_PER_MB = 3  # what each stalled reader may add, in MB


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc status")


def stalled_reader(port: int, path: str, headers: str = "") -> socket.socket:
    """A connection with a tiny receive buffer that asks for ``path`` and never reads."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    return s


class StalledHistoryReaderTests(TestCase):
    def test_stalled_history_readers_hold_a_page_each_and_let_go(self) -> None:
        async def go() -> None:
            directory = temp_dir(self)
            hookah = HookahProcess(self, directory, ["--storage", f"sqlite:{os.path.join(directory, 'h.db')}"])
            base = await hookah.started()
            port = int(base.rsplit(":", 1)[1])
            pid = hookah.process.pid

            def get(path: str) -> bytes:
                with urllib.request.urlopen(base + path, timeout=60) as r:
                    return bytes(r.read())

            def publish() -> List[str]:
                ids = []
                for i in range(EVENTS):
                    body = bytes([i % 256]) * EVENT_SIZE
                    request = urllib.request.Request(
                        base + "/dispatch?_topic=big", data=body, headers={"Content-Type": "application/octet-stream"}
                    )
                    with urllib.request.urlopen(request, timeout=60) as r:
                        ids.append(json.loads(r.read())["id"])
                return ids

            ids = await deferToThread(publish)
            # Warm up every path once with readers that read it all.
            whole = await deferToThread(get, "/topics/big/events?limit=1000")
            self.assertGreater(len(whole), 4 * 1024 * 1024)
            self.assertIsNotNone(json.loads(whole)["next"])  # the answer stopped at its byte bound
            await deferToThread(get, "/healthz")
            before = rss_mb(pid)

            readers = [
                stalled_reader(port, f"/stream?topic=big&count={EVENTS}"),
                stalled_reader(port, f"/stream?topic=big&count={EVENTS}&format=sse"),
                stalled_reader(port, f"/stream?topic=big&count={EVENTS}&delimited=length"),
                stalled_reader(port, f"/stream?topic=big&count={EVENTS}"),
                stalled_reader(port, "/stream?topic=big", f"Last-Event-ID: {ids[0]}\r\n"),
                stalled_reader(port, "/topics/big/events?limit=1000"),
                stalled_reader(port, "/topics/big/events?limit=1000"),
            ]
            try:

                def streams_open() -> bool:
                    metrics = get("/metrics").decode()
                    return "hookah_open_streams 5.0" in metrics

                await poll("the five streams to open", lambda: deferToThread(streams_open), timeout=60)
                # Storage answers in order: once these have come back, so
                # have the history queries asked before them.
                for _ in range(3):
                    await deferToThread(get, "/topics")
                during = rss_mb(pid)
            finally:
                for reader in readers:
                    reader.close()
            await poll("the streams to close", lambda: deferToThread(lambda: "hookah_open_streams 0.0" in get("/metrics").decode()), timeout=60)
            await deferToThread(get, "/topics")
            after = rss_mb(pid)
            growth = during - before
            self.assertLess(
                growth, len(readers) * READERS_PER_MB,
                f"{len(readers)} stalled readers of a {EVENTS * EVENT_SIZE // 2**20} MB history grew RSS "
                f"from {before:.1f} to {during:.1f} MB",
            )
            self.assertLess(after - before, len(readers) * READERS_PER_MB, f"RSS {before:.1f} -> {after:.1f} MB after the readers left")

        return ensureDeferred(go())


class TopicHistoryAnswerTests(TestCase):
    def test_answer_read_in_several_queries_is_whole_and_in_order(self) -> None:
        async def go() -> None:
            service, base = await start_hookah(self)
            events = [service.core.new_id() for _ in range(250)]
            for i, event_id in enumerate(events):
                await service.store.add_event(
                    Event(id=event_id, topic="t", body=b'{"n": %d}' % i, content_type="application/json", created_at=float(i)),
                    [], 1000, -1.0,
                )

            def get(path: str) -> Any:
                with urllib.request.urlopen(base + path, timeout=60) as r:
                    return json.loads(r.read())

            whole = await deferToThread(get, "/topics/t/events?limit=1000")
            self.assertEqual([e["id"] for e in whole["events"]], events)
            self.assertIsNone(whole["next"])
            page = await deferToThread(get, f"/topics/t/events?limit=120&after={events[9]}")
            self.assertEqual([e["id"] for e in page["events"]], events[10:130])
            self.assertEqual(page["next"], events[129])
            self.assertEqual([e["data"]["n"] for e in page["events"]], list(range(10, 130)))

        return ensureDeferred(go())
