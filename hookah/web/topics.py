"""
``/topics``: what each topic holds, and ``/topics/<T>/events``, its history.

Topics are often URLs (WebSub topics are), so the name travels
percent-encoded as one path segment: ``/topics/https%3A%2F%2Fexample.com%2Ffeed/events``.
An unencoded name (``/topics/https://example.com/feed/events``) is accepted
too: every segment before the final ``events`` is part of the name.
Events are in the JSON form of ``hookah.streams.eventjson``, shared with ``/stream``.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from hookah.websub.subscriptions import decode_unreserved
from hookah.core import HookahCore
from hookah.streams.eventjson import event_to_json
from hookah.web.backpressure import Backpressure
from hookah.web.common import (
    ApiError, JsonResource, NotFound, error_body, int_arg, json_body, query_args, render_async,
)

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
# Bytes of event bodies one answer carries at most (and at least one event).
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# Events and bytes of bodies read from storage per query.
READ_EVENTS = 100
READ_BYTES = 256 * 1024

log = Logger()
HOW_TO = "Use /topics/<percent-encoded topic>/events."


class TopicsResource(JsonResource):
    """``GET /topics``: each topic with its number of stored events and active subscribers."""

    def __init__(self, core: HookahCore) -> None:
        super().__init__()
        self.core = core

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"" and not request.postpath:
            return self
        rest: List[bytes] = list(request.postpath or [])
        segments = [path] + rest
        if len(segments) < 2 or segments[-1] != b"events" or segments[:-1] == [b""]:
            return NotFound(HOW_TO)
        if request.prepath is not None:
            request.prepath.extend(rest)
        request.postpath = []
        try:
            topic = decode_unreserved(b"/".join(segments[:-1]).decode("utf-8"))
        except UnicodeDecodeError:
            return NotFound("A topic name must be UTF-8 once percent-decoded.")
        return TopicEventsResource(self.core, topic)

    def render_GET(self, request: server.Request) -> Any:
        async def handle() -> bytes:
            topics = await self.core.list_topics()
            return json_body(
                request,
                200,
                {"topics": [{"topic": t, "events": e, "subscribers": s} for t, e, s in topics]},
            )

        return render_async(request, handle)


class TopicEventsResource(JsonResource):
    """
    ``GET /topics/<T>/events?after=<event id>&limit=N``: a page of history,
    oldest first.

    The answer is written as storage is read, ``READ_EVENTS`` events and
    ``READ_BYTES`` bytes of bodies per query, each query once the reader has
    taken what came before (``Backpressure``): a reader that does not read
    holds one read's worth and the transport's buffer, not the answer. One
    answer carries at most ``limit`` events and ``MAX_ANSWER_BYTES`` of
    bodies (always at least one event); ``next`` then names the last event
    sent, to ask for the rest with ``after``.
    """

    isLeaf = True

    def __init__(self, core: HookahCore, topic: str) -> None:
        super().__init__()
        self.core = core
        self.topic = topic

    def render_GET(self, request: server.Request) -> Any:
        args = query_args(request)
        try:
            limit = int_arg(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        except ApiError as e:
            return error_body(request, e)
        after = args.get("after") or None
        d = ensureDeferred(self._answer(request, Backpressure(request), limit, after))
        d.addErrback(lambda f: log.failure("writing the history of {topic} failed", f, topic=self.topic))
        return server.NOT_DONE_YET

    async def _answer(self, request: server.Request, writer: Backpressure, limit: int, after: Optional[str]) -> None:
        asked = (min(READ_EVENTS, limit), min(READ_BYTES, MAX_ANSWER_BYTES))
        try:
            page = await self.core.events_page([self.topic], after, *asked)
        except Exception:
            log.failure("reading the history of {topic} failed", topic=self.topic)
            body = error_body(request, ApiError(500, "internal_error", "Hookah failed to handle this request; see its log."))
            writer.done()
            if not writer.gone:
                request.write(body)
                request.finish()
            return
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(b'{"topic":' + _json(self.topic) + b',"events":[')
        sent = size = 0
        try:
            while True:
                for event in page:
                    request.write((b"," if sent else b"") + _json(event_to_json(event)))
                    sent += 1
                    size += len(event.body)
                    after = event.id
                # Short of both bounds: storage holds no more.
                exhausted = len(page) < asked[0] and sum(len(e.body) for e in page) < asked[1]
                page = []
                if exhausted or sent >= limit or size >= MAX_ANSWER_BYTES:
                    break
                await writer.drained()
                if writer.gone:
                    return
                asked = (min(READ_EVENTS, limit - sent), min(READ_BYTES, MAX_ANSWER_BYTES - size))
                page = await self.core.events_page([self.topic], after, *asked)
        except Exception:
            # The status is out: all that can be said is that the answer is
            # cut short, which a JSON reader cannot mistake for a whole one.
            log.failure("reading the history of {topic} failed", topic=self.topic)
            writer.done()
            request.loseConnection()
            return
        writer.done()
        if writer.gone:
            return
        more = sent > 0 and (sent >= limit or not exhausted)
        request.write(b'],"next":' + _json(after if more else None) + b"}\n")
        request.finish()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
