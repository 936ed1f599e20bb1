"""
``HTTPStream``: one open ``/stream`` response, from its headers to its end.

It owns the three things that make a long-lived response safe to hold by
the thousand:

- **Back-pressure.** It registers itself as the request's push producer, so
  the transport says when its buffer is full (``pauseProducing``) and when
  it has drained (``resumeProducing``). While paused, frames wait in a queue
  of references to the shared frame bytes; once more than ``limit`` bytes
  wait, the reader is too slow: it gets a final error line (if it ever
  reads again) and the connection is closed. So a stalled reader costs at
  most ``limit`` plus the transport's own buffer, whatever is published.
- **History a page at a time.** A replay (``count``, ``Last-Event-ID``)
  reads storage one page at a time (``HISTORY_PAGE`` events, and bodies
  adding up to a quarter of ``limit``, at least one event), asks for the
  next page only once the transport has taken the last one, and lets go of
  each event once it is written. When resuming, the first page also says
  whether the reader's last event is still kept; if not, a gap notice
  (``StreamFormat.message``, ``hookah-gap`` in SSE) comes before the
  first replayed event. A reader that stops reading holds at most
  one page and the transport's buffer, whatever the history holds; the
  unwritten rest of its page counts with the live events held meanwhile
  towards ``limit``, so the slow-reader rule applies to replays too.
- **The seam between history and live events.** The stream joins the
  registry *before* it asks storage for history, and holds the live events
  that arrive meanwhile. Once the history is written, held events that the
  history already carried are dropped and the rest follow, so nothing
  published during the query is lost or sent twice. An event can also be
  stored (and so be in the history) before its live announcement reaches
  the registry; the newest replayed ids that the registry has not announced
  yet are remembered until the live feed catches up, and dropped from it.
- **A clean end.** ``close`` ends the chunked body properly and lets the
  transport flush; a reader that will not take even that is cut off after
  a grace period.

Frames are written straight to the HTTP/1.x transport, already chunk-framed
(``FrameCache``): ``Request.write`` would frame each write anew for each
reader. On a plain TCP transport with nothing queued, a frame goes to the
socket at once (``hookah.fastwrite``, which holds every private detail
of Twisted this relies on). Other channels (HTTP/2) fall back to
``Request.write``. A disconnect is learnt from ``Request.notifyFinish``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from zope.interface import implementer

from hookah.core import EventHistory
from hookah.model import Event
from hookah.streams.format import FrameCache, StreamFormat, chunk
from hookah.streams.registry import ILiveStream, TopicRegistry
from hookah.fastwrite import fast_path
from hookah.web.channel import HookahChannel

__all__ = ["HTTPStream", "HISTORY_PAGE", "CLOSE_GRACE", "EXPECT_TAIL"]

log = Logger()

# Events read from storage per query when replaying history; bytes per
# query are bounded by a quarter of the stream's buffer limit.
HISTORY_PAGE = 500
# Seconds a closing stream may take to flush before it is aborted.
CLOSE_GRACE = 2.0
# How many of the newest replayed ids may still be announced live.
EXPECT_TAIL = 64


class _Replayed:
    """
    What a replay remembers of the ids it wrote: those newer than the last
    live announcement before the stream joined (only those can also be
    among the live events held meanwhile, announcements coming in id
    order), and the newest ``EXPECT_TAIL``.
    """

    __slots__ = ("floor", "newer", "tail")

    def __init__(self, floor: Optional[str]) -> None:
        self.floor = floor
        self.newer: Set[str] = set()
        self.tail: Deque[str] = deque(maxlen=EXPECT_TAIL)

    def add(self, event_id: str) -> None:
        if self.floor is None or event_id > self.floor:
            self.newer.add(event_id)
        self.tail.append(event_id)


def _gap_notice(last_event_id: str) -> dict:
    """The control message that tells a resuming reader its last event left the history."""
    return {
        "gap": True,
        "last_event_id": last_event_id,
        "message": f"Event {last_event_id} is no longer in the topic history (trimmed, or unknown): "
        "events published since may have been missed. The stream goes on from the oldest event kept after it.",
    }


@implementer(ILiveStream, IPushProducer)
class HTTPStream:
    # Slots: thousands of idle streams each carry only these fields.
    __slots__ = (
        "request", "topics", "format", "registry", "clock", "limit",
        "_write", "_write_later", "_chunked", "_direct", "_paused", "_queue", "_queued_bytes",
        "_held", "_held_bytes", "_expect", "_resumed_after", "_closing", "_gone", "_abort_call",
        "_waiting", "_gone_waiters", "_transport", "_pending",
    )

    def __init__(
        self,
        request: Request,
        registry: TopicRegistry,
        topics: Sequence[str],
        format: StreamFormat,
        limit: int,
        clock: IReactorTime,
    ) -> None:
        self.request = request
        self.topics: Tuple[str, ...] = tuple(topics)
        self.format = format
        self.registry = registry
        self.clock = clock
        self.limit = limit
        self._write: Callable[[bytes], Any] = request.write
        # Queue for the next reactor turn (coalescing a burst of events).
        self._write_later: Callable[[bytes], Any] = request.write
        self._chunked = False
        # True while frames may go straight to the transport: the hot path.
        self._direct = False
        self._paused = False
        self._queue: Optional[Deque[bytes]] = None
        self._queued_bytes = 0
        # Live (event, frame) pairs that arrive while history is replayed.
        self._held: Optional[List[Tuple[Event, bytes]]] = None
        self._held_bytes = 0
        # Body bytes of the history page read but not yet written.
        self._pending = 0
        self._expect: Optional[Set[str]] = None
        # The reader's Last-Event-ID: it has every event up to it, so a live
        # event at or below it is one it already has (with several nodes the
        # live feed may carry an event committed just before this stream
        # joined it).
        self._resumed_after: Optional[str] = None
        self._closing = False
        self._gone = False
        self._abort_call: Optional[IDelayedCall] = None
        self._waiting: Optional[Deferred] = None
        self._gone_waiters: Optional[List[Deferred]] = None
        self._transport: Any = None

    # -- opening ------------------------------------------------------------------

    def start_response(self) -> None:
        """Send the headers at once and take over the body."""
        request = self.request
        request.setHeader(b"Content-Type", self.format.content_type)
        request.setHeader(b"Cache-Control", b"no-cache")
        # Proxies such as nginx would otherwise hold events back in a buffer.
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.write(b"")
        channel = request.channel
        if isinstance(channel, HookahChannel):
            channel.response_stays_open()
        if isinstance(channel, HTTPChannel) and channel.transport is not None:
            self._transport = channel.transport
            self._chunked = bool(request.chunked)
            self._write_later = channel.transport.write
            self._write = fast_path.writer(channel.transport)
        # If the transport's buffer is already full (a pipelined response
        # before this one filled it), the first write tells: the transport
        # pauses its producer, which the channel passes on to this stream.
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._connection_gone)
        if self.format.preamble:
            self._write(self._framed(self.format.preamble))

    async def replay(self, history: EventHistory, after: Optional[str], count: int) -> None:
        """
        Join the live feed, then write history: events after ``after`` when
        given (all that storage still holds), else the last ``count``, a
        page at a time as the reader takes them. Live events wait until the
        history is out.
        """
        replaying = after is not None or count > 0
        self._resumed_after = after
        if self._gone:
            return
        if replaying:
            self._held = []
        self._update()
        self.registry.add(self)
        if not replaying:
            return
        replayed = _Replayed(self.registry.last_announced)
        # The reader's Last-Event-ID, until the first page has checked it.
        resuming = after
        try:
            remaining: Optional[int] = None
            if after is None:
                after = await history.replay_cursor(self.topics, count)
                remaining = count
            while not self._closing and (remaining is None or remaining > 0):
                await self._drained()
                if self._closing:
                    break
                limit = HISTORY_PAGE if remaining is None else min(HISTORY_PAGE, remaining)
                budget = max(1, self.limit // 4)
                if resuming is not None:
                    # The first page of a resume also says whether the
                    # reader's last event is still kept: if not, events
                    # may have been trimmed unseen, and the reader is told
                    # before anything is replayed.
                    kept, page = await history.resume_page(self.topics, resuming, limit, budget)
                    if not kept:
                        await self._drained()
                        if self._closing:
                            break
                        self._write(self._framed(self.format.message(_gap_notice(resuming), b"hookah-gap")))
                    resuming = None
                else:
                    page = await history.events_page(self.topics, after, limit, budget)
                if not page:
                    break
                after = page[-1].id
                if remaining is not None:
                    remaining -= len(page)
                # A page short of both bounds is the end of what storage holds.
                last = len(page) < limit and sum(len(e.body) for e in page) < budget
                await self._write_history(page, replayed)
                if last:
                    break
        except Exception:
            log.failure("replaying history for a stream on {topics} failed", topics=self.topics)
            self.close("history unavailable", {"error": "history_unavailable", "message": "Hookah could not read the topic history; reconnect to try again."})
            return
        self._join_live(replayed)

    async def _drained(self) -> None:
        """Wait until the transport takes more (or the stream ends)."""
        while self._paused and not self._closing:
            self._waiting = Deferred()
            await self._waiting

    async def _write_history(self, page: List[Event], replayed: _Replayed) -> None:
        self._pending = sum(len(e.body) for e in page)
        events = deque(page)
        del page[:]  # each event is let go of once written
        while events:
            await self._drained()
            if self._closing:
                break
            event = events.popleft()
            self._pending -= len(event.body)
            self._write(FrameCache(event).get(self.format, self._chunked))
            replayed.add(event.id)
        self._pending = 0

    def _join_live(self, replayed: _Replayed) -> None:
        held, self._held, self._held_bytes = self._held or [], None, 0
        if self._closing:
            return
        for event, frame in held:
            if event.id not in replayed.newer:
                self._send(frame)
        announced = self.registry.last_announced
        expect = {i for i in replayed.tail if announced is None or i > announced}
        self._expect = expect or None
        self._update()

    # -- the registry's side (ILiveStream) --------------------------------------

    def deliver(self, event: Event, frames: FrameCache) -> None:
        if self._resumed_after is not None and event.id <= self._resumed_after:
            return
        frame = frames.get(self.format, self._chunked)
        if self._direct:
            if frames.burst:
                self._write_later(frame)
            else:
                self._write(frame)
            return
        if self._closing:
            return
        if self._held is not None:
            self._held.append((event, frame))
            self._held_bytes += len(frame)
            if self._held_bytes + self._pending > self.limit:
                self._too_slow()
            return
        if self._expect is not None:
            if event.id in self._expect:
                self._expect.discard(event.id)
                if not self._expect:
                    self._expect = None
                    self._update()
                return
            # The live feed has moved past these: they will not come again.
            self._expect = {i for i in self._expect if i > event.id} or None
            self._update()
        self._send(frame)

    def keepalive(self) -> None:
        if not self._paused and not self._closing:
            self._write(self._framed(self.format.keepalive))

    def close(self, reason: str, message: Optional[dict] = None) -> Deferred:
        """
        End the stream: an optional last ``message``, the end of the body,
        then the connection (the reader of a streamed body knows where it
        ends only when the connection closes). Deferred fired once gone.
        """
        if self._gone:
            return succeed(None)
        d: Deferred = Deferred()
        if self._gone_waiters is None:
            self._gone_waiters = []
        self._gone_waiters.append(d)
        if self._closing:
            return d
        self._closing = True
        self._update()
        self._queue, self._queued_bytes = None, 0
        self._held, self._held_bytes = None, 0
        self.registry.remove(self)
        log.debug("closing stream on {topics}: {reason}", topics=self.topics, reason=reason)
        self._wake()
        if message is not None:
            self._write(self._framed(self.format.message(message)))
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if self._transport is None:
            # Not an HTTP/1.x transport we write to ourselves: let the
            # request end its own body.
            if not request.finished:
                request.finish()
        elif self._chunked:
            self._write(b"0\r\n\r\n")
        if self._gone:
            return d
        channel: Any = request.channel
        if channel is None or getattr(channel, "transport", None) is None:
            self._connection_gone(None)
            return d
        # HTTPChannel.loseConnection also detaches the channel from the
        # transport as producer, without which a paused transport would
        # never finish closing.
        channel.loseConnection()
        self._abort_call = self.clock.callLater(CLOSE_GRACE, channel.transport.abortConnection)
        return d

    # -- back-pressure (IPushProducer) ----------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._update()

    def resumeProducing(self) -> None:
        self._paused = False
        queue = self._queue
        while queue and not self._paused:
            frame = queue.popleft()
            self._queued_bytes -= len(frame)
            self._write(frame)
        if not queue:
            self._queue, self._queued_bytes = None, 0
        self._update()
        self._wake()

    def stopProducing(self) -> None:
        self._connection_gone(None)

    @property
    def buffered(self) -> int:
        """Bytes waiting in this stream for the reader (not the transport's own buffer)."""
        return self._queued_bytes + self._held_bytes + self._pending

    # -- internals ---------------------------------------------------------------------

    def _framed(self, data: bytes) -> bytes:
        return chunk(data) if self._chunked else data

    def _update(self) -> None:
        self._direct = not (
            self._paused or self._closing or self._held is not None or self._expect is not None
        )

    def _send(self, frame: bytes) -> None:
        if not self._paused:
            self._write(frame)
            return
        if self._queue is None:
            self._queue = deque()
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if self._queued_bytes > self.limit:
            self._too_slow()

    def _too_slow(self) -> None:
        log.info(
            "closing a stream on {topics}: more than {limit} bytes waiting for a slow reader",
            topics=self.topics,
            limit=self.limit,
        )
        self.close(
            "too slow",
            {
                "error": "too_slow",
                "message": f"This stream fell more than {self.limit} bytes behind and was closed; "
                "reconnect with Last-Event-ID to resume from history.",
            },
        )

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def _connection_gone(self, result: Optional[Failure]) -> None:
        if self._gone:
            return
        self._gone = True
        self._closing = True
        self._update()
        self._queue, self._queued_bytes = None, 0
        self._held, self._held_bytes = None, 0
        self.registry.remove(self)
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._wake()
        waiters, self._gone_waiters = self._gone_waiters or [], None
        for d in waiters:
            d.callback(None)
