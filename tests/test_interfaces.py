"""
The seams between Hookah's parts are zope.interface interfaces: the real
providers and the test doubles that stand in for them must both provide
them, or a test would exercise a part against something production never
passes it.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from hookah.delivery.dispatcher import Dispatcher
from hookah.listeners import IDeliveryOutcomeListener, IDueDeliveryListener, IEventListener
from hookah.outbound.client import HTTPClient
from hookah.outbound.interface import IHTTPClient
from hookah.outbound.ssrf import GuardedEndpointFactory
from hookah.storage.memory import MemoryStore
from hookah.streams.registry import TopicRegistry
from hookah.urls import AddressPolicy
from hookah.websub.subscriptions import WebSubHub
from tests.support import FakeClient
from tests.websubsupport import ScriptedClient


class HTTPClientInterfaceTests(SynchronousTestCase):
    def test_the_real_client(self) -> None:
        clock = Clock()
        self.assertTrue(verifyClass(IHTTPClient, HTTPClient))
        self.assertTrue(verifyObject(IHTTPClient, HTTPClient(clock, GuardedEndpointFactory(clock, AddressPolicy()))))

    def test_the_test_doubles(self) -> None:
        self.assertTrue(verifyObject(IHTTPClient, FakeClient(Clock())))
        self.assertTrue(verifyObject(IHTTPClient, ScriptedClient()))


class ListenerInterfaceTests(SynchronousTestCase):
    """The parts that hear of each other's events provide the interfaces they are wired by."""

    def test_providers(self) -> None:
        clock = Clock()
        store = MemoryStore(clock)
        client = FakeClient(clock)
        self.assertTrue(verifyObject(IEventListener, TopicRegistry(clock, 30.0)))
        self.assertTrue(verifyObject(IDeliveryOutcomeListener, WebSubHub(store, client, clock)))
        self.assertTrue(verifyObject(IDueDeliveryListener, Dispatcher(store, client, clock, lambda: "D", (5,))))
