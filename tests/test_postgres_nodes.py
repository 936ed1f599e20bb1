"""
Several Hookah services on one PostgreSQL database, in this process: work
dispatched through one node reaches its target once, from either node;
a PostgreSQL outage answers 503 (never a 202 that was not committed) and
the nodes carry on by themselves once it is back.

The real two-process runs (SIGKILL of a node, restarts) are in
``tests/test_e2e_postgres.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Dict, List, Tuple
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from hookah.streams.parse import parser_for

from hookah.storage.interface import StorageUnavailable
from tests import pgsupport
from tests.pgsupport import fresh_database
from tests.streamwire import ResponseReader
from tests.support import http_client, listen_sink, poll, start_hookah


class NodesTestCase(TestCase):
    async def node(self, url: str, **overrides: Any) -> Tuple[Any, str]:
        return await start_hookah(self, storage=url, **overrides)

    async def post(self, base: str, query: str, body: bytes = b"{}") -> Tuple[int, Any, Dict[str, Any]]:
        response = await self.client.post(
            base + "/dispatch?" + query, data=body, headers={"Content-Type": ["application/json"]}
        )
        return response.code, response.headers, json.loads(await response.content())

    async def get(self, base: str, path: str) -> Tuple[int, Dict[str, Any]]:
        response = await self.client.get(base + path)
        return response.code, json.loads(await response.content())


class TwoNodesTests(NodesTestCase):
    def test_dispatches_through_both_nodes_each_arrive_once(self) -> None:
        async def go() -> None:
            self.client = http_client(self)
            url = fresh_database(self)
            sink, target = listen_sink(self)
            (a, base_a), (b, base_b) = await self.node(url), await self.node(url)
            count = 60
            answers = await gatherResults([
                ensureDeferred(self.post(base_a if i % 2 else base_b, f"_url={quote(target)}/{i}", b'{"n": %d}' % i))
                for i in range(count)
            ])
            self.assertEqual([code for code, _, _ in answers], [202] * count)
            await sink.wait_for(count, timeout=30)
            paths = Counter(r.path for r in sink.received)
            self.assertEqual(sorted(paths), sorted(f"/{i}" for i in range(count)))
            self.assertEqual(set(paths.values()), {1})
            # Either node tells the outcome of a delivery the other accepted.
            async def delivered() -> bool:
                code, delivery = await self.get(base_a, f"/dispatch/{answers[0][2]['id']}")
                return delivery["status"] == "delivered"

            await poll("the outcome", delivered)
            self.assertEqual(a.metrics.claims_lost._value.get() + b.metrics.claims_lost._value.get(), 0)

        return ensureDeferred(go())

    def test_scheduled_work_of_a_stopped_node_is_delivered_by_the_other(self) -> None:
        async def go() -> None:
            self.client = http_client(self)
            url = fresh_database(self)
            sink, target = listen_sink(self)
            (a, base_a), (_, base_b) = await self.node(url), await self.node(url)
            # Accepted by A, due in a moment: A is gone by then, B delivers.
            code, _, body = await self.post(base_a, f"_url={quote(target)}/later&_delay=1")
            self.assertEqual(code, 202)
            await a.stopService()
            [received] = await sink.wait_for(1, timeout=20)
            self.assertEqual(received.path, "/later")
            async def delivered() -> bool:
                code, delivery = await self.get(base_b, f"/dispatch/{body['id']}")
                return delivery["status"] == "delivered"

            await poll("B to record the outcome", delivered)

        return ensureDeferred(go())


class OutageTests(NodesTestCase):
    def test_postgresql_down_answers_503_and_the_node_recovers_by_itself(self) -> None:
        async def go() -> None:
            self.client = http_client(self)
            url = fresh_database(self)
            sink, target = listen_sink(self)
            node, base = await self.node(url)
            code, _, first = await self.post(base, f"_url={quote(target)}/before")
            self.assertEqual(code, 202)

            async def recorded() -> bool:
                code, delivery = await self.get(base, f"/dispatch/{first['id']}")
                return delivery["status"] == "delivered"

            await poll("the first delivery to be recorded", recorded)
            cluster = pgsupport.cluster()
            cluster.stop()
            try:
                code, health = await self.get(base, "/healthz")
                self.assertEqual((code, health["error"]), (503, "storage_unavailable"))
                self.assertIn("PostgreSQL", health["message"])
                code, headers, body = await self.post(base, f"_url={quote(target)}/during")
                self.assertEqual((code, body["error"]), (503, "storage_unavailable"))
                self.assertEqual(headers.getRawHeaders("retry-after"), ["5"])
            finally:
                cluster.start()

            async def healthy() -> bool:
                code, _ = await self.get(base, "/healthz")
                return code == 200

            await poll("the node to reconnect", healthy, timeout=30, interval=0.2)
            code, _, _ = await self.post(base, f"_url={quote(target)}/after")
            self.assertEqual(code, 202)
            received = await sink.wait_for(2, timeout=20)
            self.assertEqual([r.path for r in received], ["/before", "/after"])
            # The outage was logged (claims, retention) while it lasted.
            self.flushLoggedErrors(StorageUnavailable)

        return ensureDeferred(go())


class StreamClient(Protocol):
    """A raw ``/stream`` reader on a real socket: the messages as they arrive."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.response = ResponseReader()
        self.parser = parser_for("json")
        self.messages: List[Any] = []
        # Control messages (no id): the gap notice, the error before a close.
        self.notices: List[Any] = []
        self._waiters: List[Tuple[int, Deferred]] = []

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        body = self.response.feed(data)
        if body:
            for m in self.parser.feed(body):
                (self.messages if isinstance(m, dict) and "id" in m else self.notices).append(m)
        for count, d in list(self._waiters):
            if len(self.messages) >= count:
                self._waiters.remove((count, d))
                d.callback(self.messages)

    def wait_for(self, count: int, timeout: float = 20.0) -> Deferred:
        if len(self.messages) >= count:
            return succeed(self.messages)
        d: Deferred = Deferred()
        self._waiters.append((count, d))
        return d.addTimeout(timeout, reactor)

    def ids(self) -> List[str]:
        return [m["id"] for m in self.messages]


