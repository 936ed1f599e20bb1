"""
``/stream`` without sockets: request parsing, formats, keep-alive on a
``Clock``, history replay and its seam with live events, back-pressure and
the end of a stream.
"""

from __future__ import annotations

import json

from twisted.internet.defer import fail
from twisted.trial.unittest import TestCase

from hookah.streams.parse import SSEMessage
from hookah.web import httpstream
from hookah.web.channel import BODY_WINDOW
from tests.streamsupport import StreamHarness


class RequestTests(TestCase):
    def setUp(self) -> None:
        self.h = StreamHarness()

    def error(self, query: str, headers: bytes = b"") -> dict:
        conn = self.h.connect(query, headers)
        conn.read()
        self.assertEqual(conn.response.status, 400, query)
        self.assertEqual(len(self.h.registry), 0)
        return json.loads(conn.body)

    def test_missing_topic(self) -> None:
        self.assertEqual(self.error("")["error"], "missing_topic")
        self.assertEqual(self.error("topic=&topic=,,")["error"], "missing_topic")

    def test_bad_parameters(self) -> None:
        for query in ("topic=t&format=xml", "topic=t&delimited=comma", "topic=t&format=sse&delimited=length", "topic=t&count=-1", "topic=t&count=x"):
            self.assertEqual(self.error(query)["error"], "bad_parameter", query)
        # `hookah tail --format length` names that framing; the API spells it delimited=length.
        self.assertIn("delimited=length", self.error("topic=t&format=length")["message"])

    def test_headers_sent_at_once(self) -> None:
        conn = self.h.connect("topic=t")
        conn.read()
        self.assertEqual(conn.response.status, 200)
        self.assertEqual(conn.response.headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(conn.response.headers["transfer-encoding"], "chunked")
        self.assertEqual(conn.response.headers["cache-control"], "no-cache")

    def test_an_open_stream_has_only_its_keepalive_timer(self) -> None:
        # No deadline runs while a stream is open: its connection's timer
        # is gone at once rather than waking for nothing a while later.
        conn = self.h.connect("topic=t")
        conn.read()
        self.assertEqual(conn.response.status, 200)
        (keepalive,) = [c for c in self.h.clock.getDelayedCalls() if c.active()]
        self.assertAlmostEqual(keepalive.getTime(), self.h.clock.seconds() + 30.0)
        # The stream still keeps itself alive, and its end leaves no timer.
        self.h.clock.advance(30.0)
        self.assertEqual(len([c for c in self.h.clock.getDelayedCalls() if c.active()]), 1)
        conn.drop()
        self.assertEqual([c for c in self.h.clock.getDelayedCalls() if c.active()], [])

    def test_stream_provides_interfaces(self) -> None:
        from twisted.internet.interfaces import IPushProducer
        from zope.interface.verify import verifyObject

        from hookah.streams.registry import ILiveStream

        self.h.connect("topic=t")
        (stream,) = self.h.streams()
        self.assertTrue(verifyObject(ILiveStream, stream))
        self.assertTrue(verifyObject(IPushProducer, stream))

    def test_topics_repeated_and_comma_separated(self) -> None:
        conn = self.h.connect("topic=a,b&topic=c&topic=a")
        for topic in "abcd":
            self.h.publish(self.h.event(topic))
        self.assertEqual([m["topic"] for m in conn.read()], ["a", "b", "c"])
        self.assertEqual(self.h.registry.readers("a"), 1)

    def test_sse_by_accept_or_format(self) -> None:
        by_accept = self.h.connect("topic=t", b"Accept: text/event-stream\r\n")
        by_format = self.h.connect("topic=t&format=sse")
        refused = self.h.connect("topic=t", b"Accept: text/event-stream;q=0, application/json\r\n")
        self.h.publish(self.h.event("t", b'{"a": 1}'))
        for conn in (by_accept, by_format):
            (message,) = conn.read()
            self.assertIsInstance(message, SSEMessage)
            self.assertEqual((message.event, message.id, message.json()["data"]), ("t", "E000001", {"a": 1}))
            self.assertEqual(conn.parser.retry, 3000)
        self.assertEqual(refused.read()[0]["data"], {"a": 1})

    def test_length_delimited(self) -> None:
        conn = self.h.connect("topic=t&delimited=length")
        conn.format_hint = "length"
        self.h.publish(self.h.event("t", "é".encode(), "text/plain"))
        self.assertEqual(conn.read()[0]["data"], "é")
        length, _, message = conn.body.partition(b"\r\n")
        self.assertEqual(int(length), len(message))
        self.assertTrue(message.endswith(b"}\r\n"))

    def test_http10_gets_unchunked_body(self) -> None:
        conn = self.h.connect("topic=t", version=b"HTTP/1.0")
        self.h.publish(self.h.event("t"))
        self.assertEqual(len(conn.read()), 1)
        self.assertNotIn("transfer-encoding", conn.response.headers)
        self.assertTrue(conn.body.endswith(b"}\r\n"))

    def test_other_methods_get_json_405(self) -> None:
        from twisted.internet.testing import StringTransport

        channel = self.h.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"POST /stream?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"405", head.split(b"\r\n")[0])
        self.assertIn(b'"method_not_allowed"', body)

    def test_head(self) -> None:
        channel = self.h.site.buildProtocol(None)
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"HEAD /stream?topic=t HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.assertEqual(len(self.h.registry), 0)


class KeepaliveTests(TestCase):
    def test_keepalive_every_period_in_each_format(self) -> None:
        h = StreamHarness(keepalive=15)
        plain, length, sse = h.connect("topic=t"), h.connect("topic=t&delimited=length"), h.connect("topic=t&format=sse")
        length.format_hint = "length"
        for conn in (plain, length, sse):
            conn.read()
        h.clock.advance(14.9)
        self.assertEqual([c.transport.value() for c in (plain, length, sse)], [b""] * 3)
        h.clock.advance(0.1)
        self.assertEqual([c.transport.value() for c in (plain, length, sse)], [b"2\r\n\r\n\r\n", b"2\r\n\r\n\r\n", b"3\r\n:\n\n\r\n"])
        h.clock.advance(15)
        for conn in (plain, length):
            conn.read()
            self.assertEqual(conn.parser.keepalives, 2)
        sse.read()
        self.assertEqual(sse.parser.comments, 2)

    def test_no_keepalive_into_a_full_buffer(self) -> None:
        h = StreamHarness(keepalive=15)
        conn = h.connect("topic=t")
        conn.read()
        conn.pause()
        h.clock.advance(15)
        self.assertEqual(conn.transport.value(), b"")

    def test_timer_stops_with_last_stream(self) -> None:
        h = StreamHarness(keepalive=15)
        conn = h.connect("topic=t")
        # The connection's deadline timer (head, body, idle: none running
        # while a stream is open) lapses at its next look, within BODY_WINDOW.
        h.clock.advance(BODY_WINDOW)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        conn.drop()
        self.assertEqual(h.clock.getDelayedCalls(), [])


class ReplayTests(TestCase):
    def test_history_is_read_a_bounded_page_at_a_time_as_the_reader_takes_it(self) -> None:
        limit = 8192
        h = StreamHarness(gate=False, limit=limit)
        gated = h.gated
        asked = []
        real = gated.events_page

        def events_page(topics, after, count, max_bytes):  # type: ignore[no-untyped-def]
            asked.append((after, count, max_bytes))
            return real(topics, after, count, max_bytes)

        gated.events_page = events_page
        events = [h.store_event(h.event("t", b'"' + b"x" * 1000 + b'"')) for _ in range(30)]
        conn = h.connect("topic=t&count=25")
        [stream] = h.streams()
        # Each page stops at a quarter of the buffer limit: three ~1 KB events.
        self.assertEqual(asked, [(events[4].id, 25, limit // 4)])
        gated.release()
        self.assertEqual(conn.ids(), [e.id for e in events[5:8]])
        self.assertEqual(asked[1:], [(events[7].id, 22, limit // 4)])
        # It stops reading with a page on its way: that page waits, no other
        # is read, and what it holds is that page.
        conn.pause()
        gated.release()
        self.assertEqual(conn.ids(), [e.id for e in events[5:8]])
        self.assertEqual(len(asked), 2)
        self.assertEqual(stream.buffered, 3 * 1002)
        conn.resume()
        while gated.pending:
            gated.release()
        self.assertEqual(conn.ids(), [e.id for e in events[5:]])
        self.assertEqual(stream.buffered, 0)
        self.assertTrue(all(max_bytes == limit // 4 for _, _, max_bytes in asked))

    def test_count_replays_last_events_across_topics_then_live(self) -> None:
        h = StreamHarness()
        for topic in "abab":
            h.store_event(h.event(topic))
        h.store_event(h.event("c"))
        conn = h.connect("topic=a,b&count=3")
        h.publish(h.event("a"))
        self.assertEqual(conn.ids(), ["E000002", "E000003", "E000004", "E000006"])

    def test_resume_after_id(self) -> None:
        h = StreamHarness()
        for _ in range(5):
            h.store_event(h.event("t"))
        by_header = h.connect("topic=t&last_event_id=E000001", b"Last-Event-ID: E000003\r\n")
        by_query = h.connect("topic=t&last_event_id=E000004&count=1")
        h.publish(h.event("t"))
        self.assertEqual(by_header.ids(), ["E000004", "E000005", "E000006"])
        self.assertEqual(by_query.ids(), ["E000005", "E000006"])

    def _trimmed(self, kept: int = 3) -> StreamHarness:
        """Five events on ``t``, of which the history keeps the newest ``kept``."""
        h = StreamHarness()
        for _ in range(5):
            h.memory.add_event(h.event("t"), [], kept, -1.0)
        return h

    def test_resume_point_trimmed_from_history_is_told_first(self) -> None:
        h = self._trimmed()
        for query, headers in (("topic=t", b"Last-Event-ID: E000001\r\n"), ("topic=t&last_event_id=E000001", b""), ("topic=t&delimited=length&last_event_id=E000001", b"")):
            conn = h.connect(query, headers)
            conn.format_hint = "length" if "delimited=length" in query else "json"
            messages = conn.read()
            self.assertEqual(messages[0]["gap"], True, query)
            self.assertEqual(messages[0]["last_event_id"], "E000001")
            self.assertNotIn("id", messages[0])
            self.assertIn("E000001", messages[0]["message"])
            self.assertEqual([m["id"] for m in messages[1:]], ["E000003", "E000004", "E000005"])
        h.publish(h.event("t"))
        self.assertEqual([m.get("id") for m in conn.read()[1:]], ["E000003", "E000004", "E000005", "E000006"])

    def test_resume_point_trimmed_in_sse_is_a_hookah_gap_message(self) -> None:
        h = self._trimmed()
        conn = h.connect("topic=t&format=sse", b"Last-Event-ID: E000002\r\n")
        messages = conn.read()
        self.assertEqual((messages[0].event, messages[0].id), ("hookah-gap", None))
        self.assertEqual(messages[0].json()["last_event_id"], "E000002")
        self.assertEqual([m.id for m in messages[1:]], ["E000003", "E000004", "E000005"])
        # The notice carries no id field, so the reader's last event id is the last event's.
        self.assertEqual(conn.parser.last_event_id, "E000005")

    def test_resume_point_still_kept_is_not_a_gap(self) -> None:
        h = self._trimmed()
        for last in ("E000003", "E000005"):
            conn = h.connect("topic=t", b"Last-Event-ID: " + last.encode() + b"\r\n")
            self.assertFalse(any("gap" in m for m in conn.read()), last)
            self.assertEqual(conn.ids(), [f"E{i:06d}" for i in range(int(last[1:]) + 1, 6)])
        # count= replays are no resume: never a notice, even with history trimmed.
        conn = h.connect("topic=t&count=10")
        self.assertEqual(conn.ids(), ["E000003", "E000004", "E000005"])

    def test_unknown_resume_point_is_told(self) -> None:
        h = self._trimmed()
        h.memory.add_event(h.event("other"), [], 10, -1.0)
        for last in ("E999999", "nonsense", "E000006"):
            conn = h.connect("topic=t&last_event_id=" + last)
            messages = conn.read()
            self.assertEqual(messages[0]["gap"], True, last)
            self.assertEqual(messages[0]["last_event_id"], last)
        # E000006 is on another topic: nothing of t is known after it.
        self.assertEqual(len(messages), 1)
        h.publish(h.event("t"))
        self.assertEqual(conn.read()[1]["id"], "E000007")

    def test_gap_notice_waits_for_a_paused_reader(self) -> None:
        h = StreamHarness(gate=False)
        for _ in range(5):
            h.memory.add_event(h.event("t"), [], 3, -1.0)
        conn = h.connect("topic=t&last_event_id=E000001")
        conn.read()
        conn.pause()
        h.gated.release()
        self.assertEqual(conn.read(), [])
        conn.resume()
        messages = conn.read()
        self.assertEqual(messages[0]["gap"], True)
        self.assertEqual([m["id"] for m in messages[1:]], ["E000003", "E000004", "E000005"])

    def test_resume_pages_through_history(self) -> None:
        self.patch(httpstream, "HISTORY_PAGE", 3)
        h = StreamHarness()
        for _ in range(10):
            h.store_event(h.event("t"))
        conn = h.connect("topic=t&last_event_id=E000002")
        self.assertEqual(conn.ids(), [f"E{i:06d}" for i in range(3, 11)])

    def test_event_published_during_query_not_in_result(self) -> None:
        """The query read before the event was stored: the held live copy fills the gap."""
        h2 = StreamHarness(gate=True)
        gated = h2.gated
        for _ in range(2):
            h2.store_event(h2.event("t"))
        conn = h2.connect("topic=t&last_event_id=E000001")
        self.assertEqual(len(gated.pending), 1)
        h2.publish(h2.event("t"))
        self.assertEqual(conn.ids(), [])  # held until history is out
        gated.release()
        self.assertEqual(conn.ids(), ["E000002", "E000003"])
        h2.publish(h2.event("t"))
        self.assertEqual(conn.ids(), ["E000002", "E000003", "E000004"])

    def test_event_published_during_query_and_in_result(self) -> None:
        """The query saw the event too: it is sent once, from history."""
        h2 = StreamHarness(gate=False)
        gated = h2.gated
        h2.store_event(h2.event("t"))
        conn = h2.connect("topic=t&count=5")
        h2.publish(h2.event("t"))
        h2.publish(h2.event("t"))
        gated.release()
        h2.publish(h2.event("t"))
        self.assertEqual(conn.ids(), ["E000001", "E000002", "E000003", "E000004"])

    def test_event_announced_after_history_is_not_repeated(self) -> None:
        """
        Stored (so replayed) before its live announcement reached the
        registry: the late announcement is dropped, later events are not.
        """
        h = StreamHarness()
        h.publish(h.event("t"))  # the registry has announced E000001
        late = h.store_event(h.event("t"))  # stored, not yet announced
        conn = h.connect("topic=t&count=10")
        self.assertEqual(conn.ids(), ["E000001", "E000002"])
        h.registry.publish(late)
        h.publish(h.event("t"))
        self.assertEqual(conn.ids(), ["E000001", "E000002", "E000003"])
        stream = h.streams()[0]
        self.assertTrue(stream._direct)

    def test_reader_leaving_during_the_query(self) -> None:
        h = StreamHarness(gate=False)
        h.store_event(h.event("t"))
        conn = h.connect("topic=t&count=5")
        h.publish(h.event("t"))
        conn.drop()
        self.assertEqual(len(h.registry), 0)
        h.gated.release()  # the late answer finds the stream gone: nothing written, nothing raised
        self.assertEqual(conn.ids(), [])
        self.assertEqual(len(h.registry), 0)

    def test_history_failure_closes_with_error(self) -> None:
        for method in ("events_page", "replay_cursor"):
            h = StreamHarness()
            self.patch(h.memory, method, lambda *args: fail(OSError("disk")))
            conn = h.connect("topic=t&count=2")
            self.assertEqual(conn.read()[-1]["error"], "history_unavailable", method)
            self.assertEqual(len(h.registry), 0)
            self.assertTrue(conn.transport.disconnecting)
            self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
            conn.drop()

    def test_history_waits_for_a_paused_reader(self) -> None:
        h2 = StreamHarness(gate=False)
        gated = h2.gated
        for _ in range(4):
            h2.store_event(h2.event("t"))
        conn = h2.connect("topic=t&count=4")
        conn.read()
        conn.pause()
        gated.release()
        self.assertEqual(conn.ids(), [])
        conn.resume()
        # Twisted's transport resumes only once drained; StringTransport is
        # always drained, so every write goes through.
        self.assertEqual(conn.ids(), ["E000001", "E000002", "E000003", "E000004"])


class BackPressureTests(TestCase):
    def test_paused_stream_queues_then_flushes_in_order(self) -> None:
        h = StreamHarness(limit=100000)
        conn = h.connect("topic=t")
        conn.read()
        conn.pause()
        for _ in range(3):
            h.publish(h.event("t"))
        self.assertEqual(conn.transport.value(), b"")
        stream = h.streams()[0]
        self.assertGreater(stream.buffered, 0)
        conn.resume()
        self.assertEqual(conn.ids(), ["E000001", "E000002", "E000003"])
        self.assertEqual(stream.buffered, 0)

    def test_too_slow_reader_is_closed_and_memory_bounded(self) -> None:
        limit = 4096
        h = StreamHarness(limit=limit)
        slow, fast = h.connect("topic=t"), h.connect("topic=t")
        slow.read()
        slow.pause()
        stream = next(s for s in h.streams() if s.request.channel is slow.channel)
        body = b'"' + b"x" * 500 + b'"'
        peak = 0
        for _ in range(50):
            h.publish(h.event("t", body))
            peak = max(peak, stream.buffered)
        self.assertLessEqual(peak, limit)
        self.assertEqual(stream.buffered, 0)
        self.assertEqual(len(h.registry), 1)
        self.assertEqual(len(fast.ids()), 50)
        messages = slow.read()
        self.assertEqual(messages[-1]["error"], "too_slow")
        self.assertTrue(slow.response.done)
        self.assertTrue(slow.transport.disconnecting)
        # It never drains: cut off after the grace period.
        h.clock.advance(httpstream.CLOSE_GRACE)
        self.assertTrue(slow.transport.disconnected)
        slow.drop()
        self.assertEqual(h.clock.getDelayedCalls(), [d for d in h.clock.getDelayedCalls() if d.active()])

    def test_live_events_held_during_replay_are_bounded(self) -> None:
        h2 = StreamHarness(gate=False, limit=2048)
        gated = h2.gated
        conn = h2.connect("topic=t&count=1")
        for _ in range(20):
            h2.publish(h2.event("t", b'"' + b"y" * 200 + b'"'))
        self.assertEqual(conn.read()[-1]["error"], "too_slow")
        self.assertEqual(len(h2.registry), 0)
        gated.release()  # the late answer finds the stream gone
        conn.drop()


class EndTests(TestCase):
    def test_dropped_connection_leaves_registry_at_once(self) -> None:
        h = StreamHarness()
        conns = [h.connect("topic=a,b") for _ in range(3)]
        self.assertEqual(len(h.registry), 3)
        for conn in conns:
            conn.drop()
        self.assertEqual((len(h.registry), h.registry.topics()), (0, []))
        h.publish(h.event("a"))  # nobody to write to, nothing raised

    def test_close_all_ends_the_body_cleanly(self) -> None:
        h = StreamHarness()
        conns = [h.connect("topic=t"), h.connect("topic=t&format=sse")]
        h.publish(h.event("t"))
        d = h.registry.close_all()
        for conn in conns:
            self.assertEqual(len(conn.read()), 1)
            self.assertTrue(conn.response.done)
            self.assertTrue(conn.transport.disconnecting)
        self.assertNoResult(d)
        for conn in conns:
            conn.drop()
        self.successResultOf(d)
        self.assertEqual(h.clock.getDelayedCalls(), [])
