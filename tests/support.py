"""
Shared test fixtures: a Hookah service on a real loopback port, and a sink
that records what Hookah sends it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource

from hookah.app import HookahService
from hookah.config import Config
from hookah.web.common import HookahSite


def http_client(testcase: TestCase) -> Any:
    """A treq client with its own connection pool, closed when the test ends."""
    import treq.client
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    testcase.addCleanup(pool.closeCachedConnections)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))


@attr.s(auto_attribs=True)
class Received:
    method: str
    path: str  # with query string
    headers: Dict[str, List[str]]  # lower-cased names
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


class Sink(Resource):
    """
    Records every request. ``respond`` decides the answer: a function of the
    ``Received`` returning (code, headers, body), or ``None`` to never answer.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: List[Received] = []
        self.respond: Callable[[Received], Optional[Tuple[int, Dict[str, str], bytes]]] = lambda r: (200, {}, b"ok")
        self._waiters: List[Tuple[int, Deferred]] = []
        self.hanging: List[server.Request] = []

    def render(self, request: server.Request) -> Any:
        headers = {
            k.decode().lower(): [v.decode("latin-1") for v in vs]
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        received = Received(request.method.decode(), request.uri.decode(), headers, request.content.read())
        self.received.append(received)
        for count, d in list(self._waiters):
            if len(self.received) >= count:
                self._waiters.remove((count, d))
                d.callback(self.received)
        answer = self.respond(received)
        if answer is None:
            self.hanging.append(request)
            return server.NOT_DONE_YET
        code, extra, body = answer
        request.setResponseCode(code)
        for name, value in extra.items():
            request.setHeader(name, value)
        return body

    def wait_for(self, count: int, timeout: float = 10.0) -> Deferred:
        """Deferred[List[Received]] once ``count`` requests have arrived."""
        if len(self.received) >= count:
            return succeed(self.received)
        d: Deferred = Deferred()
        self._waiters.append((count, d))
        d.addTimeout(timeout, reactor)
        return d


def listen_sink(testcase: TestCase, sink: Optional[Sink] = None) -> Tuple[Sink, str]:
    """Serve a ``Sink`` on 127.0.0.1; returns it and its base URL."""
    sink = sink or Sink()
    site = HookahSite(sink)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def stop() -> None:
        await port.stopListening()
        await site.close_connections()

    testcase.addCleanup(lambda: ensureDeferred(stop()))
    return sink, f"http://127.0.0.1:{port.getHost().port}"


async def start_hookah(testcase: TestCase, **overrides: Any) -> Tuple[HookahService, str]:
    """A running HookahService on a loopback port (memory storage unless told)."""
    settings: Dict[str, Any] = dict(
        listen="tcp:0:interface=127.0.0.1", storage="memory:", allow_private_targets=True
    )
    settings.update(overrides)
    service = HookahService(Config(**settings), reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    port = await service.listening()
    return service, f"http://127.0.0.1:{port.getHost().port}"
