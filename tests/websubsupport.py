"""
WebSub test fixtures: a scripted HTTP client for unit tests, and for tests
over real sockets a topic server and a subscriber that behave like the
websub.rocks suite (same checks on the hub's requests), and a test case
that starts Hookah as the hub between the two.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit

import attr
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from hookah.app import HookahService
from hookah.outbound.outcome import Response
from hookah.outbound.interface import IHTTPClient
from tests.support import Received, http_client, listen_sink, poll, start_hookah

FORM = {b"Content-Type": [b"application/x-www-form-urlencoded"]}


# -- unit level ---------------------------------------------------------------


@attr.s(auto_attribs=True)
class Call:
    method: str
    url: str
    headers: Sequence[Tuple[str, str]]
    body: Optional[bytes]
    result: Deferred

    @property
    def query(self) -> Dict[str, str]:
        return dict(parse_qsl(urlsplit(self.url).query, keep_blank_values=True))

    def answer(self, code: int, body: bytes = b"", headers: Sequence[Tuple[str, str]] = ()) -> None:
        self.result.callback(Response(code, tuple(headers), body))

    def echo(self) -> None:
        """Answer a verification as a willing subscriber: 200 and the challenge."""
        self.answer(200, self.query["hub.challenge"].encode())

    def error(self, exception: Exception) -> None:
        self.result.errback(exception)


@implementer(IHTTPClient)
class ScriptedClient:
    """An ``IHTTPClient`` stand-in: each request waits until the test answers it."""

    def __init__(self) -> None:
        self.calls: List[Call] = []

    def request(
        self,
        method: str,
        url: str,
        headers: Sequence[Tuple[str, str]] = (),
        body: Optional[bytes] = None,
        timeout: float = 30.0,
    ) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append(Call(method, url, tuple(headers), body, d))
        return d

    def pop(self) -> Call:
        assert self.calls, "no request was made"
        return self.calls.pop(0)


# -- over sockets -----------------------------------------------------------------


def parse_links(value: str) -> Dict[str, List[str]]:
    """rel -> URLs of a (comma-joined) Link header, like IndieWeb\\http_rels."""
    rels: Dict[str, List[str]] = {}
    for match in re.finditer(r'<([^>]*)>\s*((?:;\s*[^,;<]+)*)', value):
        url, params = match.group(1), match.group(2)
        rel = re.search(r'rel\s*=\s*"?([^";]+)"?', params)
        if rel:
            for name in rel.group(1).split():
                rels.setdefault(name, []).append(url)
    return rels


def signature_valid(header: Optional[str], secret: str, body: bytes) -> bool:
    """What p3k's WebSub client checks: ``alg=hex`` with sha1/256/384/512."""
    if not header or "=" not in header:
        return False
    algorithm, digest = header.split("=", 1)
    if algorithm not in ("sha1", "sha256", "sha384", "sha512"):
        return False
    expected = hmac.new(secret.encode(), body, getattr(hashlib, algorithm)).hexdigest()
    return hmac.compare_digest(expected, digest)


class TopicServer:
    """A publisher's topic URL: serves ``body`` with ``content_type`` and Link headers."""

    def __init__(self, testcase: TestCase, content_type: str, body: bytes, hub: str = "") -> None:
        self.sink, self.base = listen_sink(testcase)
        self.content_type = content_type
        self.body = body
        self.hub = hub
        self.sink.respond = self._respond

    def url(self, path: str = "/feed") -> str:
        return self.base + path

    def _respond(self, received: Received) -> Tuple[int, Dict[str, str], bytes]:
        headers = {"Content-Type": self.content_type}
        if self.hub:
            headers["Link"] = f'<{self.base}{received.path}>; rel="self", <{self.hub}>; rel="hub"'
        return 200, headers, self.body


