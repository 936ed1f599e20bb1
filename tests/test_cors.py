"""
Browsers as clients (``--cors-origins``) and the short-lived stream tokens
a page reads ``/stream`` with.

The headers and preflights are checked over real sockets against a running
Hookah; a stream token's expiry, which ends an open stream, on a ``Clock``
(``StreamHarness``); and the whole story in headless Chromium: a page served
from another port receives backfilled and live events through
``EventSource``, reconnects after the server drops its stream without losing
or repeating an event, and ``fetch()``es a ``POST /dispatch``, while the same
page is refused by a Hookah that does not list its origin.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hookah.config import ConfigError, build_config
from hookah.web.auth import Tokens
from hookah.web.channel import BODY_WINDOW
from hookah.web.cors import normalise_origin
from hookah.web.streamtokens import MAX_TTL, StreamTokens, TokenError, stream_mount
from tests.browsersupport import start_browser
from tests.streamsupport import StreamHarness
from tests.support import http_client, listen_sink, poll, start_hookah, temp_dir

PAGE_ORIGIN = "http://127.0.0.1:18557"
OTHER_ORIGIN = "https://app.example.com"
ADMIN = "cors-admin-token"
PUBLISHER = "cors-publisher-token"


class HTTPCase(TestCase):
    async def start(self, **overrides: Any) -> Tuple[Any, str]:
        self.service, self.base = await start_hookah(self, **overrides)
        self.client = http_client(self)
        return self.service, self.base

    async def call(
        self, method: str, path: str, headers: Optional[Dict[str, str]] = None, data: Optional[bytes] = None
    ) -> Tuple[int, Any, bytes]:
        response = await self.client.request(method, self.base + path, headers=headers or {}, data=data)
        return response.code, response.headers, await response.content()

    def header(self, headers: Any, name: str) -> Optional[str]:
        values = headers.getRawHeaders(name)
        return ", ".join(values) if values else None

    def assertNoCors(self, headers: Any) -> None:
        for name in (
            "access-control-allow-origin", "access-control-allow-credentials", "access-control-allow-methods",
            "access-control-allow-headers", "access-control-expose-headers",
        ):
            self.assertIsNone(headers.getRawHeaders(name), name)


class FirstLine(Protocol):
    """Reads a streamed body up to its first CRLF, then drops the connection."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n" in self.data and not self.done.called:
            self.done.callback(self.data.split(b"\r\n", 1)[0])
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(reason)


def preflight(origin: str, method: str, request_headers: Optional[str] = None) -> Dict[str, str]:
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if request_headers is not None:
        headers["Access-Control-Request-Headers"] = request_headers
    return headers


class ConfigurationTests(TestCase):
    def test_origins_are_normalised_as_browsers_send_them(self) -> None:
        config = build_config({"cors-origins": "HTTPS://App.Example.com:443/, http://127.0.0.1:18557,http://[::1]:80"}, {})
        self.assertEqual(config.cors_origins, ("https://app.example.com", "http://127.0.0.1:18557", "http://[::1]"))
        self.assertEqual(build_config({"cors-origins": "*"}, {}).cors_origins, ("*",))
        self.assertEqual(build_config({}, {}).cors_origins, ())

    def test_environment_and_toml(self) -> None:
        self.assertEqual(build_config({}, {"HOOKAH_CORS_ORIGINS": "https://a.example https://b.example"}).cors_origins,
                         ("https://a.example", "https://b.example"))
        path = temp_dir(self) + "/hookah.toml"
        with open(path, "w") as f:
            f.write('[hookah]\ncors-origins = ["https://a.example", "http://localhost:3000"]\n')
        self.assertEqual(build_config({}, {}, path).cors_origins, ("https://a.example", "http://localhost:3000"))

    def test_bad_origins_stop_start_up(self) -> None:
        for value in ("*,https://a.example", "https://a.example/app", "ftp://a.example", "a.example", "null",
                      "https://user@a.example", "https://a.example:99999", "https://a.example?x=1"):
            with self.assertRaises(ConfigError, msg=value) as caught:
                build_config({"cors-origins": value}, {})
            self.assertIn("--cors-origins", str(caught.exception))

    def test_normalise_origin(self) -> None:
        self.assertEqual(normalise_origin("http://EXAMPLE.com:8080"), "http://example.com:8080")
        self.assertEqual(normalise_origin("https://example.com:443"), "https://example.com")


