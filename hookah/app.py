"""
Assemble a running Hookah from a ``Config``: storage, outgoing client,
dispatcher, core and the web site, started in an order that never accepts a
request storage cannot keep.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource

from hookah.config import Config
from hookah.dispatcher import Dispatcher
from hookah.http import HTTPClient, pooled_treq
from hookah.hosts import HostGate
from hookah.ids import IdGenerator
from hookah.metrics import Metrics
from hookah.service import HookahCore
from hookah.signing import Signer
from hookah.ssrf import AddressPolicy
from hookah.storage.interface import IStore
from hookah.web.common import make_site
from hookah.web.dispatch import DispatchResource

log = Logger()


def open_store(storage: str, reactor: Any) -> IStore:
    if storage == "memory:":
        from hookah.storage.memory import MemoryStore

        return MemoryStore(reactor)
    from hookah.storage.sqlite import SQLiteStore

    return SQLiteStore(storage[len("sqlite:"):], reactor)


def build_root(core: HookahCore, config: Config) -> Resource:
    root = Resource()
    root.putChild(b"dispatch", DispatchResource(core))
    return root


class HookahService(MultiService):
    """Opens storage first, then the dispatcher, then the listening port."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.store = open_store(config.storage, reactor)
        self.address_policy = AddressPolicy(config.allow_private_targets, config.allowed_networks)
        treq_client, self.pool = pooled_treq(reactor, config.host_concurrency, self.address_policy)
        self.client = HTTPClient(treq_client, reactor)
        self.new_id = IdGenerator(reactor.seconds)
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(
            self.store,
            self.client,
            reactor,
            self.new_id,
            config.retry_schedule,
            timeout=config.timeout,
            concurrency=config.concurrency,
            metrics=self.metrics,
            signer=Signer(config.signing_secrets) if config.signing_secrets else None,
            hosts=HostGate(reactor, config.host_concurrency, config.breaker_threshold, config.breaker_cooldown),
        )
        self.core = HookahCore(
            self.store,
            self.dispatcher,
            reactor,
            self.new_id,
            idempotency_window=config.idempotency_window,
            history_count=config.history_count,
            history_age=config.history_age,
            metrics=self.metrics,
            address_policy=self.address_policy,
        )
        self.site = make_site(build_root(self.core, config), config.max_body, reactor)
        self.web = strports.service(config.listen, self.site, reactor=reactor)
        self._opened: Optional[Deferred] = None
        self._listening: List[Deferred] = []

    def listening(self) -> Deferred:
        """Deferred[IListeningPort] once the web port listens (tests use port 0)."""
        d: Deferred = Deferred()
        if getattr(self.web, "_waitingForPort", None) is not None:
            self._notify_listening(d)
        else:
            self._listening.append(d)
        return d

    def _notify_listening(self, d: Deferred) -> None:
        def fire(port: Any) -> Any:
            d.callback(port)
            return port

        self.web._waitingForPort.addCallback(fire)  # type: ignore[attr-defined,union-attr]

    def startService(self) -> None:
        # Storage opens before anything can accept or claim work.
        Service.startService(self)
        self._opened = self.store.open()
        self._opened.addCallback(lambda _: self.store.release_claims())
        self._opened.addCallback(lambda _: self._start_children())
        self._opened.addErrback(self._failed_to_start)

    def _start_children(self) -> None:
        self.dispatcher.setServiceParent(self)
        self.web.setServiceParent(self)
        waiting, self._listening = self._listening, []
        for d in waiting:
            self._notify_listening(d)
        log.info("hookah listening on {listen}, storage {storage}", listen=self.config.listen, storage=self.config.storage)

    def _failed_to_start(self, failure: Any) -> None:
        log.failure("hookah could not start", failure)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred:
        async def stop() -> None:
            if self._opened is not None:
                await self._opened
            # Stop listening first, then let attempts in flight record their
            # outcome, then close storage after its last write.
            await MultiService.stopService(self)
            await self.site.close_connections()
            await self.pool.closeCachedConnections()
            await self.store.close()

        return ensureDeferred(stop())
