"""
Assemble a running Hookah from a ``Config``: storage, outgoing client,
dispatcher, core and the web site, started in an order that never accepts a
request storage cannot keep.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import Resource

from prometheus_client import Counter

from hookah.config import Config, with_backlog
from hookah.delivery.dispatcher import Dispatcher
from hookah.websub.distributor import Distributor
from hookah.websub.publisher import Publisher
from hookah.outbound.client import guarded_client
from hookah.delivery.hosts import HostGate
from hookah.ids import IdGenerator
from hookah.metrics import Metrics
from hookah.delivery.retention import RetentionService
from hookah.core import HookahCore
from hookah.delivery.signing import Signer
from hookah.urls import AddressPolicy
from hookah.storage.interface import ISharedStore, IStore
from hookah.streams.registry import TopicRegistry
from hookah.web.channel import SocketLimits
from hookah.web.common import JsonResource, make_site
from hookah.web.auth import ADMIN, Tokens, describe, dispatch_policy, guard, hub_policy
from hookah.web.cors import CorsPolicy, cors
from hookah.web.dispatch import DispatchResource
from hookah.web.streamtokens import stream_mount
from hookah.web.ops import (
    HealthResource, LoginResource, LogoutResource, MetricsResource, StatusPage, login_or_json, stream_counts,
)
from hookah.web.hub import HubResource, SubscriptionsResource
from hookah.web.listener import WebPort
from hookah.web.topics import TopicsResource
from hookah.websub.access import SubscribeAccess
from hookah.websub.subscriptions import TopicPolicy, WebSubHub
from hookah.workers import AdoptedEndpoint, exit_with_failure, watch_master, worker_fd, worker_index

log = Logger()


def open_store(storage: str, reactor: Any) -> IStore:
    if storage == "memory:":
        from hookah.storage.memory import MemoryStore

        return MemoryStore(reactor)
    if storage.startswith(("postgresql://", "postgres://")):
        # Imported only here: psycopg is an optional dependency.
        from hookah.storage.postgres.store import PostgresStore

        return PostgresStore(storage, reactor)
    from hookah.storage.sqlite.store import SQLiteStore

    return SQLiteStore(storage[len("sqlite:"):], reactor)


def build_root(
    core: HookahCore, config: Config, websub: WebSubHub, publisher: Publisher, streams: TopicRegistry,
) -> Resource:
    root = JsonResource()  # unknown paths: a JSON 404
    tokens = Tokens.from_config(config)
    describe(tokens)
    # Pages of --cors-origins may use these mounts with these methods (None: CORS off).
    policy = CorsPolicy.from_config(config.cors_origins)
    access = SubscribeAccess.from_config(config)
    log.info("WebSub subscription: {access}", access=access.describe())
    root.putChild(b"dispatch", cors(guard(DispatchResource(core), tokens, dispatch_policy), policy, [b"GET", b"POST"]))
    root.putChild(b"login", LoginResource(tokens))
    root.putChild(b"logout", LogoutResource())
    root.putChild(b"healthz", HealthResource(core.ping, core.clock, lambda: core.running, worker=worker_index()))
    root.putChild(b"topics", cors(guard(TopicsResource(core), tokens, ADMIN), policy, [b"GET"]))
    # Streams replay topic history (count, Last-Event-ID): as admin-only as
    # /topics, or readable with a short-lived token for some topics.
    root.putChild(b"stream", cors(stream_mount(streams, core, core.clock, config.stream_buffer, tokens), policy, [b"GET"]))
    root.putChild(b"", guard(StatusPage(core, tokens, *whole_server(core, streams)), tokens, ADMIN, login_or_json))
    root.putChild(b"metrics", guard(MetricsResource(core), tokens, ADMIN))
    root.putChild(b"hub", cors(guard(HubResource(websub, publisher, subscriptions=SubscriptionsResource(core), access=access), tokens, hub_policy()), policy, [b"POST"]))
    root.putChild(b"subscribe", guard(HubResource(websub, publisher, access=access), tokens, hub_policy()))
    root.putChild(
        b"publish", cors(guard(HubResource(websub, publisher, default_mode="publish", access=access), tokens, hub_policy("publish")), policy, [b"POST"])
    )
    return root


def whole_server(core: HookahCore, streams: TopicRegistry) -> Tuple[Callable[[], Dict[str, int]], Callable[[], int]]:
    """
    Open streams per topic and attempts in flight, for the status page:
    this process's, or under --workers every worker's (from the gauges
    they publish, ``hookah.metrics``).
    """
    local = stream_counts(streams)
    metrics = core.metrics
    if not metrics.shared_dir:
        return local, lambda: core.in_flight
    metrics.gauge(
        "hookah_topic_streams", "Open /stream responses by topic", lambda: [((t,), float(n)) for t, n in local().items()],
        labels=("topic",), local=True, shared_only=True,
    )

    def topics() -> Dict[str, int]:
        return {labels[0]: int(n) for labels, n in (metrics.summed("hookah_topic_streams") or {}).items() if n}

    def in_flight() -> int:
        return int(sum((metrics.summed("hookah_deliveries_in_flight") or {}).values()))

    return topics, in_flight


class HookahService(MultiService):
    """Opens storage first, then the dispatcher, then the listening port."""

    def __init__(self, config: Config, reactor: Any, exit_on_failure: bool = False, resolve: Any = None) -> None:
        """``resolve`` (host, port) -> Deferred[addresses] replaces ``getaddrinfo`` for outgoing requests."""
        super().__init__()
        self.exit_on_failure = exit_on_failure
        self.config = config
        self.reactor = reactor
        self.store = open_store(config.storage, reactor)
        # Several nodes on one database: claims are short leases that live
        # nodes renew, and the other nodes' news arrive by notification.
        self.shared = ISharedStore.providedBy(self.store)
        self.address_policy = AddressPolicy(config.allow_private_targets, config.allowed_networks)
        self.client = guarded_client(reactor, config.host_concurrency, self.address_policy, resolve=resolve)
        self.new_id = IdGenerator(reactor.seconds)
        self.metrics = Metrics()
        # WebSub: verification and leases; it hears of finished deliveries
        # (a 410 from a callback ends its subscription).
        self.websub = WebSubHub(
            self.store, self.client, reactor, config.lease_bounds, TopicPolicy(config.topic_allow),
            timeout=config.timeout, metrics=self.metrics, address_policy=self.address_policy,
        )
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
            hosts=HostGate(
                reactor,
                config.host_concurrency,
                config.breaker_threshold,
                config.breaker_cooldown,
                window=config.breaker_window,
                first_pause=config.breaker_pause,
                # One host may hold a quarter of the dispatcher's slots
                # waiting; one that answers fast, all but an eighth, each
                # for about 0.1 s (hookah.delivery.hosts.WAIT_HORIZON). The
                # rest stay free for every other host.
                max_waiting=max(config.host_concurrency, config.concurrency // 4),
                max_burst=config.concurrency - config.concurrency // 8 - config.host_concurrency,
            ),
            outcome_listeners=[self.websub],
            lease=config.claim_lease if self.shared else None,
        )
        # Live streams: fed with every stored event, ended cleanly on stop.
        self.streams = TopicRegistry(reactor, config.keepalive)
        # An event becomes one delivery per WebSub subscriber.
        self.distributor = Distributor(self.store, self.new_id, config.public_url)
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
            distribution=self.distributor,
            event_listeners=[] if self.shared else [self.streams],
        )
        # Publish pings: topic fetches that become events.
        self.publisher = Publisher(self.core, self.client, reactor, timeout=config.timeout)
        # Retention: finished deliveries, old events and idempotency keys
        # past their window are deleted in batches.
        self.retention = RetentionService(
            self.store, reactor, config.retention, config.history_age, config.idempotency_window
        )
        if self.shared:
            # Several nodes: the streams get every node's events, in commit
            # order, from the database (not straight from this node's core).
            from hookah.streams.relay import StreamRelay

            self.relay = StreamRelay(self.store, self.streams)
            self.store.event_listeners.append(self.relay.committed)  # type: ignore[attr-defined]
        self.metrics.gauge("hookah_open_streams", "Open /stream responses", lambda: [((), float(len(self.streams)))], local=True)
        refusals = Counter(
            "hookah_http_refusals", "Connections and requests refused at the socket, by reason", ["reason"],
            registry=self.metrics.registry,
        )
        self.site = make_site(
            build_root(self.core, config, self.websub, self.publisher, streams=self.streams), config.max_body, reactor,
            config.access_log, SocketLimits(config.head_timeout, config.min_body_rate, config.max_connections, config.max_streams),
            on_refusal=lambda reason: refusals.labels(reason).inc(),
        )
        self.metrics.gauge(
            "hookah_open_connections", "Open HTTP connections, requests and streams apart",
            lambda: [(("request",), float(self.site.request_connections)), (("stream",), float(self.site.streams))],
            labels=("kind",), local=True,
        )
        # Under --workers: this worker's state gauges, for every worker's scrape.
        self.metrics_refresh: Optional[TimerService] = None
        if self.metrics.shared_dir:
            self.metrics_refresh = TimerService(1.0, self.metrics.refresh)
            self.metrics_refresh.clock = reactor
        inherited = worker_fd()
        if inherited is not None:
            # A worker of --workers: it serves on the master's socket.
            self.web = WebPort(AdoptedEndpoint(inherited, reactor), self.site)
            watch_master(reactor)
        else:
            self.web = WebPort(serverFromString(reactor, with_backlog(config.listen, config.backlog)), self.site)
        self._opened: Optional[Deferred] = None

    def listening(self) -> Deferred:
        """Deferred[IListeningPort] once the web port listens (tests use port 0)."""
        return self.web.listening()

    def startService(self) -> None:
        # Storage opens before anything can accept or claim work.
        Service.startService(self)
        self._opened = self.store.open()
        if not self.shared:
            # The one process on this store: whoever held claims is gone.
            self._opened.addCallback(lambda _: self.store.release_claims(self.reactor.seconds()))
        self._opened.addCallback(lambda _: self._start_children())
        self._opened.addErrback(self._failed_to_start)

    def _start_children(self) -> Deferred:
        self.dispatcher.setServiceParent(self)
        if self.shared:
            from hookah.delivery.renewal import LeaseRenewer

            LeaseRenewer(self.store, self.dispatcher, self.reactor, self.config.claim_lease).setServiceParent(self)
            self.store.work_listeners.append(self.dispatcher.wake)  # type: ignore[attr-defined]
        self.websub.setServiceParent(self)
        self.publisher.setServiceParent(self)
        self.retention.setServiceParent(self)
        if self.metrics_refresh is not None:
            self.metrics_refresh.setServiceParent(self)
        self.web.setServiceParent(self)
        # A port that cannot be bound fails the start like storage does.
        return self.web.listening().addCallback(self._listening_now)

    def _listening_now(self, port: Any) -> None:
        log.info("hookah listening on {listen}, storage {storage}", listen=self.config.listen, storage=self.config.storage)

    def _failed_to_start(self, failure: Any) -> None:
        """
        Storage that cannot be opened or a port that cannot be bound ends
        the process with one clear line and a non-zero status (when run as a
        program); an embedding test or program gets the logged failure only.
        """
        if not self.exit_on_failure:
            log.failure("hookah could not start", failure)
            return
        log.critical("hookah: cannot start: {reason}", reason=failure.getErrorMessage())

        def stop() -> None:
            self.reactor.addSystemEventTrigger("after", "shutdown", exit_with_failure)
            self.reactor.stop()

        if self.reactor.running:
            stop()
        else:
            self.reactor.callWhenRunning(stop)

    def stopService(self) -> Deferred:
        async def stop() -> None:
            if self._opened is not None:
                await self._opened
            # Stop listening first, then let attempts in flight record their
            # outcome, then close storage after its last write.
            await MultiService.stopService(self)
            await self.streams.close_all()
            await self.site.close_connections()
            await self.client.close()
            await self.store.close()
            # Under --workers the last counts go to the shared files too.
            self.metrics.fold()

        return ensureDeferred(stop())
