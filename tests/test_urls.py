"""
Target URLs (``hookah.urls``): hosts in their canonical form, internationalised
names (UTS 46, non-transitional), spellings of refused addresses refused at
submission on ``/dispatch`` and ``/hub`` and again at connect time, and the
property that any URL accepted at submission turns into a connection attempt
through the real endpoint factory and client, never an exception.
"""

from __future__ import annotations

import json
from typing import List, Tuple
from urllib.parse import quote, urlsplit

from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from hookah.app import HookahService
from hookah.config import Config
from hookah.outbound.client import HTTPClient
from hookah.outbound.ssrf import GuardedEndpointFactory
from hookah.urls import AddressPolicy, BadURL, Target, TargetRefused, check_submitted, parse_target, wire_url
from tests.support import FakeResolver, http_client, listen_sink, start_hookah
from tests.websubsupport import post_form

# Spellings of loopback and unspecified addresses that a resolver or
# inet_aton reads as such: (host as written, canonical host, word in the refusal).
NON_CANONICAL: List[Tuple[str, str, str]] = [
    ("127.1", "127.0.0.1", "loopback"),
    ("0x7f000001", "127.0.0.1", "loopback"),
    ("0X7F.0.0.1", "127.0.0.1", "loopback"),
    ("2130706433", "127.0.0.1", "loopback"),
    ("0177.0.0.1", "127.0.0.1", "loopback"),
    ("0177.1", "127.0.0.1", "loopback"),
    ("127.0.1", "127.0.0.1", "loopback"),
    ("0", "0.0.0.0", "unspecified"),
    ("0x0", "0.0.0.0", "unspecified"),
    ("127.0.0.1.", "127.0.0.1", "loopback"),
    ("localhost.", "localhost", "loopback"),
    ("LOCALHOST", "localhost", "loopback"),
    ("api.localhost.", "api.localhost", "loopback"),
    ("\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54", "localhost", "loopback"),  # full-width
    ("local\u00adhost", "localhost", "loopback"),  # a soft hyphen UTS 46 ignores
    ("127\u30020\u30020\u30021", "127.0.0.1", "loopback"),  # ideographic full stops
    ("127\uff0e0\uff0e0\uff0e1", "127.0.0.1", "loopback"),  # full-width full stops
    ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127.0.0.1", "loopback"),  # full-width digits
    ("10.1", "10.0.0.1", "private"),
    ("0xa9fea9fe", "169.254.169.254", "link-local"),
    ("[::1]", "::1", "loopback"),
    ("[0:0:0:0:0:0:0:1]", "::1", "loopback"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1", "loopback"),
    ("[::ffff:7f00:1]", "::ffff:7f00:1", "loopback"),
    ("[::FFFF:169.254.169.254]", "::ffff:a9fe:a9fe", "link-local"),
    ("[::]", "::", "unspecified"),
    ("[2002:7f00:1::1]", "2002:7f00:1::1", "6to4"),
]

# Hosts that are no host at all: a 400 bad_url whatever the policy.
NOT_HOSTS = [
    "1.2.3.256",  # numeric, but not an address inet_aton reads: no DNS name ends in a number
    "1.2.3.4.5",
    "0x100000000",
    "08.0.0.1",
    "99999999999999999999999",
    "%6c%6fcalhost",
    "[fe80::1%25eth0]",
    "a..b",
    "xn--zz.example",
    "\u2603.example",
]

# (URL, canonical host, wire form).
IDN: List[Tuple[str, str, bytes]] = [
    ("https://fa\u00df.de/hook", "xn--fa-hia.de", b"https://xn--fa-hia.de/hook"),  # not fass.de: non-transitional
    ("https://FA\u00df.DE/hook", "xn--fa-hia.de", b"https://xn--fa-hia.de/hook"),
    ("https://xn--fa-hia.de/hook", "xn--fa-hia.de", b"https://xn--fa-hia.de/hook"),
    ("https://XN--FA-HIA.de./hook", "xn--fa-hia.de", b"https://xn--fa-hia.de/hook"),
    ("https://\uff46\uff41\u00df\u3002\uff44\uff45/hook", "xn--fa-hia.de", b"https://xn--fa-hia.de/hook"),
    ("http://b\u00fccher.example:8080/\u00e9", "xn--bcher-kva.example", b"http://xn--bcher-kva.example:8080/%C3%A9"),
    ("https://\u4f8b\u3048.\u30c6\u30b9\u30c8/", "xn--r8jz45g.xn--zckzah", b"https://xn--r8jz45g.xn--zckzah/"),
    ("https://\u03c0\u03b1\u03c1\u03ac\u03b4\u03b5\u03b9\u03b3\u03bc\u03b1.\u03b4\u03bf\u03ba\u03b9\u03bc\u03ae/",
     "xn--hxajbheg2az3al.xn--jxalpdlp", b"https://xn--hxajbheg2az3al.xn--jxalpdlp/"),
]

PUBLIC = "93.184.216.34"


class TCPStringTransport(StringTransport):
    """A ``StringTransport`` with the TCP options the HTTP client sets."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keep_alive = enabled


class Connector:
    """
    The production client path (``HTTPClient`` over the
    guarded endpoint factory) on a ``MemoryReactorClock``: a connection
    attempt is recorded, not made, and can be completed on a
    ``StringTransport`` to see what would be written.
    """

    def __init__(self, policy: AddressPolicy, *addresses: str) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver(*(addresses or (PUBLIC,)))
        self.endpoints = GuardedEndpointFactory(self.reactor, policy, resolve=self.resolver, connect_timeout=5)
        self.client = HTTPClient(self.reactor, self.endpoints, max_idle_per_host=0)

    def post(self, url: str) -> Deferred:
        return self.client.request("POST", url, (), b"{}", 30)

    def complete(self) -> StringTransport:
        """Let the recorded connection succeed; returns the transport, holding what was written."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        peer = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        transport = TCPStringTransport(peerAddress=peer)
        factory.buildProtocol(peer).makeConnection(transport)
        return transport


class CanonicalHostTests(TestCase):
    def test_non_canonical_spellings(self) -> None:
        policy = AddressPolicy()
        for host, canonical, word in NON_CANONICAL:
            target = parse_target(f"http://{host}:8080/hook", "_url")
            self.assertEqual((target.host, target.port), (canonical, 8080), host)
            self.assertEqual(target.wire, f"http://{'[' + canonical + ']' if ':' in canonical else canonical}:8080/hook".encode(), host)
            reason = policy.target_refusal(target)
            self.assertIsNotNone(reason, host)
            self.assertIn(word, reason or "", host)
            self.assertEqual(policy.literal_refusal(f"http://{host}/"), reason, host)
            # Allowed when private targets are, or when the network is listed.
            self.assertIsNone(AddressPolicy(allow_private=True).target_refusal(target), host)

    def test_listed_networks_open_loopback_names_and_numbers(self) -> None:
        policy = AddressPolicy(allowed_networks=["127.0.0.0/8"])
        for url in ("http://localhost./", "http://127.1/", "http://2130706433/", "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/"):
            self.assertIsNone(policy.literal_refusal(url), url)
        self.assertIsNotNone(policy.literal_refusal("http://0/"))

    def test_public_and_names_pass(self) -> None:
        policy = AddressPolicy()
        for url, host in [
            ("http://8.8.8.8/", "8.8.8.8"),
            ("http://0x8080808/", "8.8.8.8"),
            ("http://134744072/", "8.8.8.8"),
            ("http://Example.COM./x", "example.com"),
            ("http://127.0.0.1.nip.io/", "127.0.0.1.nip.io"),  # a name: judged on what it resolves to
            ("http://my_service.example/h", "my_service.example"),
            ("http://[2606:4700:4700::1111]/", "2606:4700:4700::1111"),
        ]:
            target = parse_target(url)
            self.assertEqual(target.host, host, url)
            self.assertIsNone(policy.target_refusal(target), url)

    def test_hosts_that_are_no_host(self) -> None:
        for host in NOT_HOSTS:
            with self.assertRaises(BadURL, msg=host) as caught:
                parse_target(f"http://{host}/x", "_url")
            self.assertTrue(str(caught.exception).startswith("_url "), str(caught.exception))

    def test_url_rules(self) -> None:
        for url, kind in [
            ("ftp://example.com/", "scheme"),
            ("/relative", "scheme"),
            ("http://", "scheme"),
            ("http://user:secret@example.com/", "userinfo"),
            ("http://@example.com/", "userinfo"),
            ("http://example.com:0/", "port"),
            ("http://example.com:65536/", "port"),
            ("http://example.com:+80/", "port"),
            ("http://example.com:80:80/", "port"),
            ("https://my_host.example/", "host"),
            ("https://-x.example/", "host"),
            ("http://[zz/", "malformed"),
            ("http://example.com/a b", "whitespace"),
            ("http://example.com/\u3000", "whitespace"),
            ("http://exa\tmple.com/", "whitespace"),
        ]:
            with self.assertRaises(BadURL, msg=url) as caught:
                check_submitted(url, "hub.callback")
            self.assertEqual(caught.exception.kind, kind, url)
            self.assertIn("hub.callback", str(caught.exception))
            self.assertNotIn("secret", str(caught.exception))
        # An "@" in the path or query is no userinfo; an empty port is the default.
        self.assertEqual(parse_target("http://h.example:/a@b?c=d@e").wire, b"http://h.example/a@b?c=d@e")
        self.assertEqual(parse_target("http://h.example:0080").wire, b"http://h.example:80/")


class IDNTests(TestCase):
    def test_names_are_uts46_non_transitional_a_labels(self) -> None:
        for url, host, wire in IDN:
            target = check_submitted(url, "_url")
            self.assertEqual((target.host, target.wire), (host, wire), url)
            self.assertEqual(wire_url(url), wire, url)

    def test_faß_de_connects_to_its_a_label_over_tls(self) -> None:
        connector = Connector(AddressPolicy())
        d = connector.post("https://fa\u00df.de/hook")
        self.assertNoResult(d)
        self.assertEqual(connector.resolver.asked, [("xn--fa-hia.de", 443)])
        [(host, port, _, _, _)] = connector.reactor.tcpClients
        self.assertEqual((host, port), (PUBLIC, 443))
        hello = connector.complete().value()
        # The TLS ClientHello names the A-label (SNI), the name the certificate must carry.
        self.assertIn(b"xn--fa-hia.de", hello)
        self.assertNoResult(d)

    def test_idn_request_line_and_host_header(self) -> None:
        connector = Connector(AddressPolicy())
        d = connector.post("http://b\u00fccher.example:8080/st\u00fcck?q=\u00e9")
        self.assertEqual(connector.resolver.asked, [("xn--bcher-kva.example", 8080)])
        written = connector.complete().value()
        self.assertTrue(written.startswith(b"POST /st%C3%BCck?q=%C3%A9 HTTP/1.1\r\n"), written[:80])
        self.assertIn(b"\r\nHost: xn--bcher-kva.example:8080\r\n", written)
        self.assertNoResult(d)

    def test_idn_targets_are_accepted_and_delivered(self) -> None:
        """Over HTTP: ``faß.de`` (resolved by a test resolver to a loopback sink) is accepted and delivered as ``xn--fa-hia.de``."""

        async def go() -> None:
            sink, sink_url = listen_sink(self)
            port = int(sink_url.rsplit(":", 1)[1])
            resolver = FakeResolver("127.0.0.1")
            config = Config(listen="tcp:0:interface=127.0.0.1", storage="memory:", allowed_networks=("127.0.0.0/8",))
            service = HookahService(config, reactor, resolve=resolver)
            service.startService()
            self.addCleanup(service.stopService)
            base = f"http://127.0.0.1:{(await service.listening()).getHost().port}"
            client = http_client(self)
            url = f"http://fa\u00df.de:{port}/hook"
            response = await client.post(f"{base}/dispatch?_url={quote(url, safe='')}", data=b'{"a":1}')
            self.assertEqual(response.code, 202, await response.text())
            [received] = await sink.wait_for(1)
            self.assertEqual((received.path, received.body), ("/hook", b'{"a":1}'))
            self.assertEqual(received.header("host"), f"xn--fa-hia.de:{port}")
            self.assertEqual(resolver.asked, [("xn--fa-hia.de", port)])
            # An https IDN is accepted too (not attempted: _delay).
            response = await client.post(f"{base}/dispatch?_url={quote('https://faß.de/hook', safe='')}&_delay=3600", data=b"{}")
            self.assertEqual(response.code, 202, await response.text())

        return ensureDeferred(go())


class ConnectTimeTests(TestCase):
    """The guard reads hosts as submission does, whoever built the request, before any lookup."""

    def test_non_canonical_spellings_are_refused_before_resolving(self) -> None:
        # A resolver that would call everything public: the verdict must not depend on it.
        connector = Connector(AddressPolicy(), PUBLIC)
        for host, _, word in NON_CANONICAL:
            # Through the client, which sends the wire form...
            failure = self.failureResultOf(connector.post(f"http://{host}:8080/hook"), TargetRefused)
            self.assertIn(word, str(failure.value), host)
            self.assertIn("SSRF", str(failure.value), host)
            # ...and at the endpoint factory itself, given the host as written.
            endpoint = connector.endpoints.endpoint_for("http", host.strip("[]"), 8080)
            failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)), TargetRefused)
            self.assertIn(word, str(failure.value), host)
        self.assertEqual(connector.resolver.asked, [])
        self.assertEqual(connector.reactor.tcpClients, [])

    def test_allowed_spellings_connect_to_the_canonical_address(self) -> None:
        connector = Connector(AddressPolicy(allow_private=True), PUBLIC)
        for host, canonical, _ in NON_CANONICAL:
            d = connector.post(f"http://{host}:8080/hook")
            self.assertNoResult(d)
            attempt = connector.reactor.tcpClients[-1]
            if canonical.endswith("localhost"):
                self.assertEqual(connector.resolver.asked[-1], (canonical, 8080))
                self.assertEqual(attempt[:2], (PUBLIC, 8080))
            else:
                self.assertEqual(attempt[:2], (canonical, 8080), host)

    def test_unusable_host_fails_the_connection_not_the_factory(self) -> None:
        connector = Connector(AddressPolicy(allow_private=True))
        for scheme, host in (("https", "my_host.example"), ("http", "\u2603.example"), ("http", "1.2.3.256"), ("http", "[::zz]")):
            endpoint = connector.endpoints.endpoint_for(scheme, host.strip("[]"), 443)
            failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)), BadURL)
            self.assertIsInstance(failure.value, TargetRefused)  # final: the dispatcher does not retry it
        self.assertEqual(connector.reactor.tcpClients, [])


