"""
The seams between Hookah's parts are zope.interface interfaces: the real
providers and the test doubles that stand in for them must both provide
them, or a test would exercise a part against something production never
passes it.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from zope.interface.verify import verifyClass, verifyObject

from hookah.outbound.agent import HTTPClient
from hookah.outbound.interface import IHTTPClient
from tests.support import FakeClient
from tests.websubsupport import ScriptedClient


class HTTPClientInterfaceTests(SynchronousTestCase):
    def test_the_real_client(self) -> None:
        clock = Clock()
        self.assertTrue(verifyClass(IHTTPClient, HTTPClient))
        self.assertTrue(verifyObject(IHTTPClient, HTTPClient(Agent(clock), clock)))  # type: ignore[arg-type]

    def test_the_test_doubles(self) -> None:
        self.assertTrue(verifyObject(IHTTPClient, FakeClient(Clock())))
        self.assertTrue(verifyObject(IHTTPClient, ScriptedClient()))
