"""
``Backpressure``: lets a response written piece by piece wait for its
reader, so that what it holds in memory is what the reader has not taken
yet, never the whole answer.

It is the request's push producer: the transport pauses it when its buffer
is full and resumes it once drained; ``drained()`` waits for that (or for
the client to leave, ``gone``).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web import server
from zope.interface import implementer

__all__ = ["Backpressure"]


@implementer(IPushProducer)
class Backpressure:
    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.paused = False
        self.gone = False
        self._waiting: Optional[Deferred] = None
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)

    async def drained(self) -> None:
        """Wait until the reader takes more, or has gone (then ``gone`` is true)."""
        while self.paused and not self.gone:
            self._waiting = Deferred()
            await self._waiting

    def done(self) -> None:
        """The response is written: stop being its producer."""
        if self.request.producer is self:
            self.request.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.gone = True
        self._wake()

    def _finished(self, result: Any) -> None:
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)