class SubmissionTests(TestCase):
    """Over HTTP: spellings of refused addresses are a 400 at submission, on /dispatch and /hub."""

    def test_dispatch_refuses_every_spelling(self) -> None:
        async def go() -> None:
            service, base = await start_hookah(self, allow_private_targets=False)
            client = http_client(self)
            for host, _, word in NON_CANONICAL:
                target = quote(f"http://{host}:9/hook", safe="")
                for query in (f"_url={target}", f"_url=http://{PUBLIC}/ok&_errback={target}", f"_url=http://{PUBLIC}/ok&_callback={target}"):
                    response = await client.post(f"{base}/dispatch?{query}", data=b"{}")
                    error = json.loads(await response.content())
                    self.assertEqual((response.code, error["error"]), (400, "refused_target"), query)
                    self.assertIn(word, error["message"], query)
                    self.assertIn("--allow-private-targets", error["message"])
            for host in NOT_HOSTS:
                response = await client.post(f"{base}/dispatch?_url={quote(f'http://{host}/x', safe='')}", data=b"{}")
                self.assertEqual((response.code, (await response.json())["error"]), (400, "bad_url"), host)
            self.assertEqual(sum((await service.store.count_deliveries()).values()), 0)

        return ensureDeferred(go())

    def test_hub_refuses_every_spelling(self) -> None:
        async def go() -> None:
            service, base = await start_hookah(self, allow_private_targets=False)
            hub = base + "/hub"
            for host, _, word in NON_CANONICAL:
                url = f"http://{host}:9/x"
                for params, name in [
                    ([("hub.mode", "subscribe"), ("hub.topic", f"http://{PUBLIC}/feed"), ("hub.callback", url)], "hub.callback"),
                    ([("hub.mode", "unsubscribe"), ("hub.topic", f"http://{PUBLIC}/feed"), ("hub.callback", url)], "hub.callback"),
                    ([("hub.mode", "publish"), ("hub.url", url)], "hub.url"),
                ]:
                    code, body, _ = await post_form(self, hub, params)
                    self.assertEqual(code, 400, (params, body))
                    self.assertIn(name, body.decode(), params)
                    self.assertIn(word, body.decode(), params)
            for host in NOT_HOSTS:
                code, body, _ = await post_form(self, hub, [("hub.mode", "publish"), ("hub.url", f"http://{host}/x")])
                self.assertEqual(code, 400, host)
                self.assertIn("hub.url", body.decode())
            self.assertEqual(await service.store.list_subscriptions(None), [])

        return ensureDeferred(go())

    def test_allowed_spellings_reach_the_canonical_address(self) -> None:
        """With 127.0.0.0/8 listed, each spelling of 127.0.0.1 is accepted and delivered there."""

        async def go() -> None:
            sink, sink_url = listen_sink(self)
            port = int(sink_url.rsplit(":", 1)[1])
            _, base = await start_hookah(self, allow_private_targets=False, allowed_networks=("127.0.0.0/8",))
            client = http_client(self)
            spellings = [h for h, canonical, _ in NON_CANONICAL if canonical in ("127.0.0.1", "localhost")]
            for i, host in enumerate(spellings):
                url = f"http://{host}:{port}/n{i}"
                response = await client.post(f"{base}/dispatch?_url={quote(url, safe='')}", data=b"{}")
                self.assertEqual(response.code, 202, (host, await response.text()))
            received = await sink.wait_for(len(spellings))
            self.assertEqual(sorted(r.path for r in received), sorted(f"/n{i}" for i in range(len(spellings))))
            hosts = {r.header("host") for r in received}
            self.assertLessEqual(hosts, {f"127.0.0.1:{port}", f"localhost:{port}", f"api.localhost:{port}"})
            # And the hub: a callback spelled 127.1 is verified at 127.0.0.1.
            code, body, _ = await post_form(
                self, base + "/hub",
                [("hub.mode", "subscribe"), ("hub.topic", f"http://{PUBLIC}/feed"), ("hub.callback", f"http://127.1:{port}/cb")],
            )
            self.assertEqual(code, 202, body)
            [*_, verification] = await sink.wait_for(len(spellings) + 1)
            self.assertTrue(verification.path.startswith("/cb?hub.mode=subscribe&"), verification.path)
            self.assertEqual(verification.header("host"), f"127.0.0.1:{port}")

        return ensureDeferred(go())


