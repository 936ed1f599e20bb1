"""
``WebPort``, the service that listens for HTTP: it says when it listens
(even to one who asked before it started), says why when it cannot, and
closes its port when stopped; and ``HookahService`` fails its start when the
port is taken.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from hookah.app import HookahService
from hookah.config import Config
from hookah.web.common import make_site
from hookah.web.listener import WebPort


def taken_port(testcase: TestCase) -> int:
    """A loopback port another socket listens on."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    testcase.addCleanup(taken.close)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    return int(taken.getsockname()[1])


class WebPortTests(TestCase):
    def web_port(self, port: int = 0) -> WebPort:
        site = make_site(Resource(), 1024, reactor)
        return WebPort(TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), site)

    def test_listening_asked_before_the_start(self) -> Deferred:
        async def go() -> None:
            web = self.web_port()
            asked = web.listening()
            self.assertFalse(asked.called)
            web.startService()
            port: Any = await asked
            again: Any = await web.listening()
            self.assertIs(again, port)
            number = port.getHost().port
            connected = await TCP4ClientEndpoint(reactor, "127.0.0.1", number).connect(Factory.forProtocol(Protocol))
            connected.transport.loseConnection()
            await web.stopService()
            self.assertFalse(web.running)
            with self.assertRaises(ConnectionRefusedError):
                await TCP4ClientEndpoint(reactor, "127.0.0.1", number).connect(Factory.forProtocol(Protocol))

        return ensureDeferred(go())

    def test_a_taken_port_is_reported(self) -> Deferred:
        async def go() -> None:
            number = taken_port(self)
            web = self.web_port(number)
            asked = web.listening()
            web.startService()
            with self.assertRaises(CannotListenError):
                await asked
            with self.assertRaises(CannotListenError):
                await web.listening()
            await web.stopService()

        return ensureDeferred(go())

    def test_service_start_fails_on_a_taken_port(self) -> Deferred:
        async def go() -> None:
            number = taken_port(self)
            service = HookahService(Config(listen=f"tcp:{number}:interface=127.0.0.1", storage="memory:"), reactor)
            service.startService()
            self.addCleanup(service.stopService)
            with self.assertRaises(CannotListenError):
                await service.listening()
            # The failure was logged as the start's ("hookah could not start").
            self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)

        return ensureDeferred(go())
