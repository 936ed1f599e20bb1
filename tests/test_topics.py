"""
``TopicRegistry``: publishing touches only a topic's own streams, encodes
once, leaves nothing behind, and keeps streams alive with one timer.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hookah.streams import format as streamformat
from hookah.model import Event
from hookah.streams.format import JSON_LINES, SSE, FrameCache, StreamFormat
from hookah.streams.registry import ILiveStream, TopicRegistry


@implementer(ILiveStream)
class FakeStream:
    def __init__(self, topics: Tuple[str, ...], fmt: StreamFormat = JSON_LINES, chunked: bool = True) -> None:
        self.topics = topics
        self.fmt = fmt
        self.chunked = chunked
        self.frames: List[bytes] = []
        self.keepalives = 0
        self.closed: List[str] = []

    def deliver(self, event: Event, frames: FrameCache) -> None:
        self.frames.append(frames.get(self.fmt, self.chunked))

    def keepalive(self) -> None:
        self.keepalives += 1

    def close(self, reason: str) -> Deferred:
        self.closed.append(reason)
        return succeed(None)


def event(topic: str, id: str = "01A") -> Event:
    return Event(id=id, topic=topic, body=b'{"n": 1}', content_type="application/json")


class RegistryTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = TopicRegistry(self.clock, keepalive=30.0)

    def test_fake_provides_interface(self) -> None:
        self.assertTrue(verifyObject(ILiveStream, FakeStream(("t",))))

    def test_publish_reaches_only_the_topic(self) -> None:
        a, b, both = FakeStream(("a",)), FakeStream(("b",)), FakeStream(("a", "b"))
        for s in (a, b, both):
            self.registry.add(s)
        self.registry.publish(event("a"))
        self.assertEqual((len(a.frames), len(b.frames), len(both.frames)), (1, 0, 1))
        self.registry.publish(event("c"))
        self.assertEqual(len(a.frames) + len(b.frames) + len(both.frames), 2)

    def test_publish_does_not_scan_other_topics(self) -> None:
        """Streams on other topics are never even asked."""
        touched: List[str] = []

        class Loud(FakeStream):
            def deliver(self, event: Event, frames: FrameCache) -> None:
                touched.append(self.topics[0])

        for i in range(50):
            self.registry.add(Loud((f"other{i}",)))
        self.registry.add(Loud(("hot",)))
        self.registry.publish(event("hot"))
        self.assertEqual(touched, ["hot"])

    def test_encodes_once_per_format(self) -> None:
        calls: List[Any] = []
        real = streamformat.encode_event

        def counting(e: Event) -> bytes:
            calls.append(e)
            return real(e)

        self.patch(streamformat, "encode_event", counting)
        streams = [FakeStream(("t",), fmt) for fmt in (JSON_LINES, SSE) for _ in range(100)]
        for s in streams:
            self.registry.add(s)
        self.registry.publish(event("t"))
        self.assertEqual(len(calls), 1)
        json_frames = {id(s.frames[0]) for s in streams if s.fmt is JSON_LINES}
        sse_frames = {id(s.frames[0]) for s in streams if s.fmt is SSE}
        self.assertEqual((len(json_frames), len(sse_frames)), (1, 1))

    def test_nothing_left_after_last_reader(self) -> None:
        s1, s2 = FakeStream(("a", "b")), FakeStream(("a",))
        self.registry.add(s1)
        self.registry.add(s2)
        self.assertEqual(sorted(self.registry.topics()), ["a", "b"])
        self.registry.remove(s1)
        self.assertEqual(self.registry.topics(), ["a"])
        self.registry.remove(s2)
        self.registry.remove(s2)  # idempotent
        self.assertEqual((self.registry.topics(), len(self.registry)), ([], 0))
        self.assertEqual(self.registry._by_topic, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_keepalive_timer_for_all_streams(self) -> None:
        streams = [FakeStream(("t",)) for _ in range(1000)]
        for s in streams:
            self.registry.add(s)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(29.9)
        self.assertEqual(streams[0].keepalives, 0)
        self.clock.advance(0.1)
        self.assertEqual({s.keepalives for s in streams}, {1})
        self.clock.advance(30)
        self.assertEqual({s.keepalives for s in streams}, {2})
        for s in streams:
            self.registry.remove(s)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_keepalive_error_does_not_stop_the_timer(self) -> None:
        class Broken(FakeStream):
            def keepalive(self) -> None:
                raise RuntimeError("boom")

        good = FakeStream(("t",))
        self.registry.add(Broken(("t",)))
        self.registry.add(good)
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertEqual(good.keepalives, 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_broken_stream_is_dropped_others_served(self) -> None:
        class Broken(FakeStream):
            def deliver(self, event: Event, frames: FrameCache) -> None:
                raise RuntimeError("boom")

        broken, good = Broken(("t",)), FakeStream(("t",))
        self.registry.add(broken)
        self.registry.add(good)
        self.registry.publish(event("t"))
        self.assertEqual(len(good.frames), 1)
        self.assertNotIn(broken, self.registry)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_burst_flag(self) -> None:
        """Publishes in quick succession are marked as a burst, a lone one is not."""
        seen: List[bool] = []

        class Recording(FakeStream):
            def deliver(self, event: Event, frames: FrameCache) -> None:
                seen.append(frames.burst)

        self.registry.add(Recording(("t",)))
        self.registry.publish(event("t", "1"))
        self.registry.publish(event("t", "2"))
        self.clock.advance(1)
        self.registry.publish(event("t", "3"))
        self.assertEqual(seen, [False, True, False])

    def test_stream_leaving_during_publish(self) -> None:
        """A stream whose connection drops mid-publish leaves without upsetting the loop."""
        registry = self.registry

        class Leaving(FakeStream):
            def deliver(self, event: Event, frames: FrameCache) -> None:
                super().deliver(event, frames)
                registry.remove(self)

        streams = [Leaving(("t",)) for _ in range(3)]
        for s in streams:
            registry.add(s)
        registry.publish(event("t"))
        self.assertEqual([len(s.frames) for s in streams], [1, 1, 1])
        self.assertEqual(len(registry), 0)

    def test_last_announced(self) -> None:
        self.registry.publish(event("nobody", "01B"))
        self.registry.publish(event("nobody", "01A"))
        self.assertEqual(self.registry.last_announced, "01B")

    def test_close_all(self) -> None:
        streams = [FakeStream(("t",)) for _ in range(3)]
        for s in streams:
            self.registry.add(s)
        d = self.registry.close_all("stop")
        self.assertEqual([s.closed for s in streams], [["stop"]] * 3)
        self.assertIsNone(self.successResultOf(d))
