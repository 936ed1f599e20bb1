"""
The hub over real sockets beyond websub.rocks: bad requests, PubSubHubbub
0.3 (sync, async, verify_token), denial, failed verifications, 410, and the
topic namespace shared with ``/dispatch?_topic=`` and ``/topics/<T>/events``.
"""

from __future__ import annotations

import json
from typing import Any, List, Tuple
from urllib.parse import parse_qsl, quote, urlsplit

from twisted.internet.defer import ensureDeferred

from hookah.model import KIND_WEBSUB
from tests.support import http_client, listen_sink
from tests.websubsupport import HubTestCase, RocksSubscriber, eventually, get_json, parse_links, post_form


class HubHTTPTests(HubTestCase):
    def params(self, mode: str = "subscribe", **extra: str) -> List[Tuple[str, str]]:
        base = [("hub.mode", mode), ("hub.topic", self.topic), ("hub.callback", self.subscriber.callback)]
        return base + [(k.replace("_", ".", 1), v) for k, v in extra.items()]

    async def stored(self) -> Any:
        return await self.service.store.get_subscription(self.topic, self.subscriber.callback)

    async def subscribed(self, **extra: str) -> None:
        code, body, _ = await post_form(self, self.hub, self.params(**extra))
        self.assertEqual(code, 202, body)
        await eventually(self.stored, what="the subscription")

    def test_bad_requests(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            topic, callback = self.topic, self.subscriber.callback
            cases = [
                ([], "hub.mode"),
                ([("hub.mode", "dance")], "hub.mode"),
                ([("hub.mode", "subscribe"), ("hub.topic", topic)], "hub.callback"),
                ([("hub.mode", "subscribe"), ("hub.callback", callback)], "hub.topic"),
                ([("hub.mode", "subscribe"), ("hub.topic", topic), ("hub.callback", "ftp://x.example/cb")], "hub.callback"),
                ([("hub.mode", "subscribe"), ("hub.topic", "/relative"), ("hub.callback", callback)], "hub.topic"),
                ([("hub.mode", "subscribe"), ("hub.topic", topic), ("hub.callback", "http://x:99999/")], "hub.callback"),
                (self.params(hub_secret="s" * 200), "hub.secret"),
                ([("hub.mode", "subscribe"), ("hub.topic", topic), ("hub.callback", callback + "x" * 5000)], "hub.callback"),
                (self.params(hub_secret="é" * 100), "hub.secret"),
                (self.params(hub_lease_seconds="ten"), "hub.lease_seconds"),
                (self.params(hub_lease_seconds="0"), "hub.lease_seconds"),
                (self.params(hub_verify="later"), "hub.verify"),
                (self.params() + [("hub.topic", topic + "2")], "hub.topic"),
                ([("hub.mode", "publish")], "hub.url"),
                ([("hub.mode", "publish"), ("hub.url", "mailto:a@b")], "hub.url"),
            ]
            await self.assert_bad_requests(cases)
            self.assertEqual(self.subscriber.sink.received, [], "bad requests start no verification")
            # Just under the limit is fine; a lease on unsubscribe is ignored.
            code, body, _ = await post_form(self, self.hub, self.params(hub_secret="s" * 199))
            self.assertEqual(code, 202, body)
            code, body, _ = await post_form(self, self.hub, self.params("unsubscribe", hub_lease_seconds="x"))
            self.assertEqual(code, 202, body)
            response = await http_client(self).get(self.hub)
            self.assertEqual(response.code, 405)
            await response.content()

        return ensureDeferred(go())

    def test_malformed_urls_are_400_not_500(self) -> Any:
        """URLs ``urlsplit`` cannot parse (an unclosed or bogus IPv6 literal) are a plain-text ``400``."""

        async def go() -> None:
            await self.setup_hub()
            topic, callback = self.topic, self.subscriber.callback
            for bad in ("http://[zz/", "http://[::1/", "http://[zz]/feed", "https://a]/"):
                cases = [
                    ([("hub.mode", "subscribe"), ("hub.topic", topic), ("hub.callback", bad)], "hub.callback"),
                    ([("hub.mode", "subscribe"), ("hub.topic", bad), ("hub.callback", callback)], "hub.topic"),
                    ([("hub.mode", "unsubscribe"), ("hub.topic", bad), ("hub.callback", callback)], "hub.topic"),
                    ([("hub.mode", "publish"), ("hub.url", bad)], "hub.url"),
                    ([("hub.mode", "publish"), ("hub.topic", bad)], "hub.url"),
                ]
                await self.assert_bad_requests(cases)
                # The same in the query string, and at /publish.
                code, body, _ = await post_form(self, f"{self.base}/publish?hub.url={quote(bad, safe='')}", [])
                self.assertEqual(code, 400, body)
            self.assertEqual(self.subscriber.sink.received, [], "bad requests start no verification")

        return ensureDeferred(go())

    def test_refused_callback_address(self) -> Any:
        async def go() -> None:
            await self.setup_hub(allow_private_targets=False)
            code, body, _ = await post_form(self, self.hub, self.params())
            self.assertEqual(code, 400)
            self.assertIn(b"loopback", body)

        return ensureDeferred(go())

    def test_params_in_query_string_and_percent_decoding(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            callback = self.subscriber.base + "/sub/%7Etoken?keep=a%2Fb&hub.mode=mine"
            query = f"hub.mode=subscribe&hub.topic={quote(self.topic, safe='')}&hub.callback={quote(callback, safe='')}"
            response = await http_client(self).post(f"{self.hub}?{query}")
            self.assertEqual(response.code, 202, await response.content())
            [verification] = await self.subscriber.sink.wait_for(1)
            self.assertTrue(verification.path.startswith("/sub/~token?keep=a%2Fb&hub.mode=mine&hub.mode=subscribe&"))
            self.assertEqual(parse_qsl(urlsplit(verification.path).query)[0], ("keep", "a/b"))
            stored = await eventually(lambda: self.service.store.get_subscription(self.topic, self.subscriber.base + "/sub/~token?keep=a%2Fb&hub.mode=mine"))
            self.assertEqual(stored.topic, self.topic)

        return ensureDeferred(go())

    def test_push03_sync(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            code, body, _ = await post_form(self, self.hub, self.params(hub_verify="sync", hub_verify_token="vt-1"))
            self.assertEqual((code, body), (204, b""))
            # Verified before the answer: the subscription exists already.
            self.assertIsNotNone(await self.stored())
            [verification] = self.subscriber.verifications
            self.assertEqual(dict(parse_qsl(urlsplit(verification.path).query))["hub.verify_token"], "vt-1")
            self.subscriber.confirm = False
            before = await self.stored()
            code, body, _ = await post_form(self, self.hub, self.params("unsubscribe", hub_verify="sync"))
            self.assertEqual(code, 409, body)
            self.assertEqual(await self.stored(), before, "a failed verification leaves the old state")
            # Several keywords, in order of preference, some unknown.
            code, _, _ = await post_form(self, self.hub, self.params(hub_verify="foo") + [("hub.verify", "async"), ("hub.verify", "sync")])
            self.assertEqual(code, 202)

        return ensureDeferred(go())

    def test_push03_async_echoes_verify_token(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            code, body, _ = await post_form(self, self.hub, self.params(hub_verify="async", hub_verify_token="tok"))
            self.assertEqual(code, 202, body)
            [verification] = await self.subscriber.sink.wait_for(1)
            self.assertIn("hub.verify_token=tok", verification.path)
            await eventually(self.stored, what="the subscription")

        return ensureDeferred(go())

    def test_denied_topic(self) -> Any:
        async def go() -> None:
            await self.setup_hub(topic_allow=("https://allowed.example/",))
            code, body, _ = await post_form(self, self.hub, self.params())
            self.assertEqual(code, 202, body)
            [denial] = await self.subscriber.sink.wait_for(1)
            query = dict(parse_qsl(urlsplit(denial.path).query))
            self.assertEqual(query["hub.mode"], "denied")
            self.assertEqual(query["hub.topic"], self.topic)
            self.assertIn("hub.reason", query)
            self.assertIsNone(await self.stored())
            code, body, _ = await post_form(self, self.hub, self.params(hub_verify="sync"))
            self.assertEqual(code, 403, body)
            code, body, _ = await post_form(self, self.hub, [("hub.mode", "publish"), ("hub.url", self.topic)])
            self.assertEqual(code, 403, body)

        return ensureDeferred(go())

    def test_failed_async_verification_leaves_old_state(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            await self.subscribed(hub_secret="first", hub_lease_seconds="3600")
            before = await self.stored()
            self.subscriber.confirm = False
            for params in (self.params(hub_secret="second"), self.params("unsubscribe")):
                count = len(self.subscriber.sink.received)
                code, _, _ = await post_form(self, self.hub, params)
                self.assertEqual(code, 202)
                await self.subscriber.sink.wait_for(count + 1)
            # The verification was answered 404; wait for the hub to record it.
            await eventually(lambda: self.service.metrics.verifications.labels("unsubscribe", "rejected")._value.get() == 1)
            self.assertEqual(await self.stored(), before)

        return ensureDeferred(go())

    def test_410_removes_subscription_other_failures_do_not(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            await self.subscribed()
            self.subscriber.notify_code = 500
            code, _, _ = await post_form(self, self.base + "/publish", [("hub.url", self.topic)])
            self.assertEqual(code, 202)
            await eventually(lambda: self.subscriber.notifications, what="a notification")

            async def attempt_recorded() -> bool:
                page = await self.service.store.list_deliveries(None, 10, None)
                return any(d.kind == KIND_WEBSUB and d.attempts for d in page)

            await eventually(attempt_recorded, what="the failed attempt")
            self.assertIsNotNone(await self.stored(), "a 500 keeps the subscription")
            self.subscriber.notify_code = 410
            code, _, _ = await post_form(self, self.hub, [("hub.mode", "publish"), ("hub.topic", self.topic)])
            self.assertEqual(code, 202)

            async def removed() -> bool:
                return await self.stored() is None

            await eventually(removed, what="the subscription to go")

        return ensureDeferred(go())

    def test_publish_follows_redirects(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            moved, moved_base = listen_sink(self)
            moved.respond = lambda r: (302, {"Location": self.topic_server.url("/feed")}, b"")
            self.topic = moved_base + "/old"
            self.subscriber.topic = self.topic
            await self.subscribed()
            code, _, _ = await post_form(self, self.hub, [("hub.mode", "publish"), ("hub.url", self.topic)])
            self.assertEqual(code, 202)
            received = await eventually(lambda: self.subscriber.notifications, what="a notification")
            self.assertEqual(received[0].body, b"news\n")
            self.assertEqual(received[0].header("Content-Type"), "text/plain; charset=utf-8")
            self.assertEqual(parse_links(received[0].header("Link") or "")["self"], [self.topic])

        return ensureDeferred(go())

    def test_subscribe_endpoint_and_listing(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            code, _, _ = await post_form(self, self.base + "/subscribe", self.params(hub_secret="x"))
            self.assertEqual(code, 202)
            await eventually(self.stored, what="the subscription")
            listing = await get_json(self, f"{self.base}/hub/subscriptions?topic={quote(self.topic, safe='')}")
            [entry] = listing["subscriptions"]
            self.assertEqual(entry["callback"], self.subscriber.callback)
            self.assertEqual((entry["has_secret"], entry["active"]), (True, True))
            self.assertNotIn("secret", entry)
            other = await get_json(self, f"{self.base}/hub/subscriptions?topic=nothing")
            self.assertEqual(other["subscriptions"], [])

        return ensureDeferred(go())

    def test_dispatch_to_topic_fans_out_and_keeps_history(self) -> Any:
        async def go() -> None:
            await self.setup_hub(public_url="https://hooks.example.test")
            await self.subscribed(hub_secret="k")
            client = http_client(self)
            response = await client.post(
                f"{self.base}/dispatch?_topic={quote(self.topic, safe='')}",
                data=b'{"n": 1}',
                headers={b"Content-Type": [b"application/json"], b"X-Hookah-Header-X-Trace": [b"abc"]},
            )
            self.assertEqual(response.code, 202)
            accepted = await response.json()
            self.assertEqual(accepted["subscribers"], 1)
            [notification] = await eventually(lambda: self.subscriber.notifications, what="a notification")
            self.assertEqual(notification.body, b'{"n": 1}')
            self.assertEqual(notification.header("Content-Type"), "application/json")
            self.assertEqual(notification.header("X-Trace"), "abc")
            links = parse_links(notification.header("Link") or "")
            self.assertEqual((links["hub"], links["self"]), (["https://hooks.example.test/hub"], [self.topic]))
            self.assertIsNotNone(notification.header("X-Hub-Signature"))
            self.assertIsNone(notification.header("webhook-signature"))
            encoded = quote(self.topic, safe="")
            history = await get_json(self, f"{self.base}/topics/{encoded}/events")
            self.assertEqual(history["topic"], self.topic)
            [event] = history["events"]
            self.assertEqual(event["id"], accepted["id"])
            self.assertEqual((event["content_type"], event["data"]), ("application/json", {"n": 1}))
            # The unencoded form of the name reaches the same history.
            same = await get_json(self, f"{self.base}/topics/{self.topic}/events")
            self.assertEqual(same["events"], history["events"])
            empty = await get_json(self, f"{self.base}/topics/{encoded}/events?after={accepted['id']}")
            self.assertEqual(empty["events"], [])
            topics = await get_json(self, f"{self.base}/topics")
            self.assertIn({"topic": self.topic, "events": 1, "subscribers": 1}, topics["topics"])

        return ensureDeferred(go())

    def test_topic_history_paging(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            client = http_client(self)
            ids = []
            for n in range(3):
                response = await client.post(f"{self.base}/dispatch?_topic=orders", data=bytes([n, 255]),
                                             headers={b"Content-Type": [b"application/octet-stream"]})
                ids.append((await response.json())["id"])
            page = await get_json(self, f"{self.base}/topics/orders/events?limit=2")
            self.assertEqual([e["id"] for e in page["events"]], ids[:2])
            self.assertEqual(page["next"], ids[1])
            self.assertEqual(page["events"][0]["encoding"], "base64")
            rest = await get_json(self, f"{self.base}/topics/orders/events?limit=2&after={page['next']}")
            self.assertEqual(([e["id"] for e in rest["events"]], rest["next"]), (ids[2:], None))
            response = await client.get(f"{self.base}/topics/orders/events?limit=0")
            self.assertEqual(response.code, 400)
            self.assertEqual(json.loads(await response.content())["error"], "bad_parameter")
            response = await client.get(f"{self.base}/topics/orders")
            self.assertEqual(response.code, 404)
            await response.content()

        return ensureDeferred(go())


class HubSafetyHTTPTests(HubTestCase):
    """What one request can change for others, and the bounds on background work."""

    def test_forged_host_names_no_one_elses_hub(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            honest = RocksSubscriber(self, self.topic)
            forger = RocksSubscriber(self, self.topic)
            port = self.base.rsplit(":", 1)[1]
            for subscriber, host in ((honest, f"127.0.0.1:{port}"), (forger, "evil.example")):
                params = [("hub.mode", "subscribe"), ("hub.topic", self.topic), ("hub.callback", subscriber.callback)]
                code, body, _ = await post_form(self, self.hub, params, host)
                self.assertEqual(code, 202, body)
            # Unverified requests and publish pings with a forged Host, too.
            stranger = [("hub.mode", "subscribe"), ("hub.topic", self.topic), ("hub.callback", "http://127.0.0.1:9/cb")]
            code, _, _ = await post_form(self, self.hub, stranger, "evil.example")
            self.assertEqual(code, 202)
            for subscriber in (honest, forger):
                await eventually(lambda s=subscriber: self.service.store.get_subscription(self.topic, s.callback))
            code, _, _ = await post_form(self, self.base + "/publish", [("hub.url", self.topic)], "evil.example")
            self.assertEqual(code, 202)
            for subscriber in (honest, forger):
                await eventually(lambda s=subscriber: s.notifications, what="a notification")
            response = await http_client(self).post(f"{self.base}/dispatch?_topic={quote(self.topic, safe='')}", data=b"x")
            self.assertEqual(response.code, 202, await response.content())
            for subscriber in (honest, forger):
                await eventually(lambda s=subscriber: len(s.notifications) == 2, what="a second notification")
            for notification in honest.notifications:
                self.assertEqual(parse_links(notification.header("Link") or "")["hub"], [self.hub])
            for notification in forger.notifications:
                self.assertEqual(parse_links(notification.header("Link") or "")["hub"], ["http://evil.example/hub"])
            stored = await self.service.store.get_subscription(self.topic, honest.callback)
            self.assertEqual(stored.hub_url, self.hub)

        return ensureDeferred(go())

    def test_public_url_wins(self) -> Any:
        async def go() -> None:
            await self.setup_hub(public_url="https://hooks.example.test/")
            params = [("hub.mode", "subscribe"), ("hub.topic", self.topic), ("hub.callback", self.subscriber.callback)]
            code, _, _ = await post_form(self, self.base + "/subscribe", params, "evil.example")
            self.assertEqual(code, 202)
            await eventually(lambda: self.service.store.get_subscription(self.topic, self.subscriber.callback))
            code, _, _ = await post_form(self, self.hub, [("hub.mode", "publish"), ("hub.url", self.topic)])
            self.assertEqual(code, 202)
            [notification] = await eventually(lambda: self.subscriber.notifications, what="a notification")
            self.assertEqual(parse_links(notification.header("Link") or "")["hub"], ["https://hooks.example.test/hub"])

        return ensureDeferred(go())

    def test_unsubscribe_cancels_queued_retries(self) -> Any:
        """websub.rocks 104 and beyond: after an unsubscribe, a notification being retried stops."""
        async def go() -> None:
            await self.setup_hub(retry_schedule=(3600.0,))
            params = [("hub.topic", self.topic), ("hub.callback", self.subscriber.callback)]
            code, _, _ = await post_form(self, self.hub, [("hub.mode", "subscribe")] + params)
            self.assertEqual(code, 202)
            await eventually(lambda: self.service.store.get_subscription(self.topic, self.subscriber.callback))
            self.subscriber.notify_code = 500
            response = await http_client(self).post(f"{self.base}/dispatch?_topic={quote(self.topic, safe='')}", data=b"x")
            self.assertEqual(response.code, 202)

            async def retry_scheduled() -> Any:
                page = await self.service.store.list_deliveries("scheduled", 10, None)
                return [d for d in page if d.kind == KIND_WEBSUB and d.attempts]

            [waiting] = await eventually(retry_scheduled, what="a scheduled retry")
            code, _, _ = await post_form(self, self.hub, [("hub.mode", "unsubscribe")] + params)
            self.assertEqual(code, 202)

            async def cancelled() -> Any:
                delivery = await self.service.store.get_delivery(waiting.id)
                return delivery if delivery.status == "failed" else None

            delivery = await eventually(cancelled, what="the cancellation")
            self.assertEqual([a.status_code for a in delivery.attempts], [500, None])
            self.assertIn("unsubscribed", delivery.attempts[-1].error)
            listed = await get_json(self, f"{self.base}/dispatch/{waiting.id}")
            self.assertEqual(listed["status"], "failed")
            self.assertIn("unsubscribed", listed["attempts"][-1]["error"])

        return ensureDeferred(go())

    def test_too_many_topics_in_one_ping(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            code, body, _ = await post_form(self, self.hub, [("hub.mode", "publish")] + [("hub.url", self.topic)] * 101)
            self.assertEqual(code, 400)
            self.assertIn(b"at most 100", body)
            code, body, _ = await post_form(self, self.hub, [("hub.mode", "publish")] + [("hub.topic", self.topic)] * 100)
            self.assertEqual(code, 202, body)

        return ensureDeferred(go())

    def test_busy_hub_answers_503(self) -> Any:
        async def go() -> None:
            await self.setup_hub(timeout=5.0)
            self.subscriber.sink.respond = lambda received: None  # never answers
            self.service.websub.max_verifications = 1
            self.service.websub.backlog = 0
            params = [("hub.mode", "subscribe"), ("hub.topic", self.topic), ("hub.callback", self.subscriber.callback)]
            code, _, _ = await post_form(self, self.hub, params)
            self.assertEqual(code, 202)
            for extra in ([], [("hub.verify", "sync")]):
                code, body, response = await post_form(self, self.hub, params + extra)
                self.assertEqual(code, 503, body)
                self.assertIn(b"try again later", body)
                self.assertEqual(response.headers.getRawHeaders("retry-after"), ["30"])
                self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])

        return ensureDeferred(go())

    def test_busy_publisher_answers_503(self) -> Any:
        """Publish pings need no token: past the bound on topic fetches they get ``503``."""

        async def go() -> None:
            await self.setup_hub(timeout=5.0)
            self.topic_server.sink.respond = lambda received: None  # never answers
            publisher = self.service.publisher
            publisher.max_fetches = 1
            publisher.backlog = 1
            first, second, third = (self.topic_server.url(f"/feed/{i}") for i in range(3))
            code, body, _ = await post_form(self, self.hub, [("hub.mode", "publish"), ("hub.url", first), ("hub.url", second)])
            self.assertEqual(code, 202, body)
            await self.topic_server.sink.wait_for(1)
            self.assertEqual((publisher.in_flight, publisher.queued), (1, 1))
            # A new topic would exceed the bound: refused whole, with a reason.
            for params in ([("hub.url", third)], [("hub.url", first), ("hub.topic", third)]):
                code, body, response = await post_form(self, self.hub, [("hub.mode", "publish")] + params)
                self.assertEqual(code, 503, body)
                self.assertIn(b"try again later", body)
                self.assertEqual(response.headers.getRawHeaders("retry-after"), ["30"])
                self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])
            code, body, _ = await post_form(self, f"{self.base}/publish", [("hub.url", third)])
            self.assertEqual(code, 503, body)
            # Topics already being fetched or waiting are folded in: accepted.
            code, body, _ = await post_form(self, self.hub, [("hub.mode", "publish"), ("hub.url", second), ("hub.url", first)])
            self.assertEqual(code, 202, body)
            self.assertEqual((publisher.in_flight, publisher.queued), (1, 1))
            self.assertEqual([r.path for r in self.topic_server.sink.received], ["/feed/0"])

        return ensureDeferred(go())

    def test_urls_with_userinfo_are_refused(self) -> Any:
        """``user:pass@host`` could never be reached (the client would read it as the host): ``400``."""

        async def go() -> None:
            await self.setup_hub()
            topic, callback = self.topic, self.subscriber.callback
            for bad in (
                callback.replace("http://", "http://user:pass@"),
                callback.replace("http://", "http://user@"),
                callback.replace("http://", "http://@"),
            ):
                cases = [
                    ([("hub.mode", "subscribe"), ("hub.topic", topic), ("hub.callback", bad)], "hub.callback"),
                    ([("hub.mode", "unsubscribe"), ("hub.topic", topic), ("hub.callback", bad)], "hub.callback"),
                    ([("hub.mode", "subscribe"), ("hub.topic", bad), ("hub.callback", callback)], "hub.topic"),
                    ([("hub.mode", "subscribe"), ("hub.topic", bad), ("hub.callback", callback), ("hub.verify", "sync")], "hub.topic"),
                    ([("hub.mode", "publish"), ("hub.url", bad)], "hub.url"),
                    ([("hub.mode", "publish"), ("hub.topic", bad)], "hub.url"),
                ]
                await self.assert_bad_requests(cases, "user name or password")
            # An "@" in the path or query string is no userinfo.
            code, body, _ = await post_form(self, self.hub, [("hub.mode", "subscribe"), ("hub.topic", topic + "?by=a@b"), ("hub.callback", callback + "/x@y")])
            self.assertEqual(code, 202, body)
            self.assertEqual(self.topic_server.sink.received, [], "refused pings fetch nothing")

        return ensureDeferred(go())
