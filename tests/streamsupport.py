"""
Fixtures for stream tests without sockets: a ``/stream`` site on a ``Clock``,
connections over ``StringTransport`` whose back-pressure the test drives by
hand, and a store whose history queries answer when the test says so.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.web.resource import Resource

from hookah.model import Event
from hookah.storage.memory import MemoryStore
from hookah.streams.parse import parser_for
from hookah.streams.registry import TopicRegistry
from hookah.web.common import HookahSite, make_site
from hookah.web.httpstream import HTTPStream
from hookah.web.stream import StreamResource
from tests.streamwire import ResponseReader


class GatedStore:
    """
    A ``MemoryStore`` whose history pages (``events_page``, ``resume_page``, ``events_after``,
    ``last_events``) answer only once ``release()`` is called: what storage returns is computed at release time,
    as a real query that finishes late would see rows committed meanwhile
    only if they were there when it read, so ``snapshot_at_call`` picks.
    """

    def __init__(self, store: MemoryStore, snapshot_at_call: bool = False) -> None:
        self.store = store
        self.snapshot_at_call = snapshot_at_call
        self.pending: List[Tuple[Deferred, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _gate(self, query: Any) -> Deferred:
        d: Deferred = Deferred()
        if self.snapshot_at_call:
            result = query()
            self.pending.append((d, lambda: result))
        else:
            self.pending.append((d, query))
        return d

    def events_after(self, topics: Sequence[str], after: Optional[str], limit: int) -> Deferred:
        return self._gate(lambda: self.store.events_after(topics, after, limit).result)

    def last_events(self, topics: Sequence[str], count: int) -> Deferred:
        return self._gate(lambda: self.store.last_events(topics, count).result)

    def events_page(self, topics: Sequence[str], after: Optional[str], limit: int, max_bytes: int) -> Deferred:
        return self._gate(lambda: self.store.events_page(topics, after, limit, max_bytes).result)

    def resume_page(self, topics: Sequence[str], after: str, limit: int, max_bytes: int) -> Deferred:
        return self._gate(lambda: self.store.resume_page(topics, after, limit, max_bytes).result)

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, query in pending:
            d.callback(query())


class StreamHarness:
    """A ``/stream`` resource with its own registry, on a ``Clock``."""

    def __init__(self, gate: Optional[bool] = None, keepalive: float = 30.0, limit: int = 64 * 1024) -> None:
        """``gate``: ``None`` for a plain store, else a ``GatedStore`` (``snapshot_at_call=gate``) as ``self.gated``."""
        self.clock = Clock()
        self.memory = MemoryStore(self.clock)
        self.gated: Any = GatedStore(self.memory, snapshot_at_call=gate) if gate is not None else None
        self.store: Any = self.gated if self.gated is not None else self.memory
        self.registry = TopicRegistry(self.clock, keepalive)
        root = Resource()
        root.putChild(b"stream", StreamResource(self.registry, self.store, self.clock, limit))
        self.site: HookahSite = make_site(root, 1024 * 1024, reactor=self.clock)
        self._ids = 0

    def event(self, topic: str, body: bytes = b"{}", content_type: str = "application/json") -> Event:
        self._ids += 1
        return Event(id=f"E{self._ids:06d}", topic=topic, body=body, content_type=content_type, created_at=float(self._ids))

    def store_event(self, event: Event) -> Event:
        self.memory.add_event(event, [], 10000, -1.0)
        return event

    def publish(self, event: Event) -> Event:
        """What ``HookahCore.publish`` does: store, then announce live."""
        self.store_event(event)
        self.registry.publish(event)
        return event

    def streams(self) -> List[HTTPStream]:
        return [cast(HTTPStream, s) for s in self.registry._streams]

    def connect(self, query: str, headers: bytes = b"", version: bytes = b"HTTP/1.1") -> Conn:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /stream?" + query.encode() + b" " + version + b"\r\nHost: test\r\n" + headers + b"\r\n")
        return Conn(channel, transport)


class Conn:
    """One in-memory client connection; ``read()`` parses what has arrived."""

    def __init__(self, channel: Any, transport: StringTransport) -> None:
        self.channel = channel
        self.transport = transport
        self.response = ResponseReader()
        self.parser: Any = None
        self.body = b""
        self.messages: List[Any] = []

    def read(self) -> List[Any]:
        data = self.transport.value()
        self.transport.clear()
        body = self.response.feed(data)
        self.body += body
        if self.parser is None and self.response.status is not None:
            content_type = self.response.headers.get("content-type", "")
            self.parser = parser_for("sse" if content_type.startswith("text/event-stream") else self.format_hint)
        if self.parser is not None and body:
            self.messages.extend(self.parser.feed(body))
        return self.messages

    format_hint = "json"

    def pause(self) -> None:
        """The transport's buffer is full, as a real transport would say."""
        producer: Any = self.transport.producer
        producer.pauseProducing()

    def resume(self) -> None:
        producer: Any = self.transport.producer
        producer.resumeProducing()

    def drop(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))

    def ids(self) -> List[str]:
        return [m["id"] if isinstance(m, dict) else m.id for m in self.read() if not _is_error(m)]


def _is_error(message: Any) -> bool:
    return isinstance(message, dict) and ("error" in message or "gap" in message)
