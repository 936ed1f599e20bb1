"""
The websub.rocks hub tests 100-106, over real sockets: Hookah is the hub, a
local topic server is the publisher, and a local subscriber checks each
request the way websub.rocks does (``app/Hub.php`` of that suite):

- the subscription request is answered ``202``;
- the verification carries hub.mode, the right hub.topic, hub.challenge,
  and hub.lease_seconds for subscribe;
- after ``hub.mode=publish&hub.topic=...``, the notification's body equals
  the topic's, its Content-Type is byte-identical to the topic's, its Link
  header has rel=hub equal to the hub URL the subscriber was given and a
  rel=self, and X-Hub-Signature is absent without a secret and valid with one.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from twisted.internet.defer import ensureDeferred

from hookah.model import KIND_WEBSUB
from tests.websubsupport import (
    HubTestCase,
    eventually,
    get_json,
    parse_links,
    post_form,
    signature_valid,
)

HTML = "text/html; charset=UTF-8"
FEED = b"<!doctype html><html><body><div class=\"h-entry\">Hello, hub</div></body></html>\n"


class RocksHubTests(HubTestCase):
    content_type = HTML
    body = FEED
    topic_path = "/hub/100/pub/token"

    async def subscriptions(self) -> List[Any]:
        listing = await get_json(self, f"{self.base}/hub/subscriptions")
        return [s for s in listing["subscriptions"] if s["topic"] == self.topic]

    async def subscribe(self, mode: str = "subscribe", extra: Sequence[Tuple[str, str]] = ()) -> None:
        """Send the request, check 202, then wait for a verification that passes."""
        before = len(self.subscriber.verifications)
        params = [("hub.mode", mode), ("hub.topic", self.topic), ("hub.callback", self.subscriber.callback)]
        code, body, _ = await post_form(self, self.hub, params + list(extra))
        self.assertEqual(code, 202, body)
        await self.subscriber.sink.wait_for(before + 1)
        self.assertEqual(self.subscriber.problems, [])
        verification = self.subscriber.verifications[-1]
        self.assertIn(f"hub.mode={mode}", verification.path)

        async def applied() -> bool:
            found = await self.subscriptions()
            return bool(found) if mode == "subscribe" else not found

        await eventually(applied, what=f"the {mode} to take effect")

    async def publish(self) -> None:
        code, body, _ = await post_form(self, self.hub, [("hub.mode", "publish"), ("hub.topic", self.topic)])
        self.assertEqual(code, 202, body)

    async def websub_deliveries(self) -> List[Any]:
        page = await self.service.store.list_deliveries(None, 1000, None)
        return [d for d in page if d.kind == KIND_WEBSUB]

    async def events(self) -> List[Any]:
        page = await self.service.store.events_after([self.topic], None, 100)
        return list(page)

    async def notification(self, count: int = 1) -> Any:
        await eventually(lambda: len(self.subscriber.notifications) >= count, what="a notification")
        return self.subscriber.notifications[count - 1]

    def check_notification(self, received: Any, secret: Optional[str] = None, hub: Optional[str] = None) -> None:
        self.assertEqual(received.body.strip(), self.topic_server.body.strip())
        self.assertEqual(received.header("Content-Type"), self.topic_server.content_type)
        links = parse_links(", ".join(received.headers.get("link", [])))
        self.assertEqual(links.get("hub", [None])[0], hub or self.hub)
        self.assertEqual(links.get("self"), [self.topic])
        if secret is None:
            self.assertNotIn("x-hub-signature", received.headers)
        else:
            self.assertTrue(signature_valid(received.header("X-Hub-Signature"), secret, received.body))

    def test_100_typical_subscriber_request(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            await self.subscribe()
            verification = self.subscriber.verifications[0]
            self.assertTrue(verification.path.startswith("/sub/token?"))
            await self.publish()
            self.check_notification(await self.notification())

        return ensureDeferred(go())

    def test_100_with_public_url(self) -> Any:
        """rel=hub is --public-url + /hub, byte for byte, whatever Host the requests used."""

        async def go() -> None:
            await self.setup_hub(public_url="https://hooks.example.test/")
            await self.subscribe()
            await self.publish()
            self.check_notification(await self.notification(), hub="https://hooks.example.test/hub")

        return ensureDeferred(go())

    def test_101_subscription_with_secret(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            secret = "0123456789abcdefABCD"
            await self.subscribe(extra=[("hub.secret", secret)])
            await self.publish()
            received = await self.notification()
            self.check_notification(received, secret=secret)
            self.assertTrue(received.header("X-Hub-Signature").startswith("sha256="))
            self.assertFalse(signature_valid(received.header("X-Hub-Signature"), "wrong secret", received.body))

        return ensureDeferred(go())

    def test_102_additional_parameters_ignored(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            await self.subscribe(extra=[("foo", "bar"), ("hub.foo", "hub.bar")])
            verification = self.subscriber.verifications[0]
            self.assertNotIn("foo", verification.path)
            await self.publish()
            self.check_notification(await self.notification())

        return ensureDeferred(go())

    def test_103_resubscribe_before_expiration(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            await self.subscribe()
            first = (await self.subscriptions())[0]
            await self.subscribe()
            self.assertEqual(len(self.subscriber.verifications), 2)
            challenges = [v.path.split("hub.challenge=")[1].split("&")[0] for v in self.subscriber.verifications]
            self.assertNotEqual(challenges[0], challenges[1])
            renewed = await self.subscriptions()
            self.assertEqual(len(renewed), 1)
            self.assertGreaterEqual(renewed[0]["expires_at"], first["expires_at"])
            await self.publish()
            self.check_notification(await self.notification())
            # Deliveries are made with the event, atomically: exactly one.
            self.assertEqual(len(await self.websub_deliveries()), 1)
            self.assertEqual(len(self.subscriber.notifications), 1)

        return ensureDeferred(go())

    def test_104_unsubscribe(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            await self.subscribe()
            await self.subscribe("unsubscribe")
            self.assertIn("hub.mode=unsubscribe", self.subscriber.verifications[-1].path)
            await self.publish()
            await eventually(self.events, what="the published event")
            self.assertEqual(await self.websub_deliveries(), [])
            self.assertEqual(self.subscriber.notifications, [])

        return ensureDeferred(go())

    async def check_topic_of_type(self, content_type: str, body: bytes) -> None:
        """Subscribe to a topic of ``content_type``, publish, and check the notification."""
        await self.setup_hub(content_type, body)
        await self.subscribe()
        await self.publish()
        self.check_notification(await self.notification())

    def test_105_plaintext_topic(self) -> Any:
        return ensureDeferred(self.check_topic_of_type("text/plain", b"Just some text.\nAnd more.\n"))

    def test_106_json_topic(self) -> Any:
        return ensureDeferred(self.check_topic_of_type("application/json", b'{"items": [{"content": "hello"}]}'))
