"""
Who may subscribe (issue 13, part 3): open by default, as WebSub expects;
``--subscribe-token`` closes (un)subscription to those presenting a token
(bearer header or ``access_token`` parameter; admin tokens too, in the
header only), and
``--subscribe-open`` leaves chosen topics open. Over real sockets, with a
subscriber that answers verifications.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple
from urllib.parse import urlencode

from twisted.internet.defer import ensureDeferred

from tests.support import http_client
from tests.websubsupport import HubTestCase, eventually, post_form

FORM = {b"Content-Type": [b"application/x-www-form-urlencoded"]}


class SubscribeAccessTests(HubTestCase):
    def subscribe_params(self, topic: Optional[str] = None, mode: str = "subscribe") -> List[Tuple[str, str]]:
        return [
            ("hub.mode", mode),
            ("hub.topic", topic or self.topic),
            ("hub.callback", self.subscriber.callback),
        ]

    async def post(
        self, params: List[Tuple[str, str]], token: Optional[str] = None, url: Optional[str] = None,
    ) -> Tuple[int, str, Any]:
        headers = dict(FORM)
        if token is not None:
            headers[b"Authorization"] = [b"Bearer " + token.encode()]
        response = await http_client(self).post(url or self.hub, data=urlencode(params).encode(), headers=headers)
        return response.code, (await response.content()).decode(), response

    async def subscriptions(self) -> List[str]:
        return [s.callback for s in await self.service.store.list_subscriptions(self.topic)]

    def test_open_by_default(self) -> Any:
        async def go() -> None:
            await self.setup_hub()
            code, body, _ = await post_form(self, self.hub, self.subscribe_params())
            self.assertEqual(code, 202, body)
            await eventually(self.subscriptions, what="the subscription")

        return ensureDeferred(go())

    def test_subscribe_token_closes_subscription(self) -> Any:
        async def go() -> None:
            await self.setup_hub(subscribe_tokens=("sub-secret",), admin_tokens=("admin-secret",), publisher_tokens=("pub-secret",))
            code, body, response = await self.post(self.subscribe_params())
            self.assertEqual(code, 401, body)
            self.assertIn("subscribe token", body)
            self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="hookah"'])
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])
            for wrong in ("nope", "pub-secret"):
                code, body, _ = await self.post(self.subscribe_params(), token=wrong)
                self.assertEqual(code, 403, (wrong, body))
            code, body, _ = await self.post(self.subscribe_params() + [("access_token", "nope")])
            self.assertEqual(code, 403, body)
            # Nothing refused reached the callback or storage.
            self.assertEqual(self.subscriber.verifications, [])
            self.assertEqual(await self.subscriptions(), [])

            # The bearer header; then the parameter, in the hub URL a plain
            # subscriber is given, and in the form; an admin token too.
            code, body, _ = await self.post(self.subscribe_params(), token="sub-secret")
            self.assertEqual(code, 202, body)
            await eventually(self.subscriptions, what="the subscription")
            code, body, _ = await self.post(self.subscribe_params(mode="unsubscribe"))
            self.assertEqual(code, 401, body)  # unsubscribing is closed too
            code, body, _ = await self.post(self.subscribe_params(mode="unsubscribe"), url=self.hub + "?access_token=sub-secret")
            self.assertEqual(code, 202, body)
            await eventually(lambda: not self.subscriber.problems and len(self.subscriber.verifications) == 2, what="the unsubscription")
            async def gone() -> bool:
                return await self.subscriptions() == []

            await eventually(gone, what="the subscription to go")
            code, body, _ = await self.post(self.subscribe_params() + [("access_token", "sub-secret")])
            self.assertEqual(code, 202, body)
            code, body, _ = await self.post(self.subscribe_params(), token="admin-secret")
            self.assertEqual(code, 202, body)
            await eventually(self.subscriptions, what="the subscription again")
            self.assertEqual(self.subscriber.problems, [])

        return ensureDeferred(go())

    def test_admin_token_only_in_the_header(self) -> Any:
        """
        An admin token given as ``access_token`` (in the hub URL or the
        form) is refused, not honoured: parameters are meant for URLs,
        which end up in logs, and an admin token must never be there.
        """

        async def go() -> None:
            await self.setup_hub(subscribe_tokens=("sub-secret",), admin_tokens=("admin-secret",))
            for url, extra in ((self.hub + "?access_token=admin-secret", []), (None, [("access_token", "admin-secret")])):
                code, body, response = await self.post(self.subscribe_params() + extra, url=url)
                self.assertEqual(code, 403, body)
                self.assertIn("only as Authorization: Bearer", body)
                self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])
            self.assertEqual(self.subscriber.verifications, [])
            self.assertEqual(await self.subscriptions(), [])
            # The header wins over the parameter, and the header may carry it.
            code, body, _ = await self.post(
                self.subscribe_params(), token="admin-secret", url=self.hub + "?access_token=nope"
            )
            self.assertEqual(code, 202, body)
            await eventually(self.subscriptions, what="the subscription")

        return ensureDeferred(go())

    def test_open_topics_need_no_token(self) -> Any:
        async def go() -> None:
            await self.setup_hub(subscribe_tokens=("sub-secret",), subscribe_open=("http://127.0.0.1:*/public/*",))
            public = self.topic_server.base + "/public/feed"
            self.subscriber.topic = public
            code, body, _ = await self.post(self.subscribe_params(topic=public))
            self.assertEqual(code, 202, body)
            await eventually(lambda: self.service.store.list_subscriptions(public), what="the open subscription")
            code, body, _ = await self.post(self.subscribe_params())
            self.assertEqual(code, 401, body)
            code, body, _ = await self.post(self.subscribe_params(topic=self.topic_server.base + "/publicity"))
            self.assertEqual(code, 401, body)

        return ensureDeferred(go())

    def test_publishing_is_not_a_subscription(self) -> Any:
        async def go() -> None:
            await self.setup_hub(subscribe_tokens=("sub-secret",))
            code, body, _ = await post_form(self, self.hub, [("hub.mode", "publish"), ("hub.url", self.topic)])
            self.assertEqual(code, 202, body)

        return ensureDeferred(go())
