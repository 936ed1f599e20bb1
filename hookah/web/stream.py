"""
``/stream``: long-lived responses carrying a topic's events as they happen
(the README's "Streams" section documents them).

This module reads the request (topics, format, backfill) and refuses bad
ones with a ``400`` before any stream exists; ``HTTPStream`` carries the
open response and ``TopicRegistry`` feeds it.

- ``topic`` may repeat and each value may hold several comma-separated
  topics (a topic name therefore cannot contain a comma here).
- ``format=json`` (default) or ``format=sse``; ``Accept: text/event-stream``
  also selects SSE when ``format`` is absent. ``delimited=length`` adds
  length prefixes to the JSON format.
- ``Last-Event-ID`` (header, as ``EventSource`` sends on reconnecting) or
  ``last_event_id`` resumes after that id from the history in storage; the
  header wins, because a reconnecting ``EventSource`` repeats the original
  URL. Otherwise ``count=N`` replays the newest N events first.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import attr
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

from hookah.core import EventHistory
from hookah.websub.subscriptions import decode_unreserved
from hookah.streams.format import FORMATS, JSON_LINES, LENGTH_DELIMITED, SSE, StreamFormat
from hookah.streams.registry import TopicRegistry
from hookah.web.common import ApiError, JsonResource, error_body, int_arg
from hookah.web.httpstream import HTTPStream

__all__ = [
    "StreamResource", "StreamRequest", "parse_stream_request", "requested_topics", "split_topics", "MAX_COUNT", "MAX_TOPICS",
]

log = Logger()

MAX_COUNT = 10000
MAX_TOPICS = 100
MAX_ID_LENGTH = 200


@attr.s(auto_attribs=True, frozen=True)
class StreamRequest:
    topics: List[str]
    format: StreamFormat
    count: int = 0
    last_event_id: Optional[str] = None


def _values(request: server.Request, name: bytes) -> List[str]:
    return [v.decode("utf-8", "replace") for v in (request.args or {}).get(name, [])]


def _wants_sse(request: server.Request) -> bool:
    """Whether ``Accept`` names ``text/event-stream`` (with a quality above 0)."""
    accept = request.getHeader(b"accept")
    if not accept:
        return False
    for media_range in accept.decode("latin-1").split(","):
        media, *params = media_range.split(";")
        if media.strip().lower() != "text/event-stream":
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def split_topics(values: Iterable[str]) -> List[str]:
    """
    ``topic`` values as one list of names: each value may hold several,
    comma-separated; unreserved escapes decoded as the hub does; each once.
    """
    topics: List[str] = []
    for value in values:
        for topic in value.split(","):
            topic = decode_unreserved(topic.strip())
            if topic and topic not in topics:
                topics.append(topic)
    return topics


def requested_topics(request: server.Request) -> List[str]:
    """The topics a ``/stream`` request names (unchecked: may be none, or too many)."""
    return split_topics(_values(request, b"topic"))


def parse_stream_request(request: server.Request) -> StreamRequest:
    """A checked ``StreamRequest``, or ``ApiError`` for a ``400``."""
    topics = requested_topics(request)
    if not topics:
        raise ApiError(400, "missing_topic", "Give at least one topic: /stream?topic=<name> (repeat it or separate with commas for several).")
    if len(topics) > MAX_TOPICS:
        raise ApiError(400, "too_many_topics", f"One stream can follow at most {MAX_TOPICS} topics.")

    args: Dict[str, str] = {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace") for k, v in (request.args or {}).items() if v}
    format_name = args.get("format")
    if format_name is None:
        fmt = SSE if _wants_sse(request) else JSON_LINES
    elif format_name in ("json", "sse"):
        fmt = FORMATS[format_name]
    else:
        hint = " (length prefixes are delimited=length, with the json format)" if format_name == "length" else ""
        raise ApiError(400, "bad_parameter", f"format must be json or sse, not {format_name!r}{hint}.")
    delimited = args.get("delimited")
    if delimited is not None and delimited != "":
        if delimited != "length":
            raise ApiError(400, "bad_parameter", f"delimited must be length, not {delimited!r}.")
        if fmt is SSE:
            raise ApiError(400, "bad_parameter", "delimited=length applies to the JSON format, not to Server-Sent Events.")
        fmt = LENGTH_DELIMITED

    count = int_arg(args, "count", 0, 0, MAX_COUNT)
    raw_id = request.getHeader(b"last-event-id")
    last_id = raw_id.decode("utf-8", "replace").strip() if raw_id is not None else args.get("last_event_id")
    if last_id is not None:
        last_id = last_id.strip() or None
    if last_id is not None and len(last_id) > MAX_ID_LENGTH:
        raise ApiError(400, "bad_parameter", "Last-Event-ID is too long to be an event id.")
    return StreamRequest(topics, fmt, count, last_id)


class StreamResource(JsonResource):
    """
    ``GET /stream``. ``ends_at``, when given, says when a request's stream
    must end whatever its reader wants (the expiry of the short-lived token
    it was opened with, ``hookah.web.streamtokens``), or None for never.
    """

    isLeaf = True
    not_allowed_message = "A stream is read with GET."

    def __init__(
        self,
        registry: TopicRegistry,
        history: EventHistory,
        clock: IReactorTime,
        buffer_limit: int,
        ends_at: Optional[Callable[[server.Request], Optional[float]]] = None,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.history = history
        self.clock = clock
        self.buffer_limit = buffer_limit
        self.ends_at = ends_at

    def render_GET(self, request: server.Request) -> Any:
        try:
            wanted = parse_stream_request(request)
        except ApiError as e:
            return error_body(request, e)
        admit = getattr(getattr(request, "site", None), "admit_stream", None)
        if admit is not None and not admit(request):
            request.setHeader(b"Retry-After", b"5")
            return error_body(
                request,
                ApiError(503, "too_many_streams", "Hookah has as many streams open as it is configured to allow; retry shortly."),
            )
        stream = HTTPStream(request, self.registry, wanted.topics, wanted.format, self.buffer_limit, self.clock)
        stream.start_response()
        until = self.ends_at(request) if self.ends_at is not None else None
        if until is not None:
            self._end_at(request, stream, until)
        d = ensureDeferred(stream.replay(self.history, wanted.last_event_id, wanted.count))
        d.addErrback(lambda f: log.failure("opening a stream failed", f))
        return server.NOT_DONE_YET

    def _end_at(self, request: server.Request, stream: HTTPStream, until: float) -> None:
        """End the stream at ``until`` with a last message that says why and how to go on."""
        # Called while the request renders, so its client is still there
        # and notifyFinish will report its end, cancelling the call.
        call = self.clock.callLater(
            max(0.0, until - self.clock.seconds()),
            stream.close,
            "its token expired",
            {
                "error": "token_expired",
                "message": "The token this stream was opened with has expired; open it again with a new token "
                "and last_event_id set to the last event's id to go on where it stopped.",
            },
        )
        request.notifyFinish().addBoth(lambda _: call.cancel() if call.active() else None)

    def render_HEAD(self, request: server.Request) -> Any:
        try:
            wanted = parse_stream_request(request)
        except ApiError as e:
            return error_body(request, e)
        request.setHeader(b"Content-Type", wanted.format.content_type)
        request.setHeader(b"Cache-Control", b"no-cache")
        return b""
