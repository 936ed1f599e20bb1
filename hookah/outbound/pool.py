"""
Persistent connections per (scheme, host, port), made through the SSRF-guarded
endpoints.

A connection whose response left it reusable waits here for the next request
to the same target. At most ``max_idle_per_host`` wait per target (the oldest
is closed to make room), none longer than ``idle_timeout`` seconds (one sweep
every eighth of that closes the stale ones, rather than a timer per
connection re-armed on every request), and one the peer closes while it waits
is dropped at once. ``close`` ends every idle connection and keeps any
released later from waiting.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from hookah.outbound.connection import ConnectionFactory, HTTPConnection, Key

__all__ = ["ConnectionPool"]


class ConnectionPool:
    def __init__(
        self,
        clock: IReactorTime,
        endpoints: Any,
        max_idle_per_host: int,
        idle_timeout: float = 120.0,
    ) -> None:
        """``endpoints.endpoint_for(scheme, host, port)`` gives the ``IStreamClientEndpoint`` to connect with."""
        self._clock = clock
        self._endpoints = endpoints
        self._max_idle = max_idle_per_host
        self._idle_timeout = idle_timeout
        self._idle: Dict[Key, List[HTTPConnection]] = {}
        self._sweep: Optional[IDelayedCall] = None
        self.closed = False

    def idle_count(self, key: Optional[Key] = None) -> int:
        """Connections waiting for a request (to ``key``, or to any target)."""
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(idle) for idle in self._idle.values())

    def take(self, key: Key) -> Optional[HTTPConnection]:
        """The most recently used idle connection to ``key``, or None."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            connection.idle = False
            if not connection.lost:
                return connection
        return None

    def connect(self, key: Key) -> Deferred:
        """Deferred[HTTPConnection]: a new connection to ``key``, made by the guarded endpoint."""
        scheme, host, port = key
        endpoint = self._endpoints.endpoint_for(scheme, host, port)
        return endpoint.connect(ConnectionFactory(key, self._idle_lost))

    def put(self, connection: HTTPConnection) -> None:
        """A connection whose exchange ended cleanly: keep it for the next request, or close it."""
        if connection.lost:
            return
        if self.closed or self._max_idle <= 0:
            connection.close()
            return
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = []
        if len(idle) >= self._max_idle:
            oldest = idle.pop(0)
            oldest.idle = False
            oldest.close()
        connection.idle = True
        connection.idle_since = self._clock.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self._clock.callLater(self._idle_timeout / 8, self._expire)

    def close(self) -> Deferred:
        """Close every idle connection; Deferred that fires once they have ended."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        closing = []
        for idle in self._idle.values():
            for connection in idle:
                connection.idle = False
                closing.append(connection.close())
        self._idle.clear()
        return DeferredList(closing).addCallback(lambda _: None)

    def _idle_lost(self, connection: HTTPConnection) -> None:
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def _expire(self) -> None:
        self._sweep = None
        stale_before = self._clock.seconds() - self._idle_timeout
        for key in list(self._idle):
            idle = self._idle[key]
            while idle and idle[0].idle_since <= stale_before:
                connection = idle.pop(0)
                connection.idle = False
                connection.close()
            if not idle:
                del self._idle[key]
        if self._idle:
            self._sweep = self._clock.callLater(self._idle_timeout / 8, self._expire)
