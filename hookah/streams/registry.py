"""
The live side of topics: which open streams listen to which topic, and the
one timer that keeps them all alive.

Publishing must cost in proportion to a topic's own readers, never to every
open stream, so the registry is a dict from topic to the set of streams on
it; a topic's entry disappears with its last reader, so nothing accumulates
for topics nobody reads any more. Each event is encoded once per format in
use (``FrameCache``) and the same bytes go to every stream.

Keep-alives come from one ``LoopingCall`` for all streams, started with the
first stream and stopped with the last: a timer per stream would be a
thousand timers to reschedule. The registry only knows streams through
``ILiveStream``, so it is tested with plain fakes and the HTTP details stay
in ``hookah.web.stream``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from hookah.listeners import IEventListener
from hookah.model import Event
from hookah.streams.format import FrameCache

__all__ = ["ILiveStream", "TopicRegistry", "BURST_GAP"]

log = Logger()

# Publishes closer together than this (seconds) form a burst: see ``publish``.
BURST_GAP = 0.001


class ILiveStream(Interface):
    """One open stream as the registry sees it."""

    topics = Attribute("The topics it listens to (a tuple of str, no duplicates).")

    def deliver(event, frames):  # type: ignore[misc]
        """
        Send ``event``, whose bytes ``frames.get(format, chunked)`` returns
        (encoded at most once per publish). Must not raise.
        """

    def keepalive():  # type: ignore[misc]
        """Send the format's keep-alive bytes if the stream can take them."""

    def close(reason):  # type: ignore[misc]
        """
        End the stream cleanly (``reason`` is for the log). Deferred[None]
        fired once the connection is gone.
        """


@implementer(IEventListener)
class TopicRegistry:
    def __init__(self, clock: IReactorTime, keepalive: float) -> None:
        self.clock = clock
        self.keepalive_interval = keepalive
        self._by_topic: Dict[str, Set[ILiveStream]] = {}
        self._streams: Set[ILiveStream] = set()
        self._ticker: Optional[LoopingCall] = None
        # The newest event id the live feed has carried: a stream replaying
        # history uses it to tell which replayed events may still arrive live.
        self.last_announced: Optional[str] = None
        self._last_publish = float("-inf")

    # -- membership -----------------------------------------------------------

    def add(self, stream: ILiveStream) -> None:
        """Start delivering ``stream``'s topics to it (idempotent)."""
        if stream in self._streams:
            return
        self._streams.add(stream)
        for topic in stream.topics:
            self._by_topic.setdefault(topic, set()).add(stream)
        if self._ticker is None:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self.clock
            self._ticker.start(self.keepalive_interval, now=False).addErrback(
                lambda f: log.failure("stream keep-alive timer died", f)
            )

    def remove(self, stream: ILiveStream) -> None:
        """Forget ``stream`` (idempotent); empty topics and an idle timer go too."""
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        for topic in stream.topics:
            readers = self._by_topic.get(topic)
            if readers is not None:
                readers.discard(stream)
                if not readers:
                    del self._by_topic[topic]
        if not self._streams and self._ticker is not None:
            ticker, self._ticker = self._ticker, None
            if ticker.running:
                ticker.stop()

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream: object) -> bool:
        return stream in self._streams

    def topics(self) -> List[str]:
        """Topics with at least one open stream."""
        return list(self._by_topic)

    def readers(self, topic: str) -> int:
        return len(self._by_topic.get(topic, ()))

    # -- the live feed ----------------------------------------------------------

    def publish(self, event: Event) -> None:
        """
        Hand ``event`` to the streams on its topic (``IEventListener``: the
        core calls it after the event is stored).
        """
        if self.last_announced is None or event.id > self.last_announced:
            self.last_announced = event.id
        readers = self._by_topic.get(event.topic)
        if not readers:
            return
        # A lone event is best sent to each socket at once; in a burst,
        # queueing it for the reactor's next write pass lets several events
        # share one send per socket, which is what sustains throughput.
        # The gap is measured from the end of the previous fan-out, which
        # for a thousand readers itself takes milliseconds.
        frames = FrameCache(event, self.clock.seconds() - self._last_publish < BURST_GAP)
        # A stream may leave the set while we write (its connection drops
        # under a write), so iterate over a snapshot.
        for stream in tuple(readers):
            try:
                stream.deliver(event, frames)
            except Exception:
                # One broken stream must not starve the others.
                log.failure("delivering {id} to a stream failed; dropping the stream", id=event.id)
                self.remove(stream)
        self._last_publish = self.clock.seconds()

    def _tick(self) -> None:
        for stream in tuple(self._streams):
            try:
                stream.keepalive()
            except Exception:
                log.failure("keep-alive failed for a stream")

    # -- stopping -----------------------------------------------------------------

    def close_all(self, reason: str = "server stopping") -> Deferred:
        """End every open stream cleanly; fires once they have all gone."""
        streams: Iterable[ILiveStream] = tuple(self._streams)
        if not streams:
            return succeed(None)
        closing = [stream.close(reason) for stream in streams]
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)