class RocksSubscriber:
    """
    A subscriber that checks verification requests the way websub.rocks
    does (mode, topic, challenge, lease for subscribe; a 404 otherwise) and
    answers notifications with ``notify_code``.
    """

    def __init__(self, testcase: TestCase, topic: str) -> None:
        self.sink, self.base = listen_sink(testcase)
        self.topic = topic
        self.problems: List[str] = []
        self.notify_code = 200
        self.confirm = True
        self.sink.respond = self._respond

    @property
    def callback(self) -> str:
        return self.base + "/sub/token"

    @property
    def verifications(self) -> List[Received]:
        return [r for r in self.sink.received if r.method == "GET"]

    @property
    def notifications(self) -> List[Received]:
        return [r for r in self.sink.received if r.method == "POST"]

    def _respond(self, received: Received) -> Tuple[int, Dict[str, str], bytes]:
        if received.method == "POST":
            return self.notify_code, {}, b""
        params = dict(parse_qsl(urlsplit(received.path).query, keep_blank_values=True))
        problem = None
        if params.get("hub.mode") not in ("subscribe", "unsubscribe"):
            problem = "hub.mode is not subscribe or unsubscribe"
        elif params.get("hub.topic") != self.topic:
            problem = "hub.topic is incorrect"
        elif "hub.challenge" not in params:
            problem = "hub.challenge is missing"
        elif params["hub.mode"] == "subscribe" and "hub.lease_seconds" not in params:
            problem = "hub.lease_seconds is missing"
        if problem is not None:
            self.problems.append(problem)
            return 404, {}, b""
        if not self.confirm:
            return 404, {}, b""
        return 200, {"Content-Type": "text/plain"}, params["hub.challenge"].encode()


class HubTestCase(TestCase):
    """
    Hookah as the hub on a loopback port (``self.service``, ``self.base``,
    ``self.hub``), a ``TopicServer`` serving ``content_type``/``body`` at
    ``topic_path`` (``self.topic``), and a ``RocksSubscriber`` to it.
    """

    timeout = 30
    content_type = "text/plain; charset=utf-8"
    body = b"news\n"
    topic_path = "/feed"

    service: HookahService
    base: str
    hub: str
    topic_server: TopicServer
    topic: str
    subscriber: RocksSubscriber

    async def setup_hub(self, content_type: Optional[str] = None, body: Optional[bytes] = None, **config: Any) -> None:
        self.service, self.base = await start_hookah(self, **config)
        self.hub = self.base + "/hub"
        self.topic_server = TopicServer(
            self, content_type or self.content_type, self.body if body is None else body, hub=self.hub
        )
        self.topic = self.topic_server.url(self.topic_path)
        self.subscriber = RocksSubscriber(self, self.topic)

    async def assert_bad_requests(self, cases: Sequence[Tuple[Sequence[Tuple[str, str]], str]], *also: str) -> None:
        """Each (params, mentioned) posted to the hub is a plain-text 400 naming ``mentioned`` (and each of ``also``)."""
        for params, mentioned in cases:
            code, body, response = await post_form(self, self.hub, params)
            self.assertEqual(code, 400, (params, body))
            self.assertIn(mentioned, body.decode(), params)
            for text in also:
                self.assertIn(text, body.decode(), params)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])


async def post_form(
    testcase: TestCase, url: str, params: Sequence[Tuple[str, str]], host: Optional[str] = None
) -> Tuple[int, bytes, Any]:
    """POST ``params`` as a form (with ``host`` as the Host header if given): code, body, response."""
    client = http_client(testcase)
    headers = {**FORM, b"Host": [host.encode()]} if host is not None else FORM
    response = await client.post(url, data=urlencode(list(params)).encode(), headers=headers)
    body = await response.content()
    return response.code, body, response


async def get_json(testcase: TestCase, url: str) -> Any:
    client = http_client(testcase)
    response = await client.get(url)
    testcase.assertEqual(response.code, 200, url)
    return await response.json()


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``check`` (sync or async) until truthy; integration tests only."""
    return await poll(what, check, timeout, interval=0.02)


__all__ = [
    "Call",
    "HubTestCase",
    "ScriptedClient",
    "RocksSubscriber",
    "TopicServer",
    "eventually",
    "get_json",
    "parse_links",
    "post_form",
    "signature_valid",
]
