"""
The SSRF guard: which addresses ``AddressPolicy`` (``hookah.urls``) refuses,
a refused literal at submission (``400`` from a running service), and a
hostname that resolves to a private address, refused at connect time by
``GuardedEndpointFactory`` and failed by the dispatcher at once, without
retries. Other spellings of refused addresses: tests/test_urls.py.
"""

from __future__ import annotations

import json
from typing import List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.internet.protocol import Factory, Protocol

from hookah.delivery.dispatcher import Dispatcher
from hookah.outbound.client import HTTPClient
from hookah.ids import IdGenerator
from hookah.model import DELIVERED, FAILED, Delivery
from hookah.outbound.ssrf import GuardedEndpointFactory
from hookah.storage.memory import MemoryStore
from hookah.urls import AddressPolicy, TargetRefused
from tests.support import FakeResolver, http_client, listen_sink, start_hookah, submit

# (address, the word the refusal must contain); None: a public address, allowed.
ADDRESSES: List[Tuple[str, object]] = [
    ("127.0.0.1", "loopback"),
    ("127.254.1.2", "loopback"),
    ("10.0.0.1", "private"),
    ("10.255.255.254", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.0.1", "private"),
    ("192.168.255.254", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("169.254.0.1", "link-local"),
    ("::1", "loopback"),
    ("fc00::1", "private"),
    ("fd00:ec2::254", "private"),
    ("fdff:ffff::1", "private"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("febf::1", "link-local"),
    ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("2002:7f00:1::1", "6to4"),  # tunnelled to 127.0.0.1
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("100.64.0.1", "non-public"),  # carrier-grade NAT
    ("192.0.2.10", "address"),  # documentation
    ("240.0.0.1", "address"),
    ("255.255.255.255", "address"),
    # Public: allowed.
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("93.184.216.34", None),
    ("172.15.255.255", None),  # just below 172.16/12
    ("172.32.0.1", None),  # just above it
    ("192.169.0.1", None),
    ("2606:4700:4700::1111", None),
    ("2a00:1450:4001:81b::200e", None),
    ("::ffff:8.8.8.8", None),
    ("2002:808:808::1", None),  # 6to4 of a public address
]


class AddressPolicyTests(TestCase):
    def test_table(self) -> None:
        policy = AddressPolicy()
        for address, kind in ADDRESSES:
            reason = policy.refusal(address)
            if kind is None:
                self.assertIsNone(reason, address)
            else:
                self.assertIsNotNone(reason, address)
                self.assertIn(str(kind), reason, address)

    def test_mapped_address_is_judged_by_the_ipv4_inside(self) -> None:
        self.assertIn("127.0.0.1 is a loopback address", AddressPolicy().refusal("::ffff:127.0.0.1") or "")

    def test_not_an_address(self) -> None:
        self.assertIn("not an IP address", AddressPolicy().refusal("example.com") or "")

    def test_allow_private_allows_everything(self) -> None:
        policy = AddressPolicy(allow_private=True)
        for address, _ in ADDRESSES:
            self.assertIsNone(policy.refusal(address), address)

    def test_allowed_networks(self) -> None:
        policy = AddressPolicy(allowed_networks=["10.0.0.0/8", "fd00::/8", "127.0.0.1/32"])
        for allowed in ("10.0.0.1", "10.200.3.4", "::ffff:10.9.9.9", "fd12::1", "127.0.0.1"):
            self.assertIsNone(policy.refusal(allowed), allowed)
        for refused in ("127.0.0.2", "192.168.0.1", "172.16.0.1", "169.254.169.254", "fc00::1", "::1"):
            self.assertIsNotNone(policy.refusal(refused), refused)
        # Public addresses stay allowed.
        self.assertIsNone(policy.refusal("8.8.8.8"))

    def test_literal_refusal_of_urls(self) -> None:
        policy = AddressPolicy()
        for url in (
            "http://127.0.0.1/hook",
            "https://10.0.0.1:8443/x",
            "http://[::1]:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://localhost:8080/",
            "http://api.localhost/",
            "http://0.0.0.0/",
        ):
            self.assertIsNotNone(policy.literal_refusal(url), url)
        # Names are judged when resolved, at connect time; public literals pass.
        for url in ("http://example.com/", "https://8.8.8.8/", "http://[2606:4700:4700::1111]/"):
            self.assertIsNone(policy.literal_refusal(url), url)
        self.assertIsNone(AddressPolicy(allow_private=True).literal_refusal("http://127.0.0.1/"))
        self.assertIsNone(AddressPolicy(allowed_networks=["127.0.0.0/8"]).literal_refusal("http://127.0.0.1/"))


def guarded_client(testcase: TestCase, clock, policy: AddressPolicy, resolve: FakeResolver) -> HTTPClient:
    """The production shape of the outgoing client, with an injected resolver."""
    endpoints = GuardedEndpointFactory(reactor, policy, resolve=resolve, connect_timeout=5)
    client = HTTPClient(clock, endpoints)
    testcase.addCleanup(client.close)
    return client


async def wait_for_status(store: MemoryStore, delivery_id: str, statuses, timeout: float = 10.0) -> Delivery:
    """Poll the store (real time, bounded) until the delivery reaches one of ``statuses``."""
    waited = 0.0
    while True:
        delivery = await store.get_delivery(delivery_id)
        if delivery is not None and delivery.status in statuses:
            return delivery
        if waited >= timeout:
            raise AssertionError(f"delivery {delivery_id} still {delivery and delivery.status} after {timeout}s")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class ResolvedToPrivateTests(TestCase):
    def test_endpoint_refuses_a_name_resolving_to_a_private_address(self) -> None:
        resolve = FakeResolver("10.0.0.5")
        policy = AddressPolicy()
        client = guarded_client(self, Clock(), policy, resolve)
        d = client.request("POST", "http://internal.example.test:8080/hook", (), b"{}", 5)
        failure = self.failureResultOf(d, TargetRefused)
        self.assertEqual(resolve.asked, [("internal.example.test", 8080)])
        message = str(failure.value)
        self.assertIn("internal.example.test", message)
        self.assertIn("10.0.0.5 is a private address", message)
        self.assertIn("SSRF", message)

    def test_literal_refused_without_resolving(self) -> None:
        resolve = FakeResolver("8.8.8.8")
        client = guarded_client(self, Clock(), AddressPolicy(), resolve)
        self.failureResultOf(client.request("POST", "http://127.0.0.1:9/", (), b"", 5), TargetRefused)
        # IPv6 literals, at the endpoint itself (treq cannot encode them into a request).
        endpoints = GuardedEndpointFactory(reactor, AddressPolicy(), resolve=resolve)
        for scheme, host, port in (("http", "::1", 9), ("http", "::ffff:127.0.0.1", 9), ("https", "fe80::1", 9), ("http", "fd00::5", 80)):
            endpoint = endpoints.endpoint_for(scheme, host, port)
            failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)), TargetRefused)
            self.assertIn("SSRF", str(failure.value))
        self.assertEqual(resolve.asked, [])

    def test_dispatcher_fails_the_delivery_at_once_without_retries(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        store = MemoryStore(clock)
        client = guarded_client(self, clock, AddressPolicy(), FakeResolver("10.0.0.5"))
        dispatcher = Dispatcher(
            store, client, clock, IdGenerator(clock.seconds), (5, 30, 120), timeout=10, rand=lambda: 0.5
        )
        dispatcher.startService()
        self.addCleanup(dispatcher.stopService)
        delivery = Delivery(
            id="D1", url="http://rebind.example.test/hook", body=b"{}", created_at=clock.seconds(),
            errback="http://8.8.8.8/errback",
        )
        self.successResultOf(submit(dispatcher, [delivery]))
        stored = self.successResultOf(store.get_delivery("D1"))
        self.assertEqual(stored.status, FAILED)
        self.assertEqual(len(stored.attempts), 1)
        self.assertIsNone(stored.attempts[0].status_code)
        self.assertIn("refused by the SSRF guard", stored.attempts[0].error)
        self.assertIn("10.0.0.5 is a private address", stored.attempts[0].error)
        self.assertIsNone(stored.next_attempt_at)
        # No retry, however long we wait.
        clock.pump([3600] * 30)
        stored = self.successResultOf(store.get_delivery("D1"))
        self.assertEqual((stored.status, len(stored.attempts)), (FAILED, 1))
        # A refused address is the target's configuration, not the host's
        # health: it does not count towards the circuit breaker.
        self.assertIsNone(dispatcher.hosts.paused_until("http://rebind.example.test:80"))

    def test_allowed_network_reaches_a_local_sink(self) -> None:
        """Control: the same name resolving to 127.0.0.1, allowed by a listed network, is delivered."""

        async def go() -> None:
            sink, base = listen_sink(self)
            port = base.rsplit(":", 1)[1]
            resolve = FakeResolver("127.0.0.1")
            client = guarded_client(self, reactor, AddressPolicy(allowed_networks=["127.0.0.0/8"]), resolve)
            store = MemoryStore(reactor)
            dispatcher = Dispatcher(store, client, reactor, IdGenerator(reactor.seconds), (5,), timeout=5)
            dispatcher.startService()
            self.addCleanup(dispatcher.stopService)
            url = f"http://hooks.example.test:{port}/hook?x=1"
            await submit(dispatcher, [Delivery(id="OK1", url=url, body=b'{"a":1}', content_type="application/json")])
            received = await sink.wait_for(1)
            self.assertEqual(received[0].path, "/hook?x=1")
            self.assertEqual(received[0].body, b'{"a":1}')
            self.assertEqual(received[0].header("host"), f"hooks.example.test:{port}")
            self.assertEqual(resolve.asked, [("hooks.example.test", int(port))])
            delivered = await wait_for_status(store, "OK1", (DELIVERED,))
            self.assertEqual(delivered.attempts[0].status_code, 200)

        return ensureDeferred(go())

    def test_refused_addresses_are_skipped_for_an_allowed_one(self) -> None:
        async def go() -> None:
            sink, base = listen_sink(self)
            port = base.rsplit(":", 1)[1]
            client = guarded_client(
                self, reactor, AddressPolicy(allowed_networks=["127.0.0.0/8"]), FakeResolver("10.0.0.5", "127.0.0.1")
            )
            response = await client.request("POST", f"http://mixed.example.test:{port}/m", (), b"hi", 5)
            self.assertEqual(response.code, 200)
            self.assertEqual([r.path for r in sink.received], ["/m"])

        return ensureDeferred(go())


class SubmissionTests(TestCase):
    def test_refused_literal_is_a_400(self) -> None:
        async def go() -> None:
            service, base = await start_hookah(self, allow_private_targets=False)
            client = http_client(self)
            for query in (
                "_url=http://127.0.0.1:9/hook",
                "_url=http://[::1]:9/hook",
                "_url=http://169.254.169.254/latest/meta-data/",
                "_url=http://10.0.0.1/x",
                "_url=http://localhost:9/",
                "_url=http://[::ffff:192.168.1.1]/",
                "_url=http://8.8.8.8/ok&_errback=http://192.168.0.1/err",
                "_url=http://8.8.8.8/ok&_callback=http://172.16.0.1/cb",
            ):
                response = await client.post(f"{base}/dispatch?{query}", data=b"{}", headers={"Content-Type": "application/json"})
                body = await response.content()
                self.assertEqual(response.code, 400, query)
                self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
                error = json.loads(body)
                self.assertEqual(error["error"], "refused_target", query)
                self.assertIn("refused", error["message"])
                self.assertIn("--allow-private-targets", error["message"])
            # Nothing was queued.
            counts = await service.store.count_deliveries()
            self.assertEqual(sum(counts.values()), 0)
            # A public destination is accepted (and not attempted yet: _delay).
            response = await client.post(f"{base}/dispatch?_url=http://93.184.216.34/hook&_delay=3600", data=b"{}")
            self.assertEqual(response.code, 202)
            await response.content()

        return ensureDeferred(go())

    def test_allowed_network_is_accepted_and_delivered(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            _, base = await start_hookah(self, allow_private_targets=False, allowed_networks=("127.0.0.0/8",))
            client = http_client(self)
            response = await client.post(f"{base}/dispatch?_url={sink_url}/allowed", data=b"ping")
            self.assertEqual(response.code, 202)
            await response.content()
            received = await sink.wait_for(1)
            self.assertEqual((received[0].path, received[0].body), ("/allowed", b"ping"))

        return ensureDeferred(go())
