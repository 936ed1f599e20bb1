"""
``/topics``: what each topic holds, and ``/topics/<T>/events``, its history.

Topics are often URLs (WebSub topics are), so the name travels
percent-encoded as one path segment: ``/topics/https%3A%2F%2Fexample.com%2Ffeed/events``.
An unencoded name (``/topics/https://example.com/feed/events``) is accepted
too: every segment before the final ``events`` is part of the name.
Events are in the JSON form of ``hookah.streams.eventjson``, shared with ``/stream``.
"""

from __future__ import annotations

from typing import Any, List

from twisted.web import server
from twisted.web.resource import Resource

from hookah.websub.subscriptions import decode_unreserved
from hookah.storage.interface import IStore
from hookah.streams.eventjson import event_to_json
from hookah.web.common import JsonResource, NotFound, int_arg, json_body, query_args, render_async

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
HOW_TO = "Use /topics/<percent-encoded topic>/events."


class TopicsResource(JsonResource):
    """``GET /topics``: each topic with its number of stored events and active subscribers."""

    def __init__(self, store: IStore) -> None:
        super().__init__()
        self.store = store

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
        return TopicEventsResource(self.store, topic)

    def render_GET(self, request: server.Request) -> Any:
        async def handle() -> bytes:
            topics = await self.store.list_topics()
            return json_body(
                request,
                200,
                {"topics": [{"topic": t, "events": e, "subscribers": s} for t, e, s in topics]},
            )

        return render_async(request, handle)


class TopicEventsResource(JsonResource):
    """``GET /topics/<T>/events?after=<event id>&limit=N``: a page of history, oldest first."""

    isLeaf = True

    def __init__(self, store: IStore, topic: str) -> None:
        super().__init__()
        self.store = store
        self.topic = topic

    def render_GET(self, request: server.Request) -> Any:
        async def handle() -> bytes:
            args = query_args(request)
            limit = int_arg(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
            after = args.get("after") or None
            events = await self.store.events_after([self.topic], after, limit)
            return json_body(
                request,
                200,
                {
                    "topic": self.topic,
                    "events": [event_to_json(e) for e in events],
                    "next": events[-1].id if len(events) == limit else None,
                },
            )

        return render_async(request, handle)

