"""
``render_async``: an asynchronous answer to a client that is still there is
written and finished; to one that left meanwhile it is dropped quietly (no
write to a lost connection, nothing logged), as the request learns from
its channel's ``connectionLost``.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import server

from hookah.web.common import JsonResource, json_body, make_site, render_async


class Slow(JsonResource):
    """Answers GET once the test fires the Deferred in ``waiting``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: List[Deferred] = []
        self.answered = 0

    def render_GET(self, request: server.Request) -> Any:
        async def handler() -> bytes:
            d: Deferred = Deferred()
            self.waiting.append(d)
            await d
            self.answered += 1
            return json_body(request, 200, {"ok": True})

        return render_async(request, handler)


class RenderAsyncTests(TestCase):
    def connect(self, resource: Slow) -> Any:
        site = make_site(resource, 1024, Clock())
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        return protocol, transport

    def test_answer_to_a_client_still_there(self) -> None:
        resource = Slow()
        protocol, transport = self.connect(resource)
        resource.waiting.pop().callback(None)
        self.assertEqual(resource.answered, 1)
        self.assertIn(b'HTTP/1.1 200 OK', transport.value())
        self.assertIn(b'{"ok":true}\n', transport.value())

    def test_answer_to_a_client_that_left_is_dropped(self) -> None:
        resource = Slow()
        protocol, transport = self.connect(resource)
        protocol.connectionLost(Failure(ConnectionDone()))
        transport.clear()
        resource.waiting.pop().callback(None)
        self.assertEqual(resource.answered, 1)
        self.assertEqual(transport.value(), b"")
        # Nothing logged: trial fails a test that logs an error.
