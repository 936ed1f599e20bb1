"""The outgoing client's URL encoding and error descriptions, and /dispatch's refusals of URLs it cannot send."""

from __future__ import annotations

from urllib.parse import quote

from typing import Any, Dict, List

from hypothesis import given, strategies as st
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from zope.interface import provider

from hookah.outbound.client import guarded_client
from hookah.outbound.outcome import NoResponse, ResponseBroken, describe_failure
from hookah.urls import AddressPolicy, wire_url
from tests.support import http_client, listen_sink, start_hookah


class WireURLTests(TestCase):
    def test_examples(self) -> None:
        for url, wire in [
            ("http://h.example?x=1", b"http://h.example/?x=1"),
            ("https://h.example", b"https://h.example/"),
            ("http://h.example/a?b=%2F", b"http://h.example/a?b=%2F"),
            ("http://b\u00fccher.example/x", b"http://xn--bcher-kva.example/x"),
            ("http://[::1]:8080/\u00e9?q=\u00fc", b"http://[::1]:8080/%C3%A9?q=%C3%BC"),
            ("http://my_service.example/h", b"http://my_service.example/h"),
            # The host as it is connected to: numeric and full-width spellings, case, a trailing dot.
            ("http://127.1:8080/a b", b"http://127.0.0.1:8080/a%20b"),
            ("http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54./x#frag", b"http://localhost/x"),
            ("HTTP://Example.COM:0443", b"http://example.com:443/"),
        ]:
            self.assertEqual(wire_url(url), wire, url)

    def test_unencodable_host(self) -> None:
        self.assertRaises(ValueError, wire_url, "http://\u2603\ufe0f.example/")

    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="#?"), max_size=30))
    def test_any_path_becomes_ascii_and_keeps_its_escapes(self, path: str) -> None:
        wire = wire_url("http://h.example/" + path)
        self.assertTrue(wire.isascii())
        self.assertTrue(wire.startswith(b"http://h.example/"))
        self.assertNotIn(b" ", wire)


class DescribeFailureTests(TestCase):
    def test_tls_failure_is_named(self) -> None:
        tls = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        for wrapper in (NoResponse, ResponseBroken):
            text = describe_failure(Failure(wrapper(tls)), 30.0)
            self.assertTrue(text.startswith("TLS failed: "), text)
            self.assertIn("certificate verify failed", text)

    def test_connection_failures(self) -> None:
        from twisted.internet import error

        closed = Failure(error.ConnectionDone())
        for failure, text in [
            (Failure(NoResponse(closed)), "connection closed before a response"),
            (Failure(ResponseBroken(Failure(error.ConnectionLost()))), "connection lost while reading the response"),
            (Failure(error.ConnectionRefusedError()), "connection refused"),
            (Failure(error.DNSLookupError("x")), "DNS lookup failed"),
            (Failure(error.TimeoutError()), "timed out after 7s"),
        ]:
            self.assertEqual(describe_failure(failure, 7.0), text)


class SubmissionTests(TestCase):
    def test_urls_that_cannot_be_sent_are_refused(self) -> None:
        async def go() -> None:
            service, base = await start_hookah(self)
            client = http_client(self)
            for url in ("http://user:pass@127.0.0.1:9/", "https://my_host.example/hook"):
                response = await client.post(f"{base}/dispatch?_url={quote(url, safe='')}", data=b"{}")
                self.assertEqual(response.code, 400, url)
                self.assertEqual((await response.json())["error"], "bad_url")
            self.assertEqual(sum((await service.store.count_deliveries()).values()), 0)

        return ensureDeferred(go())

    def test_a_url_with_a_query_and_no_path_is_sent_to_slash(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            _, base = await start_hookah(self)
            response = await http_client(self).post(f"{base}/dispatch?_url={quote(sink_url + '?x=1', safe='')}", data=b"{}")
            self.assertEqual(response.code, 202, await response.text())
            [received] = await sink.wait_for(1)
            self.assertEqual(received.path, "/?x=1")

        return ensureDeferred(go())


class PoolTests(TestCase):
    def test_connections_come_and_go_without_a_log_line(self) -> None:
        """Twisted logs a factory's start and stop; the pool builds one per connection."""

        async def go() -> None:
            events: List[Dict[str, Any]] = []

            @provider(ILogObserver)
            def observe(event: Dict[str, Any]) -> None:
                events.append(event)

            sink, base = listen_sink(self)
            client = guarded_client(reactor, 4, AddressPolicy(True, ()))
            globalLogPublisher.addObserver(observe)
            try:
                for _ in range(2):
                    response = await client.request("POST", base + "/hook", body=b"{}")
                    self.assertEqual(response.code, 200)
                await client.close()
            finally:
                globalLogPublisher.removeObserver(observe)
            self.assertEqual(len(sink.received), 2)
            self.assertEqual([e for e in events if "factory" in str(e.get("log_format", "")).lower()], [])

        return ensureDeferred(go())