# -- the property: accepted at submission means connectable -------------------------

# Labels mostly of what names are made of (ASCII, letters UTS 46 maps or
# IDNA encodes), sometimes of what makes a host invalid or ambiguous.
_LABELS = st.one_of(
    st.text(st.sampled_from(list("abcxyz0179-") + list("\u00df\u00fc\uff21\uff4c\u00ad\u03a9\u0130\u212a\u00e9\u65e5\u672c\u0661")), min_size=1, max_size=10),
    st.text(st.sampled_from(list("a-_%[]:@.") + ["\u2603", "\u200d", "\u3002", "\uff0e", "\ufe0f"]), max_size=6),
)
_NAMES = st.builds(
    lambda labels, dot: ".".join(labels) + dot,
    st.lists(_LABELS, min_size=1, max_size=4),
    st.sampled_from(["", "", "."]),
)


def _numeric(value: int, style: int) -> str:
    if style == 0:
        return str(value)
    if style == 1:
        return hex(value)
    octets = (value & 0xFFFFFFFF).to_bytes(4, "big")
    if style == 2:
        return ".".join(oct(b).replace("0o", "0") for b in octets)
    return f"{octets[0]}.{int.from_bytes(octets[1:], 'big')}"


_HOSTS = st.one_of(
    _NAMES,
    _NAMES,
    st.sampled_from([urlsplit(url).netloc for url, _, _ in IDN]),
    st.builds(_numeric, st.integers(0, 2**32 + 5), st.integers(0, 3)),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.sampled_from([h for h, _, _ in NON_CANONICAL] + NOT_HOSTS + ["fa\u00df.de", "xn--fa-hia.de", "my_host.example"]),
    st.text(max_size=15),
)
_URLS = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{'' if port is None else ':' + str(port)}/{path}",
    st.sampled_from(["http", "https", "HTTP"]),
    _HOSTS,
    st.none() | st.integers(0, 70000),
    st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), max_size=12) | st.text(max_size=4),
)


