"""
Streams across nodes: the live feed of a node whose store other nodes share.

On a shared store (PostgreSQL) an event may be committed by any node, and
the streams open on this node must see every event of their topics in the
order they were committed, with no gaps and no duplicates. So on such a
node the registry is fed from the database, never straight from a publish:
each committed event carries its topic's sequence number (assigned in
commit order), the store tells the relay that a topic moved (a local commit,
or another node's ``NOTIFY``), and the relay reads the events after the last
number it handed on, in order, and publishes them to the registry.

Only topics with readers on this node are followed, and a topic's cursor is
dropped with its last reader, so what the relay keeps is bounded by the
topics read here. A topic first followed starts just before the event that
was announced. After the listening connection comes back, every followed
topic is read again (the catch-up read), so a dropped connection loses
nothing.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hookah.model import Event
from hookah.streams.registry import TopicRegistry

log = Logger()

PAGE = 500


class StreamRelay:
    """Feeds ``registry`` with what every node commits, through ``store.events_since``."""

    def __init__(self, store: Any, registry: TopicRegistry, page: int = PAGE) -> None:
        self.store = store
        self.registry = registry
        self.page = page
        self.cursors: Dict[str, int] = {}
        self._reading: Set[str] = set()
        self._again: Set[str] = set()
        self.relayed = 0

    def committed(self, topic: Optional[str], seq: Optional[int]) -> None:
        """The store's event listener: ``topic`` moved (``None``: any topic may have)."""
        if topic is None:
            for followed in list(self.cursors):
                self._read(followed)
            return
        if topic not in self.cursors:
            if not self.registry.readers(topic) or seq is None:
                return
            self.cursors[topic] = seq - 1
        self._read(topic)

    def _read(self, topic: str) -> None:
        if topic in self._reading:
            self._again.add(topic)
            return
        if not self.registry.readers(topic):
            # Its last reader left: stop following it.
            self.cursors.pop(topic, None)
            return
        self._reading.add(topic)
        d: Deferred[List[Tuple[int, Event]]] = self.store.events_since(topic, self.cursors[topic], self.page)
        d.addCallback(self._publish, topic)
        d.addErrback(lambda f: log.warn("reading new events of {topic} failed: {error}", topic=topic, error=f.getErrorMessage()))
        d.addBoth(self._read_done, topic)

    def _publish(self, events: List[Tuple[int, Event]], topic: str) -> None:
        for seq, event in events:
            if seq <= self.cursors.get(topic, seq - 1):
                continue
            self.cursors[topic] = seq
            self.relayed += 1
            self.registry.publish(event)
        if len(events) >= self.page:
            self._again.add(topic)

    def _read_done(self, _: object, topic: str) -> None:
        self._reading.discard(topic)
        if topic in self._again:
            self._again.discard(topic)
            if topic in self.cursors:
                self._read(topic)
