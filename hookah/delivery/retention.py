"""
Retention: what storage forgets, and when.

Finished deliveries (``delivered``/``failed``, with their bodies and
attempts) are deleted ``retention`` seconds after their last activity,
events of every topic ``history_age`` seconds after they were published
(``add_event`` already trims the topic it publishes on; this also trims
topics that went quiet), and idempotency keys ``idempotency_window``
seconds after the dispatch that brought them: keys are kept apart from
their deliveries and events, so they are remembered for the whole window
whatever happens to those. Scheduled and in-flight deliveries are never
touched.

Every ``interval`` seconds, on the injected clock, ``RetentionService``
asks the store for batches of at most ``batch`` rows, and asks again at
once while a batch comes back full: a large backlog (the first run after
an upgrade, say) is worked off batch by batch, each one a short write, so
the single SQLite writer keeps serving the requests queued in between.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hookah import defaults
from hookah.delivery.outage import log_store_failure
from hookah.storage.interface import IStore

log = Logger()

# Seconds between passes.
INTERVAL = 60.0


class RetentionService(Service):
    name = "retention"

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        retention: float,
        history_age: float,
        idempotency_window: float = defaults.IDEMPOTENCY_WINDOW,
        interval: float = INTERVAL,
        batch: int = defaults.PURGE_BATCH,
    ) -> None:
        self.store = store
        self.clock = clock
        self.retention = retention
        self.history_age = history_age
        self.idempotency_window = idempotency_window
        self.interval = interval
        self.batch = batch
        self._loop: Optional[LoopingCall] = None
        self._pass: Optional[Deferred] = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred:
        """Stop the loop and wait for a pass in progress: storage closes after it."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._pass is None:
            return succeed(None)
        waiting: Deferred = Deferred()

        def finished(result: Any) -> Any:
            waiting.callback(None)
            return result

        self._pass.addBoth(finished)
        return waiting

    def sweep(self) -> Deferred:
        """One pass: finished deliveries, events, then idempotency keys. Errors are logged; the loop goes on."""
        d = ensureDeferred(self._sweep())
        self._pass = d

        def done(result: Any) -> Any:
            if self._pass is d:
                self._pass = None
            return result

        d.addBoth(done)
        return d

    async def _sweep(self) -> None:
        now = self.clock.seconds()
        deliveries = await self._drain(self.store.purge_finished, now - self.retention, "finished deliveries")
        events = await self._drain(self.store.trim_events, now - self.history_age, "events")
        keys = await self._drain(
            self.store.purge_idempotency_keys, now - self.idempotency_window, "idempotency keys"
        )
        if deliveries or events or keys:
            log.info(
                "retention: deleted {deliveries} finished deliveries, {events} events"
                " and {keys} idempotency keys",
                deliveries=deliveries,
                events=events,
                keys=keys,
            )

    async def _drain(self, purge: Any, before: float, what: str) -> int:
        total = 0
        while True:
            try:
                count: int = await purge(before, self.batch)
            except Exception:
                log_store_failure(log, Failure(), "retention: deleting old {what} failed", what=what)
                return total
            total += count
            if count < self.batch or not self.running:
                return total