class WithoutCorsTests(HTTPCase):
    def test_nothing_changes_when_no_origin_is_configured(self) -> None:
        async def go() -> None:
            await self.start()
            code, headers, body = await self.call("OPTIONS", "/dispatch", preflight(PAGE_ORIGIN, "POST", "content-type"))
            self.assertEqual(code, 405, body)
            self.assertEqual(json.loads(body)["error"], "method_not_allowed")
            self.assertEqual(self.header(headers, "allow"), "GET, HEAD, POST")
            self.assertNoCors(headers)
            code, headers, _ = await self.call("POST", "/dispatch?_topic=t", {"Origin": PAGE_ORIGIN})
            self.assertEqual(code, 202)
            self.assertNoCors(headers)
            self.assertIsNone(headers.getRawHeaders("vary"))

        return ensureDeferred(go())


class NamedOriginTests(HTTPCase):
    def test_preflight_for_dispatch_echoes_the_allowed_header_names(self) -> None:
        async def go() -> None:
            await self.start(cors_origins=(PAGE_ORIGIN, OTHER_ORIGIN))
            requested = "Content-Type, authorization,Idempotency-Key, X-Hookah-Header-X-Trace"
            code, headers, body = await self.call("OPTIONS", "/dispatch", preflight(PAGE_ORIGIN, "POST", requested))
            self.assertEqual((code, body), (204, b""))
            self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN)
            self.assertEqual(self.header(headers, "access-control-allow-credentials"), "true")
            self.assertEqual(self.header(headers, "access-control-allow-methods"), "GET, HEAD, POST")
            self.assertEqual(
                self.header(headers, "access-control-allow-headers"),
                "content-type, authorization, idempotency-key, x-hookah-header-x-trace",
            )
            self.assertEqual(self.header(headers, "access-control-max-age"), "600")
            self.assertIn("Origin", self.header(headers, "vary") or "")
            # A preflight needs no token even where the request itself does.
            await self.start(cors_origins=(PAGE_ORIGIN,), admin_tokens=(ADMIN,), publisher_tokens=(PUBLISHER,))
            for path, method in (("/dispatch", "POST"), ("/dispatch/some-id/retry", "POST"), ("/stream?topic=t", "GET"),
                                 ("/topics/t/events", "GET"), ("/hub", "POST"), ("/publish", "POST")):
                code, headers, body = await self.call("OPTIONS", path, preflight(PAGE_ORIGIN, method, "authorization"))
                self.assertEqual(code, 204, (path, body))
                self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN, path)
            code, headers, _ = await self.call("OPTIONS", "/stream?topic=t", preflight(PAGE_ORIGIN, "GET", "last-event-id,cache-control"))
            self.assertEqual(code, 204)
            self.assertEqual(self.header(headers, "access-control-allow-methods"), "GET, HEAD")
            self.assertEqual(self.header(headers, "access-control-allow-headers"), "last-event-id, cache-control")

        return ensureDeferred(go())

    def test_refused_preflights_carry_no_cors_headers(self) -> None:
        async def go() -> None:
            await self.start(cors_origins=(PAGE_ORIGIN,))
            for headers_sent, reason in (
                (preflight("http://127.0.0.1:1", "POST", "content-type"), "http://127.0.0.1:1"),
                (preflight("null", "POST"), "null"),
                (preflight(PAGE_ORIGIN, "DELETE"), "DELETE"),
                (preflight(PAGE_ORIGIN, "POST", "content-type, x-evil"), "x-evil"),
                (preflight(PAGE_ORIGIN, "POST", "x-hookah-header-"), "x-hookah-header-"),
            ):
                code, headers, body = await self.call("OPTIONS", "/dispatch", headers_sent)
                self.assertEqual(code, 403, headers_sent)
                self.assertEqual(json.loads(body)["error"], "cors_refused")
                self.assertIn(reason, json.loads(body)["message"])
                self.assertNoCors(headers)
            # /stream and /hub take no POST or DELETE from a page.
            for path, method in (("/stream?topic=t", "POST"), ("/hub", "DELETE")):
                code, headers, _ = await self.call("OPTIONS", path, preflight(PAGE_ORIGIN, method))
                self.assertEqual(code, 403, path)
                self.assertNoCors(headers)
            # Mounts no page may use keep their 405; so does an OPTIONS that is no preflight.
            for path, headers_sent in (("/metrics", preflight(PAGE_ORIGIN, "GET")), ("/healthz", preflight(PAGE_ORIGIN, "GET")),
                                       ("/dispatch", {"Origin": PAGE_ORIGIN})):
                code, headers, body = await self.call("OPTIONS", path, headers_sent)
                self.assertEqual(code, 405, (path, body))
                self.assertTrue(headers.getRawHeaders("allow"), path)
                self.assertNoCors(headers)

        return ensureDeferred(go())

    def test_actual_requests_from_allowed_origins_are_readable(self) -> None:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            await self.start(cors_origins=(PAGE_ORIGIN,))
            code, headers, body = await self.call(
                "POST", f"/dispatch?_url={quote(sink_url, safe='')}", {"Origin": PAGE_ORIGIN, "Content-Type": "application/json"}, b"{}"
            )
            self.assertEqual(code, 202, body)
            self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN)
            self.assertEqual(self.header(headers, "access-control-allow-credentials"), "true")
            exposed = [h.strip().lower() for h in (self.header(headers, "access-control-expose-headers") or "").split(",")]
            self.assertIn("location", exposed)
            self.assertEqual(self.header(headers, "vary"), "Origin")
            delivery_id = json.loads(body)["id"]
            await sink.wait_for(1)
            # The delivery's reads, its resend, the topic history and the stream.
            for method, path in (("GET", f"/dispatch/{delivery_id}"), ("GET", "/dispatch?limit=5"), ("HEAD", f"/dispatch/{delivery_id}"),
                                 ("GET", "/topics"), ("GET", "/topics/t/events")):
                code, headers, _ = await self.call(method, path, {"Origin": PAGE_ORIGIN})
                self.assertEqual(code, 200, path)
                self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN, path)
            await poll("the delivery to be delivered", lambda: self.service.store.get_delivery(delivery_id).addCallback(lambda d: d.status == "delivered"))
            code, headers, _ = await self.call("POST", f"/dispatch/{delivery_id}/retry", {"Origin": PAGE_ORIGIN})
            self.assertEqual(code, 202)
            self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN)
            # Errors are readable too, so a page can show why.
            code, headers, _ = await self.call("POST", "/dispatch", {"Origin": PAGE_ORIGIN})
            self.assertEqual(code, 400)
            self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN)
            # A hub publish ping; the hub's admin listing is no page's business.
            code, headers, _ = await self.call(
                "POST", "/hub", {"Origin": PAGE_ORIGIN, "Content-Type": "application/x-www-form-urlencoded"},
                b"hub.mode=publish&hub.url=" + quote(sink_url + "/feed", safe="").encode(),
            )
            self.assertEqual(code, 202)
            self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN)
            code, headers, _ = await self.call("GET", "/hub/subscriptions?topic=x", {"Origin": PAGE_ORIGIN})
            self.assertEqual(code, 200)
            self.assertNoCors(headers)
            # Another origin, or none: served, but nothing a page could read.
            for sent in ({"Origin": "http://127.0.0.1:1"}, {"Origin": "null"}, {}):
                code, headers, _ = await self.call("GET", f"/dispatch/{delivery_id}", sent)
                self.assertEqual(code, 200)
                self.assertNoCors(headers)
                self.assertEqual(self.header(headers, "vary"), "Origin")
            # Mounts no page may use.
            code, headers, _ = await self.call("GET", "/metrics", {"Origin": PAGE_ORIGIN})
            self.assertEqual(code, 200)
            self.assertNoCors(headers)

        return ensureDeferred(go())

    def test_refusals_by_token_are_readable_by_the_page(self) -> None:
        async def go() -> None:
            await self.start(cors_origins=(PAGE_ORIGIN,), publisher_tokens=(PUBLISHER,), admin_tokens=(ADMIN,))
            code, headers, _ = await self.call("POST", "/dispatch?_topic=t", {"Origin": PAGE_ORIGIN})
            self.assertEqual(code, 401)
            self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN)
            self.assertIn("WWW-Authenticate", self.header(headers, "access-control-expose-headers") or "")
            code, headers, _ = await self.call("POST", "/dispatch?_topic=t", {"Origin": PAGE_ORIGIN, "Authorization": f"Bearer {PUBLISHER}"})
            self.assertEqual(code, 202)
            self.assertEqual(self.header(headers, "access-control-allow-origin"), PAGE_ORIGIN)

        return ensureDeferred(go())