def host_header(target: Target) -> str:
    """The ``Host`` header a request to ``target`` carries (RFC 9110 7.2: the default port left out)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == (80 if target.scheme == "http" else 443) else f"{host}:{target.port}"


class AcceptedMeansConnectableTests(TestCase):
    @settings(max_examples=400, deadline=None)
    @given(_URLS)
    def test_any_accepted_url_becomes_a_connection_attempt(self, url: str) -> None:
        try:
            target = check_submitted(url, "_url")
        except BadURL:
            return
        # Private targets allowed: every accepted URL must get as far as the wire.
        connector = Connector(AddressPolicy(allow_private=True))
        d = connector.post(url)
        self.assertNoResult(d)
        [(host, port, _, _, _)] = connector.reactor.tcpClients
        expected = str(target.address) if target.address is not None else PUBLIC
        self.assertEqual((host, port), (expected, target.port))
        self.assertEqual(connector.resolver.asked, [] if target.address is not None else [(target.host, target.port)])
        written = connector.complete().value()
        if target.scheme == "http":
            self.assertTrue(written.startswith(b"POST /"), written[:60])
            self.assertIn(f"\r\nHost: {host_header(target)}\r\n".encode("ascii"), written)
        else:
            self.assertTrue(written, "a TLS ClientHello")
            if target.address is None:
                self.assertIn(target.host.encode("ascii"), written)  # SNI
        self.assertNoResult(d)

    @settings(max_examples=300, deadline=None)
    @given(_URLS)
    def test_submission_and_connect_time_agree(self, url: str) -> None:
        """Under the default policy, what submission refuses connect time refuses, without a lookup; the rest connects."""
        try:
            target = check_submitted(url, "_url")
        except BadURL:
            return
        policy = AddressPolicy()
        connector = Connector(policy)
        d = connector.post(url)
        if policy.target_refusal(target) is not None:
            self.failureResultOf(d, TargetRefused)
            self.assertEqual((connector.resolver.asked, connector.reactor.tcpClients), ([], []))
        elif target.address is not None and policy.refusal(str(target.address)) is not None:
            self.fail(f"{url}: refused at connect time only")
        else:
            self.assertNoResult(d)
            self.assertEqual(len(connector.reactor.tcpClients), 1)

