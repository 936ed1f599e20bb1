"""
Bearer tokens on a running Hookah: every protected endpoint refuses a
missing and a wrong token with ``401`` and ``WWW-Authenticate: Bearer``,
refuses a publisher token where an admin one is needed (``403``), and lets
the right token through; WebSub subscribe and ``/healthz`` stay open; the
status page's cookie works for browsers and not for other sites.
"""

from __future__ import annotations

import hmac
import io
import json
from typing import Any, Dict, List, Optional, Tuple
from unittest import mock
from urllib.parse import quote

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from hookah.web import auth
from hookah.web.auth import ADMIN, PUBLISHER, Tokens, dispatch_policy, hub_policy, session_value
from tests.support import http_client, listen_sink, start_hookah

PUBLISHER_TOKEN = "pub-token-1234567890"
ADMIN_TOKEN = "adm-token-0987654321"
WRONG = "not-a-token"


class Client:
    def __init__(self, testcase: TestCase, base: str) -> None:
        self.http = http_client(testcase)
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        token: Optional[str] = None,
        data: Any = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> Tuple[int, Any, bytes]:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        response = await self.http.request(
            method, self.base + path, data=data, headers=all_headers, allow_redirects=False
        )
        body = await response.content()
        return response.code, response.headers, body


class TokenChecks(TestCase):
    timeout = 30

    async def start(self, **config: Any) -> Tuple[Any, Client, str]:
        sink, sink_url = listen_sink(self)
        self.sink = sink
        service, base = await start_hookah(
            self, publisher_tokens=(PUBLISHER_TOKEN,), admin_tokens=(ADMIN_TOKEN,), **config
        )
        return service, Client(self, base), sink_url

    async def assert_refused(self, client: Client, method: str, path: str, data: Any = None) -> None:
        for token, detail in ((None, None), (WRONG, b'error="invalid_token"')):
            code, headers, body = await client.call(method, path, token, data)
            self.assertEqual(code, 401, f"{method} {path} with token {token!r}: {body!r}")
            challenge = headers.getRawHeaders(b"www-authenticate")
            self.assertIsNotNone(challenge, f"{method} {path}: no WWW-Authenticate")
            self.assertTrue(challenge[0].startswith(b"Bearer"), challenge)
            if detail is not None:
                self.assertIn(detail, challenge[0])
            self.assertEqual(json.loads(body)["error"], "unauthorized")

    def test_publisher_endpoints(self) -> Any:
        async def go() -> None:
            _, client, sink_url = await self.start()
            path = "/dispatch?_url=" + quote(sink_url + "/hook", safe="")
            await self.assert_refused(client, "POST", path, b"x")
            for token in (PUBLISHER_TOKEN, ADMIN_TOKEN):
                code, _, body = await client.call("POST", path, token, b"x", {"Content-Type": "text/plain"})
                self.assertEqual(code, 202, body)
            # Publishing to a topic is /dispatch too.
            await self.assert_refused(client, "POST", "/dispatch?_topic=t1", b"x")
            code, _, body = await client.call("POST", "/dispatch?_topic=t1", PUBLISHER_TOKEN, b"x")
            self.assertEqual(code, 202, body)
            received = await self.sink.wait_for(2)
            self.assertEqual([r.body for r in received], [b"x", b"x"])

        return ensureDeferred(go())

    def test_admin_endpoints(self) -> Any:
        async def go() -> None:
            _, client, sink_url = await self.start()
            code, _, body = await client.call(
                "POST", "/dispatch?_url=" + quote(sink_url + "/hook", safe=""), PUBLISHER_TOKEN, b"x"
            )
            delivery = json.loads(body)["id"]
            await self.sink.wait_for(1)
            protected = [
                ("GET", "/", 200),
                ("GET", "/dispatch", 200),
                ("GET", "/dispatch?status=failed", 200),
                ("GET", f"/dispatch/{delivery}", 200),
                ("POST", f"/dispatch/{delivery}/retry", 202),
                ("GET", "/metrics", 200),
                ("GET", "/topics", 200),
                ("GET", "/hub/subscriptions", 200),
            ]
            for method, path, expected in protected:
                await self.assert_refused(client, method, path)
                code, headers, body = await client.call(method, path, PUBLISHER_TOKEN)
                self.assertEqual(code, 403, f"{method} {path} with a publisher token: {body!r}")
                self.assertIn(b'error="insufficient_scope"', headers.getRawHeaders(b"www-authenticate")[0])
                code, _, body = await client.call(method, path, ADMIN_TOKEN)
                self.assertEqual(code, expected, f"{method} {path} with the admin token: {body!r}")
            # The retry above really resent it.
            received = await self.sink.wait_for(2)
            self.assertEqual(len(received), 2)

        return ensureDeferred(go())

    def test_hub_publish_guarded_subscribe_open(self) -> Any:
        async def go() -> None:
            _, client, sink_url = await self.start()
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            publish = f"hub.mode=publish&hub.url={quote(sink_url + '/feed', safe='')}".encode()
            for path in ("/hub", "/publish", "/subscribe"):
                code, _, body = await client.call("POST", path, None, publish, form)
                self.assertEqual(code, 401, f"publish via {path}: {body!r}")
            code, _, body = await client.call("POST", "/hub", PUBLISHER_TOKEN, publish, form)
            self.assertEqual(code, 202, body)
            # The guard read the body to find hub.mode and rewound it for the hub.
            code, _, body = await client.call("POST", "/publish", ADMIN_TOKEN, publish, form)
            self.assertEqual(code, 202, body)

            subscribe = (
                f"hub.mode=subscribe&hub.topic={quote(sink_url + '/feed', safe='')}"
                f"&hub.callback={quote(sink_url + '/callback', safe='')}"
            ).encode()
            for path in ("/hub", "/subscribe"):
                code, _, body = await client.call("POST", path, None, subscribe, form)
                self.assertEqual(code, 202, f"subscribe via {path} must stay open: {body!r}")

        return ensureDeferred(go())

    def test_publish_with_an_empty_mode_needs_a_token(self) -> Any:
        """
        An empty ``hub.mode`` at ``/publish`` means publish to the hub, so
        it means publish to the guard too (one rule, ``hub_mode``).
        """

        async def go() -> None:
            _, client, sink_url = await self.start()
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            feed = quote(sink_url + "/feed", safe="")
            for path, data in (
                (f"/publish?hub.mode=&hub.url={feed}", None),
                ("/publish", f"hub.mode=&hub.url={feed}".encode()),
                (f"/publish?hub.url={feed}", None),
            ):
                code, _, body = await client.call("POST", path, None, data, form)
                self.assertEqual(code, 401, f"{path} {data!r}: {body!r}")
                code, _, body = await client.call("POST", path, PUBLISHER_TOKEN, data, form)
                self.assertEqual(code, 202, f"{path} {data!r}: {body!r}")
            # At /hub an empty mode is no mode at all: the hub refuses it.
            code, _, body = await client.call("POST", f"/hub?hub.mode=&hub.url={feed}", None, None, form)
            self.assertEqual(code, 400, body)
            self.assertIn(b"hub.mode is required", body)
            # Only the three authorised pings fetched the feed.
            await self.sink.wait_for(3)
            self.assertEqual(len(self.sink.received), 3)

        return ensureDeferred(go())

    def test_stream_needs_the_admin_token(self) -> Any:
        """``/stream`` replays history (``count``, ``last_event_id``): admin only, like ``/topics``."""

        async def go() -> None:
            _, client, _ = await self.start()
            code, _, body = await client.call("POST", "/dispatch?_topic=secret", PUBLISHER_TOKEN, b"classified", {"Content-Type": "text/plain"})
            self.assertEqual(code, 202, body)
            event_id = json.loads(body)["id"]
            for path in ("/stream?topic=secret&count=5", f"/stream?topic=secret&last_event_id={event_id}"):
                await self.assert_refused(client, "GET", path)
                code, headers, body = await client.call("GET", path, PUBLISHER_TOKEN)
                self.assertEqual(code, 403, body)
                self.assertIn(b'error="insufficient_scope"', headers.getRawHeaders(b"www-authenticate")[0])
            code, _, body = await client.call("GET", "/stream?topic=secret", headers={"Cookie": "hookah_session=forged"})
            self.assertEqual(code, 401, body)

            # `hookah tail --token` sends the token (and gets the replay).
            from hookah.cli.main import build_parser, client_for
            from hookah.cli.client import follow

            args = build_parser().parse_args(["tail", "secret", "--server", client.base, "--token", ADMIN_TOKEN])
            seen: List[Dict[str, Any]] = []
            count = await deferToThread(
                follow, client_for(args), args.topics, seen.append, lambda notice: None, count=1, limit=1, idle_timeout=10
            )
            self.assertEqual(count, 1)
            self.assertEqual((seen[0]["id"], seen[0]["data"]), (event_id, "classified"))

            # The status page's sign-in cookie opens it too (a GET needs no Origin).
            cookie = "hookah_session=" + session_value(ADMIN_TOKEN.encode()).decode()
            reader = client_for(build_parser().parse_args(["tail", "secret", "--server", client.base]))

            def read_one() -> bytes:
                connection, response = reader.open_stream("/stream?topic=secret&count=1", {"Cookie": cookie}, 10)
                try:
                    return response.readline()
                finally:
                    response.close()
                    connection.close()

            line = await deferToThread(read_one)
            self.assertEqual(json.loads(line)["id"], event_id)

        return ensureDeferred(go())

    def test_healthz_open(self) -> Any:
        async def go() -> None:
            _, client, _ = await self.start()
            code, _, body = await client.call("GET", "/healthz")
            self.assertEqual((code, json.loads(body)["status"]), (200, "ok"))

        return ensureDeferred(go())

    def test_browser_gets_a_sign_in_form(self) -> Any:
        async def go() -> None:
            _, client, _ = await self.start()
            code, headers, body = await client.call("GET", "/", headers={"Accept": "text/html"})
            self.assertEqual(code, 401)
            self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/html"))
            self.assertIn(b'action="/login"', body)
            self.assertIn(b'type="password"', body)

        return ensureDeferred(go())

    def test_cookie_sign_in(self) -> Any:
        async def go() -> None:
            service, client, sink_url = await self.start()
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            code, _, body = await client.call("POST", "/login", data=b"token=" + WRONG.encode(), headers=form)
            self.assertEqual(code, 401)
            self.assertIn(b"not an admin token", body)
            code, _, _ = await client.call("POST", "/login", data=b"token=" + PUBLISHER_TOKEN.encode(), headers=form)
            self.assertEqual(code, 401)
            # Another site's form cannot sign anyone in.
            code, _, _ = await client.call(
                "POST", "/login", data=b"token=" + ADMIN_TOKEN.encode(), headers=dict(form, Origin="https://evil.example")
            )
            self.assertEqual(code, 403)

            code, headers, _ = await client.call("POST", "/login", data=b"token=" + ADMIN_TOKEN.encode(), headers=form)
            self.assertEqual(code, 303)
            self.assertEqual(headers.getRawHeaders(b"location"), [b"/"])
            cookie = headers.getRawHeaders(b"set-cookie")[0]
            self.assertIn(b"HttpOnly", cookie)
            self.assertIn(b"SameSite=strict", cookie)
            self.assertNotIn(ADMIN_TOKEN.encode(), cookie)
            value = cookie.split(b";")[0]
            self.assertEqual(value, b"hookah_session=" + session_value(ADMIN_TOKEN.encode()))

            code, _, body = await client.call("GET", "/", headers={"Cookie": value.decode()})
            self.assertEqual(code, 200)
            self.assertIn(b"Sign out", body)
            code, _, _ = await client.call("GET", "/", headers={"Cookie": "hookah_session=forged"})
            self.assertEqual(code, 401)

            _, _, body = await client.call(
                "POST", "/dispatch?_url=" + quote(sink_url + "/h", safe="") + "&_retries=0", PUBLISHER_TOKEN, b"x"
            )
            retry = f"/dispatch/{json.loads(body)['id']}/retry"
            await self.sink.wait_for(1)
            # A cookie alone does not change anything: the browser must say the
            # request comes from this site.
            for extra in ({}, {"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
                code, _, _ = await client.call("POST", retry, headers=dict(extra, Cookie=value.decode()))
                self.assertEqual(code, 401, extra)
            host = client.base.split("//", 1)[1]
            code, _, body = await client.call("POST", retry, headers={"Cookie": value.decode(), "Origin": f"http://{host}"})
            self.assertEqual(code, 202, body)
            code, _, body = await client.call("POST", retry, headers={"Cookie": value.decode(), "Sec-Fetch-Site": "same-origin"})
            self.assertIn(code, (202, 409), body)  # 409 if the first resend is still in flight
            # A cookie never stands in for a publisher token on /dispatch from elsewhere.
            code, _, _ = await client.call("POST", "/dispatch?_topic=x", data=b"x", headers={"Cookie": value.decode()})
            self.assertEqual(code, 401)

            code, headers, _ = await client.call("POST", "/logout", headers={"Cookie": value.decode()})
            self.assertEqual(code, 303)
            self.assertIn(b"Max-Age=0", headers.getRawHeaders(b"set-cookie")[0])

        return ensureDeferred(go())


class NoTokens(TestCase):
    timeout = 30

    def test_everything_open_without_tokens(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            _, base = await start_hookah(self)
            client = Client(self, base)
            code, _, body = await client.call("POST", "/dispatch?_url=" + quote(sink_url, safe=""), data=b"x")
            self.assertEqual(code, 202, body)
            for path in ("/", "/dispatch", "/metrics", "/topics"):
                code, _, body = await client.call("GET", path)
                self.assertEqual(code, 200, f"{path}: {body!r}")

        return ensureDeferred(go())

    def test_roles_are_enforced_separately(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            _, base = await start_hookah(self, publisher_tokens=(PUBLISHER_TOKEN,))
            client = Client(self, base)
            code, _, _ = await client.call("POST", "/dispatch?_url=" + quote(sink_url, safe=""), data=b"x")
            self.assertEqual(code, 401)
            code, _, _ = await client.call("GET", "/dispatch")
            self.assertEqual(code, 200)  # no --admin-token: the admin side is open

        return ensureDeferred(go())


class Units(TestCase):
    def test_every_token_is_compared(self) -> None:
        tokens = Tokens(publisher=(b"p1", b"p2", b"p3"), admin=(b"a1", b"a2"))
        request: Any = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer p1"])
        with mock.patch.object(auth.hmac, "compare_digest", wraps=hmac.compare_digest) as compare:
            self.assertEqual(tokens.role_of(request), PUBLISHER)
        # No early exit on the first match: both lists compared in full.
        self.assertEqual(compare.call_count, 5)

    def test_bearer_scheme_is_case_insensitive(self) -> None:
        tokens = Tokens(admin=(b"secret",))
        request: Any = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"authorization", [b"bearer secret"])
        self.assertEqual(tokens.role_of(request), ADMIN)
        request.requestHeaders.setRawHeaders(b"authorization", [b"Basic secret"])
        request.getCookie = lambda name: None  # type: ignore[attr-defined]
        self.assertIsNone(tokens.role_of(request))

    def test_policies(self) -> None:
        post: Any = DummyRequest([b""])
        get: Any = DummyRequest([b""])
        post.method = b"POST"
        self.assertEqual(dispatch_policy(post, []), PUBLISHER)
        self.assertEqual(dispatch_policy(post, [b""]), PUBLISHER)
        self.assertEqual(dispatch_policy(post, [b"01ABC", b"retry"]), ADMIN)
        self.assertEqual(dispatch_policy(get, []), ADMIN)
        self.assertEqual(hub_policy()(get, [b"subscriptions"]), ADMIN)
        self.assertIsNone(hub_policy()(get, []))

    def test_hub_policy_uses_the_hubs_mode_rule(self) -> None:
        def hub_post(query: bytes, body: bytes = b"") -> Any:
            request: Any = DummyRequest([b""])
            request.method = b"POST"
            request.uri = b"/publish?" + query
            request.content = io.BytesIO(body)
            if body:
                request.requestHeaders.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
            return request

        publish, hub = hub_policy("publish"), hub_policy()
        self.assertEqual(publish(hub_post(b"hub.mode=&hub.url=http://x/"), []), PUBLISHER)
        self.assertEqual(publish(hub_post(b"hub.url=http://x/"), []), PUBLISHER)
        self.assertEqual(publish(hub_post(b"", b"hub.mode=&hub.url=http://x/"), []), PUBLISHER)
        self.assertEqual(hub(hub_post(b"hub.mode=publish&hub.url=http://x/"), []), PUBLISHER)
        self.assertIsNone(hub(hub_post(b"hub.mode=&hub.url=http://x/"), []))  # the hub answers 400
        self.assertIsNone(publish(hub_post(b"hub.mode=subscribe"), []))
        # The guard leaves the body where the hub reads it.
        request = hub_post(b"", b"hub.mode=publish&hub.url=http://x/")
        self.assertEqual(hub(request, []), PUBLISHER)
        self.assertEqual(request.content.read(), b"hub.mode=publish&hub.url=http://x/")