class AnyOriginTests(HTTPCase):
    def test_star_never_allows_credentials(self) -> None:
        async def go() -> None:
            await self.start(cors_origins=("*",))
            code, headers, _ = await self.call("OPTIONS", "/dispatch", preflight("https://anywhere.example", "POST", "content-type, authorization"))
            self.assertEqual(code, 204)
            self.assertEqual(self.header(headers, "access-control-allow-origin"), "*")
            self.assertEqual(self.header(headers, "access-control-allow-headers"), "content-type, authorization")
            self.assertIsNone(headers.getRawHeaders("access-control-allow-credentials"))
            # The same answer with an Origin or without one, so no Vary.
            for sent in ({"Origin": "https://anywhere.example"}, {}):
                code, headers, _ = await self.call("POST", "/dispatch?_topic=t", sent)
                self.assertEqual(code, 202)
                self.assertEqual(self.header(headers, "access-control-allow-origin"), "*")
                self.assertIsNone(headers.getRawHeaders("access-control-allow-credentials"))
                self.assertIsNone(headers.getRawHeaders("vary"))
            code, headers, _ = await self.call("GET", "/healthz", {"Origin": "https://anywhere.example"})
            self.assertNoCors(headers)

        return ensureDeferred(go())


class StreamTokenTests(HTTPCase):
    async def mint(self, query: str, token: Optional[str] = ADMIN) -> Tuple[int, Dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        code, _, body = await self.call("POST", "/stream/tokens?" + query, headers)
        return code, json.loads(body)

    async def first_line(self, path: str) -> Tuple[int, Any, Any]:
        """Status, headers and the first line of a JSON stream (then the connection is dropped), or the refusal."""
        response = await self.client.get(self.base + path)
        if response.code != 200:
            return response.code, response.headers, json.loads(await response.content())
        reader = FirstLine()
        response.deliverBody(reader)
        return response.code, response.headers, json.loads(await reader.done)

    def test_a_token_reads_its_topics_and_nothing_else(self) -> None:
        async def go() -> None:
            await self.start(admin_tokens=(ADMIN,), publisher_tokens=(PUBLISHER,), cors_origins=(PAGE_ORIGIN,))
            code, _, body = await self.call(
                "POST", "/dispatch?_topic=orders", {"Authorization": f"Bearer {PUBLISHER}", "Content-Type": "application/json"}, b'{"n":1}'
            )
            self.assertEqual(code, 202)
            code, minted = await self.mint("topic=orders&topic=news,payments&ttl=120")
            self.assertEqual(code, 200, minted)
            self.assertEqual(minted["topics"], ["orders", "news", "payments"])
            self.assertEqual(minted["expires_in"], 120)
            token = quote(minted["token"], safe="")
            code, _, first = await self.first_line(f"/stream?topic=orders,news&count=1&access_token={token}")
            self.assertEqual(code, 200, first)
            self.assertEqual((first["topic"], first["data"]), ("orders", {"n": 1}))
            # Not another topic, not another endpoint, not a write.
            code, headers, refused = await self.first_line(f"/stream?topic=orders&topic=secret&access_token={token}")
            self.assertEqual((code, refused["error"]), (403, "forbidden"))
            self.assertIn("secret", refused["message"])
            self.assertIn('error="insufficient_scope"', self.header(headers, "www-authenticate") or "")
            for method, path in (("GET", "/topics/orders/events"), ("GET", "/topics"), ("GET", "/dispatch"), ("GET", "/metrics"),
                                 ("POST", "/dispatch?_topic=orders"), ("POST", "/stream/tokens?topic=orders"), ("GET", "/")):
                code, _, _ = await self.call(method, f"{path}{'&' if '?' in path else '?'}access_token={token}", {"Accept": "application/json"})
                self.assertEqual(code, 401, path)
            code, _, _ = await self.call("POST", f"/stream?topic=orders&access_token={token}")
            self.assertEqual(code, 401)
            # The admin token itself is no stream token: it stays out of URLs.
            code, headers, refused = await self.first_line(f"/stream?topic=orders&access_token={ADMIN}")
            self.assertEqual((code, refused["error"]), (401, "unauthorized"))
            self.assertIn('error="invalid_token"', self.header(headers, "www-authenticate") or "")
            # A tampered token: another topic list under the same signature.
            version, expires, _topics, signature = minted["token"].split(".")
            forged = ".".join([version, expires, "WyJzZWNyZXQiXQ", signature])  # ["secret"]
            code, _, refused = await self.first_line(f"/stream?topic=secret&access_token={forged}")
            self.assertEqual(code, 401, refused)
            # Without a token /stream still needs the admin token.
            code, _, refused = await self.first_line("/stream?topic=orders")
            self.assertEqual(code, 401)

        return ensureDeferred(go())

    def test_minting_needs_the_admin_token_and_sane_input(self) -> None:
        async def go() -> None:
            await self.start(admin_tokens=(ADMIN,), publisher_tokens=(PUBLISHER,))
            self.assertEqual((await self.mint("topic=a", token=None))[0], 401)
            self.assertEqual((await self.mint("topic=a", token=PUBLISHER))[0], 403)
            for query, error in (("", "missing_topic"), ("topic=,", "missing_topic"), ("topic=a&ttl=0", "bad_parameter"),
                                 ("topic=a&ttl=86401", "bad_parameter"), ("topic=a&ttl=x", "bad_parameter"),
                                 ("topic=" + ",".join(f"t{i}" for i in range(101)), "too_many_topics")):
                code, body = await self.mint(query)
                self.assertEqual((code, body["error"]), (400, error), query)
            # A form body works too.
            code, _, body = await self.call(
                "POST", "/stream/tokens", {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/x-www-form-urlencoded"},
                b"topic=a&topic=b&ttl=30",
            )
            self.assertEqual(code, 200, body)
            self.assertEqual((json.loads(body)["topics"], json.loads(body)["expires_in"]), (["a", "b"], 30))
            code, _, _ = await self.call("GET", "/stream/tokens", {"Authorization": f"Bearer {ADMIN}"})
            self.assertEqual(code, 405)

        return ensureDeferred(go())

    def test_without_admin_tokens_there_is_nothing_to_mint(self) -> None:
        async def go() -> None:
            await self.start()
            code, body = await self.mint("topic=a", token=None)
            self.assertEqual((code, body["error"]), (409, "tokens_off"))
            # /stream is open: a token, whatever it is, changes nothing.
            code, _, _ = await self.call("HEAD", "/stream?topic=a&access_token=whatever")
            self.assertEqual(code, 200)

        return ensureDeferred(go())


class StreamTokenClockTests(TestCase):
    """Expiry on a ``Clock``: of the token, and of a stream opened with it."""

    def harness(self) -> Tuple[StreamHarness, StreamTokens]:
        h = StreamHarness()
        tokens = Tokens(admin=(ADMIN.encode(), b"second-admin"))
        from twisted.web.resource import Resource

        from hookah.web.common import make_site

        root = Resource()
        root.putChild(b"stream", stream_mount(h.registry, h.store, h.clock, 64 * 1024, tokens))
        h.site = make_site(root, 1024 * 1024, reactor=h.clock)
        stream_tokens = StreamTokens.from_admin_tokens(tokens.admin, h.clock)
        assert stream_tokens is not None
        return h, stream_tokens

    def test_a_stream_ends_when_its_token_expires(self) -> None:
        h, tokens = self.harness()
        h.clock.advance(1000)
        token, expires = tokens.mint(["t"], 60)
        self.assertEqual(expires, 1060)
        conn = h.connect(f"topic=t&format=sse&access_token={token}")
        conn.format_hint = "sse"
        h.publish(h.event("t"))
        h.clock.advance(59)
        self.assertEqual(len(conn.ids()), 1)
        self.assertFalse(conn.transport.disconnecting)
        h.clock.advance(1)
        messages = conn.read()
        self.assertTrue(conn.transport.disconnecting)
        self.assertTrue(conn.response.done)
        last = messages[-1]
        self.assertEqual((last.event, json.loads(last.data)["error"]), ("hookah-error", "token_expired"))
        conn.drop()
        self.assertEqual(len(h.registry), 0)
        # The reconnect with the same token is refused: it has expired.
        again = h.connect(f"topic=t&access_token={token}")
        again.read()
        self.assertEqual(again.response.status, 401)
        self.assertIn(b"expired", again.body)

    def test_a_stream_that_ends_first_leaves_no_timer(self) -> None:
        h, tokens = self.harness()
        token, _ = tokens.mint(["t"], 600)
        conn = h.connect(f"topic=t&access_token={token}")
        conn.read()
        self.assertEqual(conn.response.status, 200)
        # The connection's deadline timer (none running while a stream is
        # open) lapses at its next look, within BODY_WINDOW.
        h.clock.advance(BODY_WINDOW)
        self.assertEqual(len(h.clock.getDelayedCalls()), 2)  # the keep-alive and the end
        conn.drop()
        self.assertEqual([c for c in h.clock.getDelayedCalls() if c.active()], [])

    def test_any_configured_admin_token_verifies_and_a_removed_one_revokes(self) -> None:
        h, tokens = self.harness()
        token, _ = tokens.mint(["t"], 600)
        self.assertEqual(tokens.check(token, ["t"]), 600.0)
        # A Hookah whose configuration lost the signing admin token.
        rotated = StreamTokens.from_admin_tokens([b"second-admin"], h.clock)
        assert rotated is not None
        with self.assertRaises(Exception) as caught:
            rotated.check(token, ["t"])
        self.assertEqual(getattr(caught.exception, "status", None), 401)
        self.assertIsNone(StreamTokens.from_admin_tokens([], h.clock))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(alphabet="hst1.0123456789abcXYZ-_=", max_size=80),
        # Shaped like a token, with anything in its parts.
        st.builds(
            lambda *parts: ".".join(parts),
            st.sampled_from(["hst1", "HST1", ""]), st.text(alphabet="0123456789", max_size=14), st.text(max_size=20), st.text(max_size=50),
        ),
    )
)
def test_any_access_token_is_refused_cleanly(token: str) -> None:
    clock = Clock()
    tokens = StreamTokens.from_admin_tokens([ADMIN.encode()], clock)
    assert tokens is not None
    with pytest.raises(TokenError) as caught:
        tokens.check(token, ["t"])
    assert caught.value.status == 401


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5), st.integers(1, MAX_TTL), st.data())
def test_minted_tokens_grant_exactly_their_topics_until_they_expire(topics: List[str], ttl: int, data: Any) -> None:
    clock = Clock()
    clock.advance(data.draw(st.integers(0, 2**31)))
    tokens = StreamTokens.from_admin_tokens([ADMIN.encode(), b"other"], clock)
    assert tokens is not None
    token, expires = tokens.mint(topics, ttl)
    assert token.isascii() and "," not in token and "&" not in token and "=" not in token
    subset = data.draw(st.lists(st.sampled_from(topics), max_size=3))
    assert tokens.check(token, subset) == expires
    with pytest.raises(TokenError) as caught:
        tokens.check(token, subset + [next(t for t in "uvwxyz" if t not in topics)])
    assert caught.value.status == 403
    clock.advance(expires - clock.seconds())
    with pytest.raises(TokenError) as caught:
        tokens.check(token, subset)
    assert caught.value.status == 401


