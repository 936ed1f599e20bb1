"""
``WebPort``: the service that listens for HTTP on an endpoint, and says when
it does.

Twisted's ``StreamServerEndpointService`` keeps the Deferred of its
listening port to itself; Hookah needs it (tests and embedders listen on
port 0 and must learn the port, and start-up must fail clearly when the
port is taken), so this is that service on public API alone: the Deferred
that ``IStreamServerEndpoint.listen`` returns.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure

__all__ = ["WebPort"]


class WebPort(Service):
    """Listens on ``endpoint`` with ``factory`` while running."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self._listen: Optional[Deferred] = None
        self._port: Optional[IListeningPort] = None
        self._failure: Optional[Failure] = None
        self._waiters: List[Deferred] = []

    def listening(self) -> Deferred:
        """
        Deferred[IListeningPort] once the port listens (it may be asked
        before the service starts); fails with the reason when it cannot.
        """
        if self._port is not None:
            return succeed(self._port)
        if self._failure is not None:
            return fail(self._failure)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self._port, self._failure = None, None
        self._listen = self.endpoint.listen(self.factory)
        self._listen.addCallbacks(self._listened, self._failed)

    def stopService(self) -> Deferred:
        """Stop listening (or trying to); fires once the port is closed."""
        super().stopService()
        listen, self._listen = self._listen, None
        port, self._port = self._port, None
        if listen is not None and not listen.called:
            listen.cancel()
        if port is not None:
            stopped = port.stopListening()
            return stopped if stopped is not None else succeed(None)
        return succeed(None)

    def _listened(self, port: IListeningPort) -> None:
        self._port = port
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(port)

    def _failed(self, failure: Failure) -> None:
        self._failure = failure
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(failure)
