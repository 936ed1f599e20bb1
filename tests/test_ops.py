"""
``/healthz``, ``/metrics`` and the status page ``/`` on a running Hookah,
plus the pieces behind them: the newest-deliveries search and the JSON log
lines.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Dict, List
from urllib.parse import quote

import attr
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from hookah.logs import JsonLineObserver
from hookah.metrics import Metrics as HookahMetrics
from hookah.model import DELIVERED, FAILED, Delivery, Subscription
from hookah.web.recent import id_at, newest_deliveries
from hookah.storage.memory import MemoryStore
from hookah.web.ops import HealthResource
from tests.support import http_client, listen_sink, poll, start_hookah
from tests.test_e2e_durability import reserve_port


async def get(client: Any, url: str) -> Any:
    response = await client.get(url)
    return response.code, response.headers, await response.content()


class Health(TestCase):
    timeout = 30

    def test_ok_then_storage_down(self) -> Any:
        async def go() -> None:
            service, base = await start_hookah(self)
            client = http_client(self)
            code, headers, body = await get(client, base + "/healthz")
            self.assertEqual(code, 200)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertEqual(json.loads(body)["storage"], "ok")

            service.store.ping = lambda: fail(OSError("disk I/O error"))  # type: ignore[method-assign]
            code, _, body = await get(client, base + "/healthz")
            self.assertEqual(code, 503)
            reply = json.loads(body)
            self.assertEqual((reply["status"], reply["error"]), ("unavailable", "storage_unavailable"))
            self.assertIn("disk I/O error", reply["message"])

        return ensureDeferred(go())

    def test_storage_that_never_answers(self) -> None:
        clock = Clock()
        never: Deferred = Deferred()
        store = attr.make_class("Store", [])()
        store.ping = lambda: never  # type: ignore[attr-defined]
        resource = HealthResource(store.ping, clock, timeout=5.0)
        request: Any = DummyRequest([b""])
        self.assertEqual(resource.render_GET(request), NOT_DONE_YET)
        self.assertFalse(request.finished)
        clock.advance(5.0)
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(json.loads(b"".join(request.written))["error"], "storage_unavailable")

    def test_stopped_service_is_unhealthy(self) -> None:
        resource = HealthResource(MemoryStore(Clock()).ping, Clock(), running=lambda: False)
        request: Any = DummyRequest([b""])
        resource.render_GET(request)
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(json.loads(b"".join(request.written))["error"], "service_stopped")


def samples(text: str) -> Dict[str, Dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from Prometheus text, via prometheus_client's parser."""
    found: Dict[str, Dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        found.setdefault("family:" + family.name, {})[(("type", family.type),)] = 1
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


class Metrics(TestCase):
    timeout = 30

    def test_metrics_after_dispatches(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (500, {}, b"no") if r.path.startswith("/bad") else (200, {}, b"ok")
            service, base = await start_hookah(self)
            client = http_client(self)
            ids = []
            for path in ("/ok1", "/ok2", "/ok3", "/bad"):
                response = await client.post(
                    base + "/dispatch?_retries=0&_url=" + quote(sink_url + path, safe=""), data=b"{}",
                    headers={"Content-Type": "application/json"},
                )
                self.assertEqual(response.code, 202)
                ids.append((await response.json())["id"])
            later = await client.post(base + "/dispatch?_delay=3600&_url=" + quote(sink_url + "/later", safe=""), data=b"x")
            self.assertEqual(later.code, 202)
            topic = await client.post(base + "/dispatch?_topic=metrics-topic", data=b"x")
            self.assertEqual(topic.code, 202)

            async def finished() -> bool:
                for i in ids:
                    d = await service.store.get_delivery(i)
                    if d.status not in (DELIVERED, FAILED):
                        return False
                return True

            await poll("deliveries to finish", finished, 15.0)
            code, headers, body = await get(client, base + "/metrics")
            self.assertEqual(code, 200)
            self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4"))
            found = samples(body.decode())

            self.assertEqual(found["hookah_dispatches_accepted_total"][(("target", "url"),)], 5.0)
            self.assertEqual(found["hookah_dispatches_accepted_total"][(("target", "topic"),)], 1.0)
            self.assertEqual(found["hookah_deliveries_finished_total"][(("outcome", "delivered"),)], 3.0)
            self.assertEqual(found["hookah_deliveries_finished_total"][(("outcome", "failed"),)], 1.0)
            self.assertEqual(found["hookah_delivery_attempts_total"][(("result", "2xx"),)], 3.0)
            self.assertEqual(found["hookah_delivery_attempts_total"][(("result", "5xx"),)], 1.0)
            self.assertEqual(found["hookah_attempt_duration_seconds_count"][()], 4.0)
            self.assertEqual(found["hookah_attempt_duration_seconds_bucket"][(("le", "+Inf"),)], 4.0)
            self.assertEqual(found["hookah_delivery_queue_depth"][()], 1.0)
            self.assertEqual(found["hookah_deliveries"][(("status", "scheduled"),)], 1.0)
            self.assertEqual(found["hookah_deliveries"][(("status", "delivered"),)], 3.0)
            self.assertEqual(found["hookah_deliveries"][(("status", "failed"),)], 1.0)
            self.assertEqual(found["hookah_topics"][()], 1.0)
            self.assertEqual(found["hookah_subscriptions"][()], 0.0)
            self.assertEqual(found["hookah_events_published_total"][()], 1.0)
            self.assertIn("hookah_open_streams", found)
            self.assertIn("family:hookah_websub_verifications", found)

            # A Prometheus server asks for OpenMetrics and gets it.
            response = await client.get(base + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
            self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text"))
            self.assertTrue((await response.content()).endswith(b"# EOF\n"))

        return ensureDeferred(go())


    def test_tallied_counts_show_at_every_collection(self) -> None:
        metrics = HookahMetrics(shared_dir="")
        url = metrics.tally(metrics.dispatches.labels("url"))
        for _ in range(3):
            url.inc()
        self.assertEqual(metrics.registry.get_sample_value("hookah_dispatches_accepted_total", {"target": "url"}), 3.0)
        url.inc()
        found = samples(metrics.render().decode())
        self.assertEqual(found["hookah_dispatches_accepted_total"][(("target", "url"),)], 4.0)
        self.assertEqual(metrics.registry.get_sample_value("hookah_dispatches_accepted_total", {"target": "url"}), 4.0)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(
        # Negative (a clock stepped back), infinite and NaN ones too.
        st.sampled_from([0.0, 0.005, 0.01, 0.025, 0.1, 1.0, 60.0, 61.0, -1.0, math.inf, -math.inf, math.nan]),
        st.floats(min_value=0, max_value=1e6, allow_nan=False),
    ), max_size=30))
    def test_histogram_tally_collects_what_observe_would(self, amounts: List[float]) -> None:
        metrics = HookahMetrics(shared_dir="")
        registry = CollectorRegistry()
        reference = Histogram(
            "hookah_attempt_duration_seconds", "reference", registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        for amount in amounts:
            metrics.attempt_timings.observe(amount)
            reference.observe(amount)
        self.assertFalse(metrics.attempt_timings.direct)
        got = samples(metrics.render().decode())
        want = samples(generate_latest(registry).decode())
        for name in ("hookah_attempt_duration_seconds_bucket", "hookah_attempt_duration_seconds_count"):
            self.assertEqual(got[name], want[name])
        got_sum, want_sum = got["hookah_attempt_duration_seconds_sum"][()], want["hookah_attempt_duration_seconds_sum"][()]
        if not math.isfinite(want_sum):
            self.assertEqual(repr(got_sum), repr(want_sum))  # nan, inf or -inf alike
        else:
            self.assertAlmostEqual(got_sum, want_sum)

    def test_histogram_tally_without_the_expected_internals_observes_directly(self) -> None:
        observed: List[float] = []

        class Other:
            def observe(self, amount: float) -> None:
                observed.append(amount)

        tally = HookahMetrics(shared_dir="").histogram_tally(Other())  # type: ignore[arg-type]
        self.assertTrue(tally.direct)
        tally.observe(0.5)
        tally.fold()
        self.assertEqual(observed, [0.5])


class StatusPageContent(TestCase):
    timeout = 30

    def test_page_shows_state_and_escapes_user_text(self) -> Any:
        async def go() -> None:
            sink, sink_url = listen_sink(self)
            sink.respond = lambda r: (500, {}, b"no")
            service, base = await start_hookah(self)
            client = http_client(self)
            evil = "<script>alert('topic')</script>"
            response = await client.post(base + "/dispatch?_topic=" + quote(evil, safe=""), data=b"x")
            self.assertEqual(response.code, 202)
            target = sink_url + "/hook?<img/src=x/onerror=alert(1)>"
            response = await client.post(base + "/dispatch?_retries=0&_url=" + quote(target, safe=""), data=b"x")
            failed_id = (await response.json())["id"]
            now = reactor.seconds()
            await service.store.put_subscription(
                Subscription("https://pub.example/feed", "https://sub.example/cb?<b>", None, 86400, now, now + 3 * 86400 + 60)
            )
            await poll("the failure", lambda: service.store.get_delivery(failed_id).addCallback(lambda d: d.status == FAILED), 15.0)

            code, headers, body = await get(client, base + "/")
            self.assertEqual(code, 200)
            html = body.decode()
            csp = headers.getRawHeaders(b"content-security-policy")[0].decode()
            self.assertIn("script-src 'nonce-", csp)
            self.assertNotIn("<script>alert", html)
            self.assertNotIn("<img/src=x", html)
            self.assertIn("&lt;script&gt;alert(&#x27;topic&#x27;)&lt;/script&gt;", html)
            self.assertIn("&lt;img/src=x/onerror=alert(1)&gt;", html)
            self.assertIn("https://sub.example/cb?&lt;b&gt;", html)
            self.assertIn("in 3d", html)  # lease expiry, relative
            self.assertIn(f'data-delivery="{failed_id}"', html)
            self.assertIn(f'action="/dispatch/{failed_id}/retry"', html)
            self.assertIn('<div class="value">1</div><div class="label">failed</div>', html)
            self.assertEqual(html.count("<script"), 1)  # only ours, with its nonce

        return ensureDeferred(go())


    def test_page_and_api_say_why_a_delivery_waits(self) -> Any:
        async def go() -> None:
            # A host that refuses connections is paused at its first failure
            # here, for ten minutes.
            service, base = await start_hookah(
                self, breaker_threshold=1, breaker_window=0.0, breaker_pause=600.0, breaker_cooldown=600.0
            )
            reserved = reserve_port(self)
            dead = f"http://127.0.0.1:{reserved.getsockname()[1]}/hook"
            client = http_client(self)

            async def dispatch(query: str) -> str:
                response = await client.post(base + "/dispatch?" + query, data=b"x")
                self.assertEqual(response.code, 202)
                return str((await response.json())["id"])

            first = await dispatch("_retries=5&_url=" + quote(dead, safe=""))
            await poll("the first refusal", lambda: service.store.get_delivery(first).addCallback(lambda d: len(d.attempts) == 1), 15.0)
            held = await dispatch("_url=" + quote(dead, safe=""))
            delayed = await dispatch("_delay=600&_url=" + quote(dead.replace("/hook", "/later"), safe=""))

            async def waiting(delivery_id: str) -> Any:
                response = await client.get(f"{base}/dispatch/{delivery_id}")
                return (await response.json())["waiting"]

            paused = await waiting(held)
            self.assertEqual(paused["reason"], "host_paused")
            self.assertEqual(paused["host"], dead.rsplit("/", 1)[0])
            self.assertGreater(paused["probe_at"], reactor.seconds() + 500)
            self.assertGreaterEqual(paused["until"], paused["probe_at"])
            self.assertEqual((await waiting(delayed))["reason"], "delay")

            code, _, body = await get(client, base + "/")
            self.assertEqual(code, 200)
            html = body.decode()
            self.assertIn('data-waiting="host_paused">(host paused, probe in 9m', html)
            self.assertIn('data-waiting="delay">(delayed)', html)

        return ensureDeferred(go())


class NewestDeliveries(TestCase):
    def fill(self, store: MemoryStore, times: List[float]) -> List[str]:
        ids = []
        for n, t in enumerate(sorted(times)):
            delivery_id = id_at(t)[:10] + f"{n:016d}"
            ids.append(delivery_id)
            status = FAILED if n % 3 == 0 else DELIVERED
            store.add_deliveries([Delivery(id=delivery_id, url="http://x/", body=b"", status=status, created_at=t)])
        return ids

    def newest(self, store: MemoryStore, status: Any, count: int, now: float) -> List[str]:
        d = ensureDeferred(newest_deliveries(store, status, count, now))
        return [x.id for x in self.successResultOf(d)]

    def test_sparse_dense_and_bursty_histories(self) -> None:
        now = 1_800_000_000.0
        histories = {
            "sparse": [now - 86400 * k for k in range(1, 30)],
            "dense": [now - 0.01 * k for k in range(1, 2000)],
            "burst then quiet": [now - 7200 - 0.001 * k for k in range(1, 3000)] + [now - 5, now - 1],
            "few": [now - 10, now - 20],
        }
        for name, times in histories.items():
            store = MemoryStore(Clock())
            ids = self.fill(store, times)
            expected = list(reversed(ids))[:20]
            self.assertEqual(self.newest(store, None, 20, now), expected, name)
            failed = [i for n, i in enumerate(ids) if n % 3 == 0]
            self.assertEqual(self.newest(store, FAILED, 5, now), list(reversed(failed))[:5], name)

    def test_queries_stay_bounded(self) -> None:
        now = 1_800_000_000.0
        store = MemoryStore(Clock())
        self.fill(store, [now - 0.05 * k for k in range(1, 5000)])
        calls: List[int] = []
        original = store.list_deliveries

        def counted(status: Any, limit: int, after: Any) -> Any:
            calls.append(limit)
            return original(status, limit, after)

        store.list_deliveries = counted  # type: ignore[assignment]
        self.assertEqual(len(self.newest(store, None, 20, now)), 20)
        self.assertLessEqual(len(calls), 60)
        self.assertLessEqual(max(calls), 100)


class JsonLogs(TestCase):
    def test_one_json_object_per_line(self) -> None:
        out = io.StringIO()
        observer = JsonLineObserver(out)
        log = Logger(namespace="hookah.test", observer=observer)
        log.info("delivered {id} to {url} in {ms}ms", id="01X", url="http://x/", ms=12)
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("attempt {id} broke", id="01Y")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["message"], "delivered 01X to http://x/ in 12ms")
        self.assertEqual((first["level"], first["namespace"], first["id"], first["ms"]), ("info", "hookah.test", "01X", 12))
        self.assertTrue(first["time"].endswith("+00:00"))
        self.assertEqual(second["level"], LogLevel.critical.name)
        self.assertIn("ZeroDivisionError", second["failure"])