@given(st.text(max_size=40))
def test_origins_normalise_to_a_fixed_point_or_are_refused(text: str) -> None:
    try:
        origin = normalise_origin(text)
    except ValueError:
        return
    assert normalise_origin(origin) == origin
    assert origin == origin.lower()
    assert origin.startswith(("http://", "https://"))


# -- in a real browser ---------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>orders, from another origin</title></head>
<body><pre id="log"></pre>
<script>
const config = CONFIG;
window.received = []; window.errors = []; window.opened = 0; window.posted = null;
const url = config.hookah + "/stream?topic=orders&format=sse&count=3&access_token=" + encodeURIComponent(config.token);
const source = new EventSource(url, {withCredentials: true});
source.onopen = () => { window.opened += 1; };
source.onerror = () => { window.errors.push(source.readyState); };
source.addEventListener("orders", (e) => {
  const event = JSON.parse(e.data);
  window.received.push({id: e.lastEventId, data: event.data});
  document.getElementById("log").textContent += e.lastEventId + " " + JSON.stringify(event.data) + "\\n";
});
window.publish = (n) => fetch(config.hookah + "/dispatch?_topic=orders", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Authorization": "Bearer " + config.publisher, "Idempotency-Key": "page-" + n},
    body: JSON.stringify({from: "page", n: n}),
  })
  .then((r) => r.json().then((body) => ({status: r.status, location: r.headers.get("Location"), body: body})))
  .then((result) => { window.posted = result; }, (error) => { window.posted = {error: String(error)}; });