async def open_stream(testcase: TestCase, base: str, topic: str, last_event_id: str = "") -> StreamClient:
    port = int(base.rsplit(":", 1)[1])
    extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    client = StreamClient(
        f"GET /stream?topic={topic}&format=json HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()
    )
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    protocol = await connectProtocol(endpoint, client)
    testcase.addCleanup(lambda: protocol.transport.loseConnection())
    await poll("the stream to open", lambda: client.response.status == 200)
    return client


class StreamsAcrossNodesTests(NodesTestCase):
    def test_a_stream_on_one_node_gets_events_published_on_the_other_in_order(self) -> None:
        async def go() -> None:
            self.client = http_client(self)
            url = fresh_database(self)
            (a, base_a), (b, base_b) = await self.node(url), await self.node(url)
            await poll("both listening", lambda: a.store.listener.backend_pid and b.store.listener.backend_pid)
            reader = await open_stream(self, base_b, "orders")
            ids: List[str] = []
            for n in range(10):
                code, _, body = await self.post(base_a if n % 3 else base_b, "_topic=orders", b'{"n": %d}' % n)
                self.assertEqual(code, 202)
                ids.append(body["id"])
            await reader.wait_for(10)
            self.assertEqual(reader.ids(), ids)
            # B's listening connection dies; what A publishes meanwhile arrives all the same.
            pid = b.store.listener.backend_pid
            pgsupport.cluster().admin(f"SELECT pg_terminate_backend({pid})")
            for n in range(10, 20):
                code, _, body = await self.post(base_a, "_topic=orders", b'{"n": %d}' % n)
                ids.append(body["id"])
            await reader.wait_for(20)
            self.assertEqual(reader.ids(), ids)
            # The reader moves to A and resumes exactly where it was.
            moved = await open_stream(self, base_a, "orders", last_event_id=ids[14])
            await moved.wait_for(5)
            self.assertEqual(moved.ids(), ids[15:])

        return ensureDeferred(go())

    def test_a_reader_whose_resume_point_left_the_history_is_told_first(self) -> None:
        async def go() -> None:
            self.client = http_client(self)
            url = fresh_database(self)
            (_, base_a), (_, base_b) = await self.node(url, history_count=3), await self.node(url, history_count=3)
            ids = []
            for n in range(5):
                code, _, body = await self.post(base_a, "_topic=news", b'{"n": %d}' % n)
                ids.append(body["id"])
            late = await open_stream(self, base_b, "news", last_event_id=ids[0])
            await late.wait_for(3)
            self.assertEqual(late.ids(), ids[2:])
            self.assertEqual([(n["gap"], n["last_event_id"]) for n in late.notices], [(True, ids[0])])
            recent = await open_stream(self, base_b, "news", last_event_id=ids[3])
            await recent.wait_for(1)
            self.assertEqual(recent.ids(), ids[4:])
            self.assertEqual(recent.notices, [])

        return ensureDeferred(go())
