"""
The dedicated listening connection of one node: ``LISTEN`` on Hookah's
channels, each notification handed to the reactor thread.

It runs on a thread of its own, blocked in psycopg's ``notifies()`` with a
timeout so that it notices when it is told to stop. A dropped connection
(PostgreSQL restarted, the backend terminated) is opened again with a
growing pause; once it listens again ``reconnected`` is called in the
reactor thread, so the node reads what was announced while it was deaf
(the catch-up read) instead of missing it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()


class Listener:
    """LISTEN on ``channels`` over a connection of its own, on a thread of its own."""

    def __init__(
        self,
        conninfo: str,
        reactor: Any,
        channels: Sequence[str],
        notified: Callable[[str, str], Any],
        reconnected: Callable[[], Any],
        poll_timeout: float = 0.5,
        max_pause: float = 5.0,
    ) -> None:
        self.conninfo = conninfo
        self.reactor = reactor
        self.channels = tuple(channels)
        self.notified = notified
        self.reconnected = reconnected
        self.poll_timeout = poll_timeout
        self.max_pause = max_pause
        self._stopping = threading.Event()
        self._thread_pool: Optional[ThreadPool] = None
        self._done: Optional[Deferred] = None
        self.connections = 0
        # The backend pid of the current listening connection (tests end it
        # with pg_terminate_backend), or None while not listening.
        self.backend_pid: Optional[int] = None

    def start(self) -> None:
        self._thread_pool = ThreadPool(minthreads=1, maxthreads=1, name="hookah-listen")
        self._thread_pool.start()
        self._done = deferToThreadPool(self.reactor, self._thread_pool, self._run)
        self._done.addErrback(lambda f: log.failure("the listening thread failed", f))

    def stop(self) -> Deferred:
        self._stopping.set()
        done, self._done = self._done, None
        pool, self._thread_pool = self._thread_pool, None
        if done is None or pool is None:
            from twisted.internet.defer import succeed

            return succeed(None)

        def stopped(_: object) -> None:
            pool.stop()

        return done.addBoth(stopped)

    def _run(self) -> None:
        import psycopg

        pause = 0.1
        first = True
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5) as connection:
                    for channel in self.channels:
                        connection.execute(f"LISTEN {channel}")
                    self.backend_pid = connection.info.backend_pid
                    self.connections += 1
                    if not first:
                        log.info("listening connection to PostgreSQL re-established")
                        self.reactor.callFromThread(self.reconnected)
                    first = False
                    pause = 0.1
                    while not self._stopping.is_set():
                        for notify in connection.notifies(timeout=self.poll_timeout):
                            self.reactor.callFromThread(self.notified, notify.channel, notify.payload)
                        # notifies() with a timeout returns quietly on a
                        # dead connection: ask, so a drop is noticed.
                        if connection.closed or connection.broken:
                            raise psycopg.OperationalError("the listening connection was closed")
            except Exception as e:
                self.backend_pid = None
                if self._stopping.is_set():
                    break
                first = False
                log.warn("listening connection to PostgreSQL lost: {error}; retrying in {pause}s",
                         error=str(e).strip(), pause=pause)
                self._stopping.wait(pause)
                pause = min(pause * 2, self.max_pause)
        self.backend_pid = None