</script></body></html>
"""


class CrossOriginPageTests(TestCase):
    timeout = 180

    async def page(self, cors_origins: Tuple[str, ...]) -> Tuple[Any, Any, str, Any]:
        """Hookah, a page on another port, and Chromium showing it: (service, driver, page url, client)."""
        page_sink, page_url = listen_sink(self)
        origin = page_url  # http://127.0.0.1:<port>, another port than Hookah's
        service, base = await start_hookah(
            self, admin_tokens=(ADMIN,), publisher_tokens=(PUBLISHER,),
            cors_origins=tuple(o if o != "PAGE" else origin for o in cors_origins),
        )
        self.assertNotEqual(urlsplit(base).port, urlsplit(page_url).port)
        client = http_client(self)
        response = await client.post(base + "/stream/tokens?topic=orders&ttl=600", headers={"Authorization": f"Bearer {ADMIN}"})
        token = (await response.json())["token"]
        config = json.dumps({"hookah": base, "token": token, "publisher": PUBLISHER})
        html = PAGE.replace("CONFIG", config).encode()
        page_sink.respond = lambda r: (200, {"Content-Type": "text/html; charset=utf-8"}, html)
        self.base = base
        self.client = client
        driver = await deferToThread(start_browser, self)
        self.addCleanup(deferToThread, driver.quit)
        return service, driver, page_url + "/page.html", client

    async def publish(self, n: int) -> str:
        response = await self.client.post(
            self.base + "/dispatch?_topic=orders", data=json.dumps({"n": n}).encode(),
            headers={"Authorization": f"Bearer {PUBLISHER}", "Content-Type": "application/json"},
        )
        self.assertEqual(response.code, 202)
        return str((await response.json())["id"])

    async def history(self, service: Any) -> List[str]:
        events = await service.store.last_events(["orders"], 100)
        return [e.id for e in events]

    def test_a_page_on_another_origin_reads_and_publishes(self) -> None:
        async def go() -> None:
            service, driver, page_url, _ = await self.page(("PAGE",))
            published = [await self.publish(n) for n in range(1, 5)]  # the page backfills the last 3

            def wait_for(count: int) -> List[Dict[str, Any]]:
                from selenium.webdriver.support.ui import WebDriverWait

                WebDriverWait(driver, 30).until(lambda d: len(d.execute_script("return window.received")) >= count)
                return list(driver.execute_script("return window.received"))

            await deferToThread(driver.get, page_url)
            received = await deferToThread(wait_for, 3)
            self.assertEqual([r["id"] for r in received], published[1:])
            self.assertEqual([r["data"]["n"] for r in received], [2, 3, 4])
            # Live events.
            published += [await self.publish(n) for n in (5, 6)]
            received = await deferToThread(wait_for, 5)
            self.assertEqual([r["id"] for r in received], published[1:])

            # The server drops the stream; events published while the page is
            # away come from history when EventSource reconnects (Last-Event-ID).
            await service.streams.close_all("the test drops the stream")
            await poll("the page to notice", lambda: deferToThread(driver.execute_script, "return window.errors.length"), 30)
            published += [await self.publish(n) for n in (7, 8)]
            await poll("the page to reconnect", lambda: len(service.streams) == 1, 30)
            published.append(await self.publish(9))
            received = await deferToThread(wait_for, 8)
            self.assertEqual([r["id"] for r in received], published[1:], "a gap or a repeat across the reconnect")
            self.assertEqual(await deferToThread(driver.execute_script, "return window.opened"), 2)

            # fetch() POST /dispatch with a bearer token (a preflighted request).
            await deferToThread(driver.execute_script, "window.publish(10)")
            posted = await poll("the page's POST", lambda: deferToThread(driver.execute_script, "return window.posted"), 30)
            self.assertEqual(posted["status"], 202, posted)
            self.assertEqual(posted["location"], "/topics/orders/events")
            published.append(posted["body"]["id"])
            received = await deferToThread(wait_for, 9)
            self.assertEqual(received[-1], {"id": posted["body"]["id"], "data": {"from": "page", "n": 10}})
            self.assertEqual([r["id"] for r in received], published[1:])
            self.assertEqual(await self.history(service), published)

            logs = await deferToThread(driver.get_log, "browser")
            self.assertEqual([e for e in logs if e.get("level") == "SEVERE"], [], "the page logged errors")

        return ensureDeferred(go())

    def test_a_page_from_an_origin_not_listed_is_refused(self) -> None:
        async def go() -> None:
            service, driver, page_url, _ = await self.page(("http://127.0.0.1:1", OTHER_ORIGIN))
            await self.publish(1)
            await deferToThread(driver.get, page_url)
            # EventSource fails for good (readyState 2, CLOSED) and fetch() rejects.
            errors = await poll("the stream to fail", lambda: deferToThread(driver.execute_script, "return window.errors"), 30)
            self.assertEqual(errors, [2])
            await deferToThread(driver.execute_script, "window.publish(2)")
            posted = await poll("the page's POST to fail", lambda: deferToThread(driver.execute_script, "return window.posted"), 30)
            self.assertIn("TypeError", posted.get("error", ""), posted)
            self.assertEqual(await deferToThread(driver.execute_script, "return window.received"), [])
            self.assertEqual(await deferToThread(driver.execute_script, "return window.opened"), 0)
            # The refused preflight kept the POST from being sent at all.
            self.assertEqual(len(await self.history(service)), 1)
            logs = await deferToThread(driver.get_log, "browser")
            self.assertTrue(any("CORS" in e.get("message", "") for e in logs), logs)

        return ensureDeferred(go())
