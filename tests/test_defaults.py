"""
One source for every default: a part built without a ``Config`` (a test,
an embedding program) must behave like the server built from ``Config()``,
and the option help must name the value actually used.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from hookah.cli.client import HookahClient
from hookah.cli.main import DEFAULT_SERVER, build_parser
from hookah.config import SETTINGS, Config
from hookah.core import HookahCore
from hookah.delivery.dispatcher import Dispatcher
from hookah.delivery.retention import RetentionService
from hookah.outbound.client import HTTPClient
from hookah.storage.memory import MemoryStore
from hookah.delivery.hosts import HostGate
from hookah.storage.sqlite.store import SQLiteStore
from hookah.websub.publisher import Publisher
from hookah.websub.subscriptions import WebSubHub


def default(function: Callable[..., Any], parameter: str) -> Any:
    return inspect.signature(function).parameters[parameter].default


class DefaultsTests(SynchronousTestCase):
    def test_parts_default_to_the_configs_values(self) -> None:
        config = Config()
        for function, parameter, expected in [
            (Dispatcher, "timeout", config.timeout),
            (Dispatcher, "concurrency", config.concurrency),
            (HostGate, "limit", config.host_concurrency),
            (HostGate, "threshold", config.breaker_threshold),
            (HostGate, "window", config.breaker_window),
            (HostGate, "first_pause", config.breaker_pause),
            (HostGate, "cooldown", config.breaker_cooldown),
            (HTTPClient.request, "timeout", config.timeout),
            (WebSubHub, "timeout", config.timeout),
            (WebSubHub, "lease_bounds", config.lease_bounds),
            (Publisher, "timeout", config.timeout),
            (HookahCore, "idempotency_window", config.idempotency_window),
            (HookahCore, "history_count", config.history_count),
            (HookahCore, "history_age", config.history_age),
            (RetentionService, "idempotency_window", config.idempotency_window),
        ]:
            self.assertEqual(default(function, parameter), expected, f"{function.__qualname__}({parameter}=...)")

    def test_retention_batches_match_the_stores(self) -> None:
        batch = default(RetentionService, "batch")
        from hookah.storage.postgres.store import PostgresStore

        for store in (MemoryStore, SQLiteStore, PostgresStore):
            for method in (store.purge_finished, store.purge_idempotency_keys, store.trim_events):
                self.assertEqual(default(method, "limit"), batch, method.__qualname__)

    def test_help_names_the_default(self) -> None:
        config = Config()
        shown = {
            "timeout": config.timeout, "keepalive": config.keepalive, "concurrency": config.concurrency,
            "host-concurrency": config.host_concurrency, "breaker-threshold": config.breaker_threshold,
            "breaker-cooldown": config.breaker_cooldown, "history-count": config.history_count,
            "breaker-window": config.breaker_window, "breaker-pause": config.breaker_pause,
            "history-age": config.history_age, "retention": config.retention,
            "idempotency-window": config.idempotency_window, "max-body": config.max_body,
            "stream-buffer": config.stream_buffer, "storage": config.storage,
            "claim-lease": config.claim_lease,
        }
        for setting in SETTINGS:
            if setting.name in shown:
                value = shown[setting.name]
                text = f"{value:g}" if isinstance(value, float) else str(value)
                self.assertIn(f"[default: {text}]", setting.help, setting.name)
        [lease] = [s for s in SETTINGS if s.name == "lease-bounds"]
        self.assertIn("[default: {},{},{}]".format(*config.lease_bounds), lease.help)
        [port] = [s for s in SETTINGS if s.name == "port"]
        self.assertEqual(config.listen, "tcp:" + port.help.split("[default: ")[1].rstrip("]"))

    def test_the_command_line_client_waits_as_long_as_its_option_says(self) -> None:
        options = build_parser().parse_args(["show", "X"])
        self.assertEqual(default(HookahClient, "timeout"), options.request_timeout)
        self.assertEqual(DEFAULT_SERVER, "http://localhost:" + Config().listen.split(":")[1])
