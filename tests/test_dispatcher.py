"""
The dispatcher on a deterministic ``Clock``, each test on every store flavour
(``tests/storeflavours.py``): ``MemoryStore``, a store that answers on a
later tick, and SQLite.

Outgoing HTTP is either a ``FakeClient`` whose answers the test controls
(when and what), or the real ``hookah.outbound.client.HTTPClient`` served in memory by a
twisted.web resource (``tests/outboundsupport.py``: its timeout, headers and
redirect handling without sockets).
"""

from __future__ import annotations

import base64
import email.utils
import json
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attr
from standardwebhooks.webhooks import Webhook
from twisted.internet import error as neterror
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hookah import __version__
from hookah.delivery.dispatcher import Dispatcher
from hookah.delivery.hosts import HostGate
from hookah.ids import IdGenerator
from hookah.model import (
    DELIVERED,
    DELIVERING,
    FAILED,
    KIND_CALLBACK,
    KIND_DISPATCH,
    KIND_ERRBACK,
    KIND_WEBSUB,
    SCHEDULED,
    Attempt,
    Delivery,
)
from hookah.delivery.signing import Signer
from hookah.listeners import IDeliveryOutcomeListener
from hookah.storage.interface import IStore, StorageUnavailable
from hookah.storage.memory import MemoryStore
from tests.storeflavours import LaterFlavour, LaterStore, MemoryFlavour, SQLiteFlavour, run_on
from tests.outboundsupport import site_client
from tests.support import Answer, FakeClient, Sent, submit

T0 = 1_700_000_000.0
SCHEDULE = (10.0, 20.0, 40.0)
NO_JITTER = lambda: 0.5  # noqa: E731  (rand() == 0.5: jitter exactly zero)
WHSEC = "whsec_" + base64.b64encode(b"dispatcher test secret, 32 bytes").decode()


# -- a StubTreq target --------------------------------------------------------


@attr.s(auto_attribs=True)
class Seen:
    method: str
    host: str
    path: str
    headers: Dict[str, List[str]]
    body: bytes
    request: server.Request

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


class Target(Resource):
    """
    Every host and path, for ``site_client``. ``respond(seen)`` returns
    (code, headers, body), or None to never answer.
    """

    isLeaf = True

    def __init__(self, respond: Callable[[Seen], Any]) -> None:
        super().__init__()
        self.respond = respond
        self.seen: List[Seen] = []

    def render(self, request: server.Request) -> Any:
        headers = {k.decode().lower(): [v.decode("latin-1") for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        host = (request.getHeader(b"host") or b"").decode().split(":")[0]
        seen = Seen(request.method.decode(), host, request.uri.decode(), headers, request.content.read(), request)
        self.seen.append(seen)
        answer = self.respond(seen)
        if answer is None:
            return server.NOT_DONE_YET
        code, extra, body = answer
        request.setResponseCode(code)
        for name, value in extra:
            request.responseHeaders.addRawHeader(name.encode(), value.encode())
        return body

    def to(self, host: str) -> List[Seen]:
        return [s for s in self.seen if s.host == host]


# -- fixtures -----------------------------------------------------------------


class DispatcherTestCase(MemoryFlavour, TestCase):
    def clock(self, start: float = T0) -> Clock:
        clock = self.make_clock()
        clock.advance(start)
        return clock

    def dispatcher(self, clock: Clock, client: Any, store: Optional[MemoryStore] = None, start: bool = True, **kwargs: Any) -> Dispatcher:
        store = store if store is not None else self.make_store(clock)
        settings: Dict[str, Any] = dict(timeout=30.0, rand=NO_JITTER, schedule=SCHEDULE)
        settings.update(kwargs)
        schedule = settings.pop("schedule")
        dispatcher = Dispatcher(store, client, clock, IdGenerator(clock.seconds), schedule, **settings)
        if start:
            dispatcher.startService()

        def stop() -> None:
            if isinstance(client, FakeClient):
                client.fail_outstanding()
            if dispatcher.running:
                stopped = dispatcher.stopService()
                # Attempts still hanging end by their own timeout.
                for _ in range(100):
                    if stopped.called:
                        break
                    clock.advance(60)
                self.successResultOf(stopped)

        self.addCleanup(stop)
        return dispatcher

    def fake(self, answer: Optional[Answer] = None, clock: Optional[Clock] = None, **kwargs: Any) -> Tuple[Clock, FakeClient, Dispatcher]:
        clock = clock or self.clock()
        client = FakeClient(clock, answer)
        return clock, client, self.dispatcher(clock, client, **kwargs)

    def stub(self, respond: Callable[[Seen], Any], clock: Optional[Clock] = None, **kwargs: Any) -> Tuple[Clock, Target, Dispatcher]:
        clock = clock or self.clock()
        target = Target(respond)
        client, _ = site_client(target, clock)
        return clock, target, self.dispatcher(clock, client, **kwargs)

    def delivery(self, id: str, url: str = "http://a.example/hook", clock: Optional[Clock] = None, **kwargs: Any) -> Delivery:
        kwargs.setdefault("created_at", clock.seconds() if clock is not None else T0)
        kwargs.setdefault("content_type", "application/json")
        return Delivery(id=id, url=url, body=kwargs.pop("body", b'{"n": 1}'), **kwargs)

    def submit(self, dispatcher: Dispatcher, *deliveries: Delivery) -> None:
        self.successResultOf(submit(dispatcher, deliveries))

    def get(self, dispatcher: Dispatcher, delivery_id: str) -> Delivery:
        delivery = self.successResultOf(dispatcher.store.get_delivery(delivery_id))
        self.assertIsNotNone(delivery, delivery_id)
        return delivery

    def all_deliveries(self, dispatcher: Dispatcher) -> List[Delivery]:
        return self.successResultOf(dispatcher.store.list_deliveries(None, 1000, None))


def always(code: int, headers: Sequence[Tuple[str, str]] = (), body: bytes = b"") -> Answer:
    return lambda sent: (code, tuple(headers), body)


# -- tests --------------------------------------------------------------------


class StoreInterfaceTests(TestCase):
    def test_memory_store_provides_istore(self) -> None:
        self.assertTrue(verifyObject(IStore, MemoryStore(Clock())))

    def test_later_store_provides_istore(self) -> None:
        clock = Clock()
        self.assertTrue(verifyObject(IStore, LaterStore(MemoryStore(clock), clock)))


class ScheduleTests(DispatcherTestCase):
    def attempt_times(self, rand: Callable[[], float], retries: Optional[int] = None) -> Tuple[List[float], Delivery]:
        clock = self.clock()
        # A breaker that never trips: this is about the schedule alone.
        hosts = HostGate(clock, threshold=1000)
        clock, client, dispatcher = self.fake(always(500), clock=clock, rand=rand, hosts=hosts)
        self.submit(dispatcher, self.delivery("D1", retries=retries))
        clock.pump([1.0] * 400)
        return [s.at - T0 for s in client.sent], self.get(dispatcher, "D1")

    def test_attempts_follow_the_schedule(self) -> None:
        times, delivery = self.attempt_times(NO_JITTER)
        self.assertEqual(times, [0.0, 10.0, 30.0, 70.0])
        self.assertEqual(delivery.status, FAILED)
        self.assertEqual([a.at - T0 for a in delivery.attempts], times)
        self.assertEqual([a.status_code for a in delivery.attempts], [500] * 4)
        self.assertEqual([a.error for a in delivery.attempts], ["HTTP 500"] * 4)
        self.assertIsNone(delivery.next_attempt_at)

    def test_jitter_from_rand(self) -> None:
        # rand() == 0: every wait is 20% shorter than the schedule's.
        times, _ = self.attempt_times(lambda: 0.0)
        self.assertEqual(times, [0.0, 8.0, 24.0, 56.0])

    def test_next_attempt_is_recorded_after_each_failure(self) -> None:
        clock, client, dispatcher = self.fake(always(502))
        self.submit(dispatcher, self.delivery("D1"))
        delivery = self.get(dispatcher, "D1")
        self.assertEqual((delivery.status, delivery.next_attempt_at), (SCHEDULED, T0 + 10))
        clock.advance(9.999)
        self.assertEqual(len(client.sent), 1)
        clock.advance(0.001)
        self.assertEqual(len(client.sent), 2)
        self.assertEqual(self.get(dispatcher, "D1").next_attempt_at, T0 + 10 + 20)

    def test_retries_override(self) -> None:
        for retries, expected in [
            (0, [0.0]),
            (1, [0.0, 10.0]),
            (2, [0.0, 10.0, 30.0]),
            # Past the schedule's end its last step repeats.
            (5, [0.0, 10.0, 30.0, 70.0, 110.0, 150.0]),
        ]:
            times, delivery = self.attempt_times(NO_JITTER, retries=retries)
            self.assertEqual(times, expected, retries)
            self.assertEqual(delivery.status, FAILED)
            self.assertEqual(len(delivery.attempts), retries + 1)

    def test_success_after_failures_stops_retrying(self) -> None:
        codes = iter([500, 503, 204])
        clock, client, dispatcher = self.fake(lambda sent: (next(codes), (), b""))
        self.submit(dispatcher, self.delivery("D1"))
        clock.pump([1.0] * 400)
        delivery = self.get(dispatcher, "D1")
        self.assertEqual(delivery.status, DELIVERED)
        self.assertEqual([a.status_code for a in delivery.attempts], [500, 503, 204])
        self.assertEqual(delivery.attempts[-1].error, None)
        self.assertEqual(len(client.sent), 3)

    def test_delay_is_respected(self) -> None:
        clock, client, dispatcher = self.fake()
        self.submit(dispatcher, self.delivery("D1", next_attempt_at=T0 + 42))
        clock.pump([1.0] * 41)
        self.assertEqual(client.sent, [])
        self.assertEqual(self.get(dispatcher, "D1").status, SCHEDULED)
        clock.pump([1.0])
        self.assertEqual([s.at for s in client.sent], [T0 + 42])


class OutcomeTests(DispatcherTestCase):
    def test_410_is_final(self) -> None:
        clock, client, dispatcher = self.fake(always(410))
        self.submit(dispatcher, self.delivery("D1", retries=10))
        clock.pump([600.0] * 200)
        delivery = self.get(dispatcher, "D1")
        self.assertEqual(delivery.status, FAILED)
        self.assertEqual(len(client.sent), 1)
        self.assertEqual([(a.status_code, a.error) for a in delivery.attempts], [(410, "HTTP 410")])

    def test_retry_after_seconds_on_503(self) -> None:
        clock, client, dispatcher = self.fake(lambda sent: (503, [("Retry-After", "600")], b"") if len(client.sent) == 1 else (200, (), b""))
        self.submit(dispatcher, self.delivery("D1"))
        self.assertEqual(self.get(dispatcher, "D1").next_attempt_at, T0 + 600)
        clock.pump([1.0] * 599)
        self.assertEqual(len(client.sent), 1)
        clock.pump([1.0])
        self.assertEqual([s.at for s in client.sent], [T0, T0 + 600])
        self.assertEqual(self.get(dispatcher, "D1").status, DELIVERED)

    def test_retry_after_http_date_on_429(self) -> None:
        later = email.utils.formatdate(T0 + 1800, usegmt=True)
        clock, client, dispatcher = self.fake(lambda sent: (429, [("retry-after", later)], b"") if len(client.sent) == 1 else (200, (), b""))
        self.submit(dispatcher, self.delivery("D1"))
        self.assertEqual(self.get(dispatcher, "D1").next_attempt_at, T0 + 1800)
        clock.pump([10.0] * 179)
        self.assertEqual(len(client.sent), 1)
        clock.pump([10.0])
        self.assertEqual(len(client.sent), 2)

    def test_retry_after_ignored_on_other_statuses(self) -> None:
        clock, client, dispatcher = self.fake(always(500, [("Retry-After", "3600")]))
        self.submit(dispatcher, self.delivery("D1"))
        self.assertEqual(self.get(dispatcher, "D1").next_attempt_at, T0 + SCHEDULE[0])

    def test_connection_errors_are_retried(self) -> None:
        clock, client, dispatcher = self.fake(lambda sent: neterror.ConnectionRefusedError())
        self.submit(dispatcher, self.delivery("D1", retries=1))
        clock.pump([1.0] * 20)
        delivery = self.get(dispatcher, "D1")
        self.assertEqual([(a.status_code, a.error) for a in delivery.attempts], [(None, "connection refused")] * 2)
        self.assertEqual(delivery.status, FAILED)

    def test_status_transitions(self) -> None:
        clock, client, dispatcher = self.fake(lambda sent: None)
        self.submit(dispatcher, self.delivery("D1", next_attempt_at=T0 + 5))
        self.assertEqual(self.get(dispatcher, "D1").status, SCHEDULED)
        clock.advance(5)
        delivering = self.get(dispatcher, "D1")
        self.assertEqual(delivering.status, DELIVERING)
        self.assertIsNotNone(delivering.claimed_until)
        self.assertGreater(delivering.claimed_until, clock.seconds())
        self.assertEqual(delivering.attempts, ())
        clock.advance(0.25)
        client.outstanding()[0].respond(500)
        retrying = self.get(dispatcher, "D1")
        self.assertEqual((retrying.status, retrying.next_attempt_at), (SCHEDULED, T0 + 5.25 + 10))
        self.assertEqual(retrying.attempts[0].duration_ms, 250)
        clock.advance(10)
        self.assertEqual(self.get(dispatcher, "D1").status, DELIVERING)
        client.outstanding()[0].respond(200)
        delivered = self.get(dispatcher, "D1")
        self.assertEqual(delivered.status, DELIVERED)
        self.assertIsNone(delivered.next_attempt_at)
        self.assertIsNone(delivered.claimed_until)
        self.assertEqual([a.status_code for a in delivered.attempts], [500, 200])
        self.assertEqual(dispatcher.in_flight, 0)


class RealClientTests(DispatcherTestCase):
    """The real ``HTTPClient``, served in memory."""

    def test_timeout_per_delivery(self) -> None:
        clock, target, dispatcher = self.stub(lambda seen: None, timeout=30.0)
        self.submit(dispatcher, self.delivery("SHORT", timeout=7.0), self.delivery("DEFAULT", url="http://b.example/hook"))
        self.assertEqual(len(target.seen), 2)
        clock.advance(6.999)
        self.assertEqual(self.get(dispatcher, "SHORT").status, DELIVERING)
        clock.advance(0.001)
        short = self.get(dispatcher, "SHORT")
        self.assertEqual(short.status, SCHEDULED)
        self.assertEqual([(a.status_code, a.error, a.duration_ms) for a in short.attempts], [(None, "timed out after 7s", 7000)])
        self.assertEqual(short.next_attempt_at, T0 + 7 + 10)
        self.assertEqual(self.get(dispatcher, "DEFAULT").status, DELIVERING)
        clock.advance(10)
        # The retry of SHORT was sent when due.
        self.assertEqual([s.host for s in target.seen], ["a.example", "b.example", "a.example"])
        clock.advance(6.999)
        self.assertEqual(len(self.get(dispatcher, "SHORT").attempts), 1)
        clock.advance(0.001)
        self.assertEqual([a.error for a in self.get(dispatcher, "SHORT").attempts], ["timed out after 7s"] * 2)
        clock.advance(5.999)
        self.assertEqual(self.get(dispatcher, "DEFAULT").attempts, ())
        clock.advance(0.001)
        default = self.get(dispatcher, "DEFAULT")
        self.assertEqual([(a.error, a.duration_ms) for a in default.attempts], [("timed out after 30s", 30000)])
        self.assertEqual(dispatcher.in_flight, 0)

    def test_timeout_is_passed_to_the_client(self) -> None:
        clock, client, dispatcher = self.fake(timeout=12.0)
        self.submit(dispatcher, self.delivery("A", timeout=3.5), self.delivery("B", url="http://b.example/"))
        self.assertEqual([s.timeout for s in client.sent], [3.5, 12.0])

    def test_redirects_are_failures_and_not_followed(self) -> None:
        def respond(seen: Seen) -> Any:
            if seen.path == "/landing":
                return (200, [], b"landed")
            code = {"/301": 301, "/302": 302, "/303": 303, "/307": 307, "/308": 308}[seen.path]
            return (code, [("Location", "http://a.example/landing")], b"")

        clock, target, dispatcher = self.stub(respond)
        codes = (301, 302, 303, 307, 308)
        self.submit(dispatcher, *[self.delivery(f"R{code}", url=f"http://a.example/{code}", retries=0) for code in codes])
        self.assertEqual([s.path for s in target.seen], [f"/{code}" for code in codes])
        for code in codes:
            delivery = self.get(dispatcher, f"R{code}")
            self.assertEqual(delivery.status, FAILED)
            self.assertEqual([(a.status_code, a.error) for a in delivery.attempts], [(code, f"HTTP {code}")])

    def test_request_shape(self) -> None:
        clock, target, dispatcher = self.stub(lambda seen: (200, [], b""))
        delivery = self.delivery(
            "D1",
            url="http://a.example/hook?x=1",
            body=b"\x00\x01binary",
            content_type="application/octet-stream",
            headers=(("X-Custom", "one"), ("X-Custom", "two"), ("Authorization", "Bearer t")),
        )
        self.submit(dispatcher, delivery)
        seen = target.seen[0]
        self.assertEqual((seen.method, seen.path, seen.body), ("POST", "/hook?x=1", b"\x00\x01binary"))
        self.assertEqual(seen.header("user-agent"), f"hookah/{__version__}")
        self.assertEqual(seen.headers["content-type"], ["application/octet-stream"])
        self.assertEqual(seen.headers["x-custom"], ["one", "two"])
        self.assertEqual(seen.header("authorization"), "Bearer t")
        self.assertIsNone(seen.header("webhook-signature"))

    def test_unencodable_url_fails_the_delivery_and_frees_its_slot(self) -> None:
        # A hostname that is no host (a snowman fails IDNA; /dispatch refuses
        # it, but a row stored before that rule may carry one) must be a
        # failed attempt, not an exception that leaks the dispatcher's slot,
        # and a final one: every retry would fail the same way.
        clock, target, dispatcher = self.stub(lambda seen: (200, [], b""))
        self.submit(dispatcher, self.delivery("BAD", url="http://\u2603\ufe0f.example/hook", retries=1))
        bad = self.get(dispatcher, "BAD")
        self.assertEqual(bad.status, FAILED)
        self.assertEqual(len(bad.attempts), 1)
        self.assertIsNone(bad.attempts[0].status_code)
        self.assertIn("cannot be sent", bad.attempts[0].error)
        self.assertEqual(dispatcher.in_flight, 0)
        clock.pump([60] * 10)
        self.assertEqual(len(self.get(dispatcher, "BAD").attempts), 1)
        self.assertEqual(target.seen, [])


class ReportTests(DispatcherTestCase):
    def test_errback_after_exhaustion(self) -> None:
        def answer(sent: Sent) -> Any:
            if sent.host == "errors.example":
                return (200, (), b"")
            # The target answers slowly (250 ms), so durations show.
            clock.callLater(0.25, sent.respond, 500, (), b"boom")
            return None

        clock = self.clock()
        clock, client, dispatcher = self.fake(answer, clock=clock)
        self.submit(dispatcher, self.delivery("D1", retries=1, errback="http://errors.example/report?k=v"))
        clock.pump([0.25] * 200)
        self.assertEqual(self.get(dispatcher, "D1").status, FAILED)
        reports = client.to("errors.example")
        self.assertEqual(len(reports), 1)
        report_request = reports[0]
        self.assertEqual(report_request.url, "http://errors.example/report?k=v")
        self.assertEqual(report_request.header("Content-Type"), "application/json")
        self.assertEqual(report_request.header("X-Hookah-Delivery-Id"), "D1")
        report = json.loads(report_request.body)
        self.assertEqual(report["id"], "D1")
        self.assertEqual(report["url"], "http://a.example/hook")
        self.assertEqual(report["status"], FAILED)
        self.assertIn("exhausted", report["reason"])
        self.assertEqual(
            [(a["status_code"], a["error"], a["duration_ms"]) for a in report["attempts"]],
            [(500, "HTTP 500", 250), (500, "HTTP 500", 250)],
        )
        self.assertEqual([a["at"] for a in report["attempts"]], [T0, T0 + 0.25 + 10])
        # The errback is a durable delivery of its own, linked to the original.
        errbacks = [d for d in self.all_deliveries(dispatcher) if d.kind == KIND_ERRBACK]
        self.assertEqual(len(errbacks), 1)
        self.assertEqual((errbacks[0].parent_id, errbacks[0].status), ("D1", DELIVERED))

    def test_errback_after_410_with_connection_errors(self) -> None:
        outcomes = iter([neterror.ConnectionRefusedError(), (410, (), b"")])
        clock, client, dispatcher = self.fake(lambda sent: (200, (), b"") if sent.host == "err.example" else next(outcomes))
        self.submit(dispatcher, self.delivery("D1", errback="http://err.example/"))
        clock.pump([1.0] * 30)
        report = json.loads(client.to("err.example")[0].body)
        self.assertIn("410", report["reason"])
        self.assertEqual(
            [(a["status_code"], a["error"]) for a in report["attempts"]],
            [(None, "connection refused"), (410, "HTTP 410")],
        )

    def test_no_errback_without_final_failure(self) -> None:
        clock, client, dispatcher = self.fake(lambda sent: (500, (), b"") if len(client.sent) == 1 else (200, (), b""))
        self.submit(dispatcher, self.delivery("D1", errback="http://err.example/"))
        clock.pump([1.0] * 100)
        self.assertEqual(self.get(dispatcher, "D1").status, DELIVERED)
        self.assertEqual(client.to("err.example"), [])
        self.assertEqual(len(self.all_deliveries(dispatcher)), 1)

    def test_failing_errback_does_not_create_another(self) -> None:
        clock, client, dispatcher = self.fake(always(500))
        self.submit(dispatcher, self.delivery("D1", retries=0, errback="http://err.example/"))
        clock.pump([1.0] * 400)
        deliveries = self.all_deliveries(dispatcher)
        self.assertEqual(len(deliveries), 2)
        errback = [d for d in deliveries if d.kind == KIND_ERRBACK][0]
        self.assertEqual(errback.status, FAILED)
        self.assertEqual(len(errback.attempts), len(SCHEDULE) + 1)
        self.assertIsNone(errback.errback)
        self.assertEqual(len(client.to("err.example")), len(SCHEDULE) + 1)

    def test_callback_after_2xx(self) -> None:
        answer_body = '{"ok": true, "name": "Zoë"}'.encode()

        def respond(seen: Seen) -> Any:
            if seen.host == "cb.example":
                return (200, [], b"")
            return (201, [("Content-Type", "application/vnd.thing+json; charset=utf-8"), ("X-Request-Id", "abc-123")], answer_body)

        clock, target, dispatcher = self.stub(respond)
        self.submit(dispatcher, self.delivery("D1", callback="http://cb.example/responses", errback="http://err.example/"))
        self.assertEqual(self.get(dispatcher, "D1").status, DELIVERED)
        [callback] = target.to("cb.example")
        self.assertEqual(callback.path, "/responses")
        self.assertEqual(callback.header("x-hookah-delivery-id"), "D1")
        self.assertEqual(callback.header("content-type"), "application/json")
        report = json.loads(callback.body)
        self.assertEqual(report["id"], "D1")
        self.assertEqual(report["url"], "http://a.example/hook")
        self.assertEqual(report["status_code"], 201)
        self.assertEqual(report["content_type"], "application/vnd.thing+json; charset=utf-8")
        self.assertEqual(report["body"].encode("utf-8"), answer_body)
        self.assertEqual(report["encoding"], "utf-8")
        self.assertIn(["X-Request-Id", "abc-123"], report["headers"])
        self.assertFalse(report["truncated"])
        callbacks = [d for d in self.all_deliveries(dispatcher) if d.kind == KIND_CALLBACK]
        self.assertEqual([(d.parent_id, d.status) for d in callbacks], [("D1", DELIVERED)])
        self.assertEqual(target.to("err.example"), [])

    def test_callback_with_a_binary_body(self) -> None:
        binary = bytes(range(256))

        def respond(seen: Seen) -> Any:
            if seen.host == "cb.example":
                return (200, [], b"")
            return (200, [("Content-Type", "image/png")], binary)

        clock, target, dispatcher = self.stub(respond)
        self.submit(dispatcher, self.delivery("D1", callback="http://cb.example/"))
        report = json.loads(target.to("cb.example")[0].body)
        self.assertEqual((report["encoding"], report["content_type"]), ("base64", "image/png"))
        self.assertEqual(base64.b64decode(report["body"]), binary)

    def test_no_callback_on_failure(self) -> None:
        clock, client, dispatcher = self.fake(always(500))
        self.submit(dispatcher, self.delivery("D1", retries=0, callback="http://cb.example/"))
        self.assertEqual(self.get(dispatcher, "D1").status, FAILED)
        self.assertEqual(client.to("cb.example"), [])
        self.assertEqual(len(self.all_deliveries(dispatcher)), 1)


@implementer(IDeliveryOutcomeListener)
class Listener:
    """An outcome listener that wants the finished deliveries ``wanted`` picks."""

    def __init__(self, wanted: Callable[[Delivery, Attempt], bool]) -> None:
        self.wanted = wanted
        self.asked: List[Tuple[str, Optional[int]]] = []
        self.told: List[Delivery] = []

    def wants(self, delivery: Delivery, attempt: Attempt) -> bool:
        self.asked.append((delivery.id, attempt.status_code))
        return self.wanted(delivery, attempt)

    def delivery_finished(self, delivery: Delivery) -> None:
        self.told.append(delivery)


class OutcomeListenerTests(DispatcherTestCase):
    def test_listeners_are_told_of_the_final_outcomes_they_want(self) -> None:
        # D1 is delivered, D2 answered 410 (final), D3 retried after a 500
        # (not final: no listener is asked), D4 answered 410 with an errback
        # (its report needs the finished record anyway).
        codes = {"/1": 200, "/2": 410, "/3": 500, "/4": 410}
        gone = Listener(lambda delivery, attempt: attempt.status_code == 410)
        nothing = Listener(lambda delivery, attempt: False)
        verifyObject(IDeliveryOutcomeListener, gone)
        clock, client, dispatcher = self.fake(
            lambda sent: (codes.get(sent.url[len("http://a.example"):], 200), (), b""), outcome_listeners=[gone, nothing],
        )
        self.submit(
            dispatcher,
            self.delivery("D1", "http://a.example/1"),
            self.delivery("D2", "http://a.example/2"),
            self.delivery("D3", "http://a.example/3", retries=1),
            self.delivery("D4", "http://a.example/4", errback="http://err.example/"),
        )
        clock.advance(0)
        # D4's errback report (delivered) is asked about too.
        asked = [("D1", 200), ("D2", 410), ("D4", 410), ("report", 200)]
        for listener in (gone, nothing):
            self.assertEqual(sorted((i if i.startswith("D") else "report", c) for i, c in listener.asked), asked)
        self.assertEqual(nothing.told, [])
        self.assertEqual(sorted((d.id, d.status, [a.status_code for a in d.attempts]) for d in gone.told), [
            ("D2", "failed", [410]), ("D4", "failed", [410]),
        ])
        # The 410s were stored before the listener heard of them.
        self.assertEqual(self.get(dispatcher, "D2").status, "failed")


class LifecycleTests(DispatcherTestCase):
    def stored(self, clock: Clock, *deliveries: Delivery) -> Any:
        store = self.make_store(clock)
        self.successResultOf(store.add_deliveries(list(deliveries)))
        return store

    def test_resume_on_start(self) -> None:
        clock = self.clock()
        store = self.stored(
            clock,
            self.delivery("OVERDUE", next_attempt_at=T0 - 100, url="http://a.example/1"),
            self.delivery("ABANDONED", status=DELIVERING, claimed_until=T0 - 1, url="http://a.example/2"),
            self.delivery("CLAIMED", status=DELIVERING, claimed_until=T0 + 50, url="http://a.example/3"),
            self.delivery("LATER", next_attempt_at=T0 + 20, url="http://a.example/4"),
            self.delivery("DONE", status=DELIVERED, url="http://a.example/5"),
        )
        clock, client, dispatcher = self.fake(clock=clock, store=store, start=False)
        dispatcher.startService()
        clock.advance(0)
        self.assertEqual([s.url for s in client.sent], ["http://a.example/1", "http://a.example/2"])
        clock.pump([1.0] * 20)
        self.assertEqual(client.sent[-1].url, "http://a.example/4")
        self.assertEqual(client.sent[-1].at, T0 + 20)
        clock.pump([1.0] * 30)
        self.assertEqual(client.sent[-1].url, "http://a.example/3")
        self.assertEqual(client.sent[-1].at, T0 + 50)
        self.assertEqual(len(client.sent), 4)
        for id in ("OVERDUE", "ABANDONED", "CLAIMED", "LATER"):
            self.assertEqual(self.get(dispatcher, id).status, DELIVERED, id)

    def test_release_claims_then_start_sends_at_once(self) -> None:
        clock = self.clock()
        store = self.stored(clock, self.delivery("CLAIMED", status=DELIVERING, claimed_until=T0 + 500, next_attempt_at=T0 - 5))
        self.assertEqual(self.successResultOf(store.release_claims(T0)), 1)
        released = self.successResultOf(store.get_delivery("CLAIMED"))
        self.assertEqual((released.status, released.claimed_until), (SCHEDULED, None))
        clock, client, dispatcher = self.fake(clock=clock, store=store, start=False)
        dispatcher.startService()
        clock.advance(0)
        self.assertEqual([s.at for s in client.sent], [T0])
        self.assertEqual(self.get(dispatcher, "CLAIMED").status, DELIVERED)

    def test_submitted_before_start_are_sent_after(self) -> None:
        clock, client, dispatcher = self.fake(start=False)
        self.submit(dispatcher, self.delivery("EARLY"))
        self.assertEqual(self.get(dispatcher, "EARLY").status, SCHEDULED)
        self.assertEqual(client.sent, [])
        dispatcher.startService()
        clock.advance(0)
        self.assertEqual(self.get(dispatcher, "EARLY").status, DELIVERED)

    def test_graceful_stop_waits_for_attempts_in_flight(self) -> None:
        clock, client, dispatcher = self.fake(lambda sent: None)
        self.submit(dispatcher, self.delivery("A"), self.delivery("B", url="http://b.example/"), self.delivery("LATER", next_attempt_at=T0 + 5))
        self.assertEqual(len(client.outstanding()), 2)
        stopped = dispatcher.stopService()
        self.assertNoResult(stopped)
        client.outstanding()[0].respond(200)
        self.assertNoResult(stopped)
        client.outstanding()[0].respond(500)
        self.successResultOf(stopped)
        self.assertEqual(self.get(dispatcher, "A").status, DELIVERED)
        b = self.get(dispatcher, "B")
        self.assertEqual((b.status, [a.status_code for a in b.attempts]), (SCHEDULED, [500]))
        # Stopped: nothing more is claimed, however long we wait.
        clock.pump([1.0] * 100)
        self.assertEqual(len(client.sent), 2)
        self.assertEqual(self.get(dispatcher, "LATER").status, SCHEDULED)

    def test_stop_puts_held_deliveries_back(self) -> None:
        clock = self.clock()
        clock, client, dispatcher = self.fake(lambda sent: None, clock=clock, hosts=HostGate(clock, limit=1))
        self.submit(dispatcher, self.delivery("FIRST"), self.delivery("HELD"))
        self.assertEqual(len(client.sent), 1)
        stopped = dispatcher.stopService()
        held = self.get(dispatcher, "HELD")
        self.assertEqual((held.status, held.attempts, held.claimed_until), (SCHEDULED, (), None))
        self.assertNoResult(stopped)
        client.outstanding()[0].respond(200)
        self.successResultOf(stopped)
        self.assertEqual(len(client.sent), 1)
        self.assertEqual(self.get(dispatcher, "FIRST").status, DELIVERED)


class SlowClaimStore(MemoryStore):
    """A MemoryStore whose claims answer only when the test says so (a slow disk)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.claims: List[Tuple[Deferred, Deferred]] = []
        self.closed = False

    def claim_due(self, now: float, limit: int, lease_until: float) -> Deferred:
        assert not self.closed, "claim after close"
        inner = super().claim_due(now, limit, lease_until)
        outer: Deferred = Deferred()
        self.claims.append((inner, outer))
        return outer

    def release(self) -> None:
        claims, self.claims = self.claims, []
        for inner, outer in claims:
            inner.chainDeferred(outer)

    def next_due(self) -> Deferred:
        assert not self.closed, "next_due after close"
        return super().next_due()


class StopDuringClaimTests(DispatcherTestCase):
    def test_stop_waits_for_a_claim_in_progress_and_hands_it_back(self) -> None:
        clock = self.clock()
        store = SlowClaimStore(clock)
        self.successResultOf(store.add_deliveries([self.delivery("DUE")]))
        clock, client, dispatcher = self.fake(clock=clock, store=self.make_store(clock, store))
        clock.advance(0)
        self.assertEqual(len(store.claims), 1)  # the claim is on its way
        stopped = dispatcher.stopService()
        self.assertNoResult(stopped)  # storage must stay open for it
        store.release()
        self.successResultOf(stopped)
        store.closed = True
        # Claimed after the stop began: not sent, and claimable again at once.
        self.assertEqual(client.sent, [])
        due = self.get(dispatcher, "DUE")
        self.assertEqual((due.status, due.claimed_until, due.attempts), (SCHEDULED, None, ()))
        clock.pump([1.0] * 10)
        self.assertEqual(client.sent, [])


class OutageStore(MemoryStore):
    """A MemoryStore whose claims fail with ``error`` while it is set."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.error: Optional[Exception] = None

    def claim_due(self, now: float, limit: int, lease_until: float) -> Deferred:
        if self.error is not None:
            return fail(self.error)
        return super().claim_due(now, limit, lease_until)


class OutageLogTests(DispatcherTestCase):
    def test_storage_unavailable_is_a_warning_line_per_poll_and_other_errors_keep_their_traceback(self) -> None:
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = self.clock()
        store = OutageStore(clock)
        self.successResultOf(store.add_deliveries([self.delivery("DUE")]))
        store.error = StorageUnavailable("PostgreSQL: the database system is starting up")
        clock, client, dispatcher = self.fake(clock=clock, store=self.make_store(clock, store))
        clock.pump([5.0] * 3)
        claims = [e for e in events if "claiming due deliveries failed" in e.get("log_format", "")]
        self.assertGreaterEqual(len(claims), 2)
        self.assertTrue(all(e["log_level"] == LogLevel.warn and "log_failure" not in e for e in claims))
        self.assertIn("storage unavailable (PostgreSQL: the database system is starting up)", formatEvent(claims[0]))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(client.sent, [])
        # A failure that is not an outage is a bug or a surprise: its traceback is kept.
        store.error = RuntimeError("unexpected")
        clock.pump([5.0] * 2)
        self.assertGreaterEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # Back: the delivery goes out.
        store.error = None
        clock.pump([5.0] * 2)
        self.assertEqual([s.url for s in client.sent], ["http://a.example/hook"])


class ClaimCountingStore(MemoryStore):
    """Counts claim queries."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.claims = 0

    def claim_due(self, now: float, limit: int, lease_until: float) -> Deferred:
        self.claims += 1
        return super().claim_due(now, limit, lease_until)


class LimitTests(DispatcherTestCase):
    def test_concurrency_cap(self) -> None:
        clock, client, dispatcher = self.fake(lambda sent: None, concurrency=3)
        self.submit(dispatcher, *[self.delivery(f"D{i:02}", url=f"http://h{i}.example/") for i in range(10)])
        clock.advance(0)
        self.assertEqual(len(client.outstanding()), 3)
        while client.outstanding():
            client.outstanding()[0].respond(200)
            clock.advance(0)
            self.assertLessEqual(len(client.outstanding()), 3)
        self.assertEqual(client.max_outstanding, 3)
        self.assertEqual(len(client.sent), 10)
        self.assertEqual({d.status for d in self.all_deliveries(dispatcher)}, {DELIVERED})

    def test_concurrency_cap_with_claims_from_storage(self) -> None:
        clock = self.clock()
        store = self.make_store(clock)
        self.successResultOf(store.add_deliveries([self.delivery(f"D{i:02}", url=f"http://h{i}.example/") for i in range(10)]))
        clock, client, dispatcher = self.fake(lambda sent: None, clock=clock, store=store, concurrency=4)
        clock.advance(0)
        self.assertEqual(len(client.outstanding()), 4)
        for _ in range(50):
            for sent in client.outstanding()[:2]:
                sent.respond(200)
            clock.advance(1)
        self.assertEqual(client.max_outstanding, 4)
        self.assertEqual(len(client.sent), 10)

    def test_a_steady_stream_does_not_poll_storage_per_delivery(self) -> None:
        # Webhooks submitted one after another, each answered at once: with
        # nothing waiting in storage, a finished attempt must not cost a
        # claim query (the first version polled after every attempt, so a
        # webhook took four store round trips instead of two).
        clock = self.clock()
        inner = ClaimCountingStore(clock)
        clock, client, dispatcher = self.fake(always(200), clock=clock, store=self.make_store(clock, inner))
        clock.advance(0)
        self.settle()
        polls_before = inner.claims
        for i in range(100):
            self.submit(dispatcher, self.delivery(f"S{i:03}", url=f"http://h{i % 7}.example/"))
            clock.advance(0.01)
            self.settle()
        self.assertEqual(len(client.sent), 100)
        self.assertEqual({d.status for d in self.all_deliveries(dispatcher)}, {DELIVERED})
        # The poll-interval safety net (5 s) still runs: one second, no poll.
        self.assertLessEqual(inner.claims - polls_before, 1)

    def test_a_retry_is_claimed_when_due_without_a_wake_up(self) -> None:
        # The dispatcher knows when the rows it stored come due: a retry
        # scheduled after a 500 is sent on time, though no poll ran since.
        answers = iter([500, 200])
        clock, client, dispatcher = self.fake(lambda sent: (next(answers), (), b""), poll_interval=3600.0)
        self.submit(dispatcher, self.delivery("R1"))
        clock.advance(0)
        self.settle()
        clock.advance(SCHEDULE[0])
        self.settle()
        clock.advance(0)
        self.settle()
        self.assertEqual([s.at for s in client.sent], [T0, T0 + SCHEDULE[0]])
        self.assertEqual(self.get(dispatcher, "R1").status, DELIVERED)

    def test_per_host_cap(self) -> None:
        clock = self.clock()
        clock, client, dispatcher = self.fake(
            lambda sent: (200, (), b"") if sent.host == "fast.example" else None,
            clock=clock,
            hosts=HostGate(clock, limit=2),
        )
        self.submit(dispatcher, *[self.delivery(f"S{i}", url="http://slow.example/") for i in range(6)])
        self.submit(dispatcher, *[self.delivery(f"F{i}", url="http://fast.example/") for i in range(3)])
        self.assertEqual(len(client.outstanding("slow.example")), 2)
        # The other host is not held up by the slow one's queue.
        self.assertEqual([s.at for s in client.to("fast.example")], [T0] * 3)
        for i in range(3):
            self.assertEqual(self.get(dispatcher, f"F{i}").status, DELIVERED)
        for _ in range(60):
            outstanding = client.outstanding("slow.example")
            if outstanding:
                outstanding[0].respond(200)
            clock.advance(0.5)
        self.assertEqual(client.max_per_host["slow.example"], 2)
        self.assertEqual(len(client.to("slow.example")), 6)
        for i in range(6):
            delivery = self.get(dispatcher, f"S{i}")
            # Deliveries held back by the cap are not charged an attempt.
            self.assertEqual((delivery.status, len(delivery.attempts)), (DELIVERED, 1), i)

    def test_circuit_breaker(self) -> None:
        clock = self.clock()

        def answer(sent: Sent) -> Any:
            if sent.host == "other.example":
                return (200, (), b"")
            return None  # dead.example: answered by hand below

        clock, client, dispatcher = self.fake(
            answer, clock=clock, schedule=(1000.0,), hosts=HostGate(clock, limit=16, threshold=3, window=0.0, first_pause=60.0, cooldown=60.0)
        )
        self.submit(dispatcher, *[self.delivery(f"X{i}", url="http://dead.example/") for i in range(3)])
        for sent in client.outstanding("dead.example"):
            sent.respond(503)
        self.assertIsNotNone(dispatcher.hosts.paused_until("http://dead.example:80"))
        # Paused: new deliveries to the host are not attempted ...
        clock.advance(1)
        self.submit(dispatcher, self.delivery("P1", url="http://dead.example/"), self.delivery("P2", url="http://dead.example/"))
        # ... while another host's are.
        self.submit(dispatcher, self.delivery("O1", url="http://other.example/"))
        self.assertEqual(self.get(dispatcher, "O1").status, DELIVERED)
        self.assertEqual(self.get(dispatcher, "P1").attempts, ())
        self.assertEqual(self.get(dispatcher, "P1").status, SCHEDULED)
        clock.pump([0.1] * 594)  # to T0 + 60.4
        self.assertEqual(len(client.to("dead.example")), 3)
        # After the cool-down: exactly one probe.
        clock.pump([0.1] * 20)
        probes = client.to("dead.example")[3:]
        self.assertEqual(len(probes), 1)
        self.assertGreaterEqual(probes[0].at, T0 + 60)
        clock.pump([0.1] * 20)
        self.assertEqual(len(client.to("dead.example")), 4)
        # The probe succeeds: the breaker closes and the rest go through.
        probes[0].respond(200)
        clock.pump([0.5] * 10)
        self.assertEqual(len(client.to("dead.example")), 5)
        client.outstanding("dead.example")[0].respond(200)
        self.assertEqual({self.get(dispatcher, id).status for id in ("P1", "P2")}, {DELIVERED})
        self.assertIsNone(dispatcher.hosts.paused_until("http://dead.example:80"))

    def test_failed_probe_pauses_again_for_longer(self) -> None:
        clock = self.clock()
        clock, client, dispatcher = self.fake(
            always(500), clock=clock, schedule=(5.0,), hosts=HostGate(clock, limit=16, threshold=2, window=0.0, first_pause=60.0, cooldown=960.0)
        )
        self.submit(dispatcher, self.delivery("A", retries=100), self.delivery("B", retries=100))
        self.assertEqual(len(client.sent), 2)
        clock.pump([1.0] * 59)
        self.assertEqual(len(client.sent), 2)
        clock.pump([1.0] * 3)
        self.assertEqual(len(client.sent), 3)  # one probe, which fails
        probe_at = client.sent[-1].at
        clock.pump([1.0] * 115)
        self.assertEqual(len(client.sent), 3)  # paused for 120 s now
        clock.pump([1.0] * 10)
        self.assertEqual(len(client.sent), 4)
        self.assertGreaterEqual(client.sent[-1].at, probe_at + 120)

    def test_hanging_host_does_not_delay_another(self) -> None:
        def respond(seen: Seen) -> Any:
            return None if seen.host == "hang.example" else (200, [], b"fine")

        clock, target, dispatcher = self.stub(respond, timeout=10.0)
        self.submit(dispatcher, *[self.delivery(f"H{i:02}", url="http://hang.example/") for i in range(20)])
        self.submit(dispatcher, *[self.delivery(f"OK{i}", url="http://ok.example/") for i in range(5)])
        clock.advance(0)
        for i in range(5):
            delivery = self.get(dispatcher, f"OK{i}")
            self.assertEqual(delivery.status, DELIVERED)
            self.assertEqual((delivery.attempts[0].at, delivery.attempts[0].duration_ms), (T0, 0))
        # Later deliveries to the good host are not held up either.
        clock.advance(3)
        self.submit(dispatcher, *[self.delivery(f"LATE{i}", url="http://ok.example/", clock=clock) for i in range(5)])
        for i in range(5):
            delivery = self.get(dispatcher, f"LATE{i}")
            self.assertEqual((delivery.status, delivery.attempts[0].at), (DELIVERED, T0 + 3))
        hanging = [self.get(dispatcher, f"H{i:02}") for i in range(20)]
        self.assertTrue(all(d.status in (DELIVERING, SCHEDULED) and not d.attempts for d in hanging))
        clock.advance(7)
        hanging = [self.get(dispatcher, f"H{i:02}") for i in range(20)]
        attempted = [d for d in hanging if d.attempts]
        self.assertGreater(len(attempted), 0)
        for d in attempted:
            self.assertEqual((d.attempts[0].error, d.attempts[0].duration_ms), ("timed out after 10s", 10000))
            self.assertNotEqual(d.status, DELIVERED)
        self.assertEqual(len(target.to("ok.example")), 10)


class LeaseTests(DispatcherTestCase):
    """One rule for a claim's lease: the attempt's own timeout plus the margin."""

    def test_a_long_timeout_delivery_is_attempted_once(self) -> None:
        # Two dispatchers on one store, as two nodes on one database: the
        # second must not take the delivery while the first's attempt, with
        # its own one-hour timeout, is still in flight.
        clock = self.clock()
        store = self.make_store(clock)
        self.successResultOf(store.add_deliveries([self.delivery("LONG", timeout=3600.0, next_attempt_at=T0)]))
        clock, first_client, first = self.fake(lambda sent: None, clock=clock, store=store, timeout=30.0)
        second_client = FakeClient(clock, lambda sent: (200, (), b"ok"))
        self.dispatcher(clock, second_client, store=store, timeout=30.0)
        clock.advance(0)
        self.assertEqual(len(first_client.sent) + len(second_client.sent), 1)
        attempt = (first_client.sent + second_client.sent)[0]
        self.assertEqual(attempt.timeout, 3600.0)
        self.assertGreaterEqual(self.get(first, "LONG").claimed_until, T0 + 3600)
        clock.pump([10.0] * 300)  # 50 minutes: well past a default claim
        self.assertEqual(len(first_client.sent) + len(second_client.sent), 1)
        attempt.respond(200)
        clock.pump([10.0] * 100)
        self.assertEqual(len(first_client.sent) + len(second_client.sent), 1)
        delivery = self.get(first, "LONG")
        self.assertEqual((delivery.status, len(delivery.attempts)), (DELIVERED, 1))

    def test_a_delivery_held_for_a_slot_is_covered_when_sent(self) -> None:
        # Held in memory behind a slow host's slot for longer than its claim
        # would last: the claim is renewed when it is finally sent.
        clock = self.clock()
        clock, client, dispatcher = self.fake(
            lambda sent: None, clock=clock, hosts=HostGate(clock, limit=1, max_waiting=4), timeout=30.0
        )
        self.submit(dispatcher, self.delivery("FIRST"), self.delivery("HELD"))
        self.assertEqual(len(client.sent), 1)
        clock.advance(70)  # the fake client never times out on its own
        client.sent[0].respond(200)
        self.assertEqual(len(client.sent), 2)
        held = self.get(dispatcher, "HELD")
        self.assertEqual(held.status, DELIVERING)
        self.assertGreaterEqual(held.claimed_until, T0 + 70 + 30)


class HoldingStore(MemoryStore):
    """
    A MemoryStore whose reschedules and outcomes can be held back, as a
    store that commits writes in groups may order its answers: done at once
    and answered only on ``release`` (``late_answers``), or done only then
    (``late_writes``: a write queued behind a slow commit).
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.late_answers: set = set()
        self.late_writes: set = set()
        self._held: List[Tuple[Callable[[], Deferred], Deferred]] = []

    def _hold(self, name: str, write: Callable[[], Deferred]) -> Deferred:
        if name in self.late_writes:
            later: Deferred = Deferred()
            self._held.append((write, later))
            return later
        done = write()
        if name in self.late_answers:
            answer: Deferred = Deferred()
            self._held.append((lambda: done, answer))
            return answer
        return done

    def held(self) -> int:
        return len(self._held)

    def release(self) -> None:
        """Do and answer what was held; hold nothing more."""
        self.late_answers.clear()
        self.late_writes.clear()
        held, self._held = self._held, []
        for write, answer in held:
            write().chainDeferred(answer)

    def finish_attempt(
        self, delivery_id: str, attempt: Any, status: str, next_attempt_at: Optional[float],
        follow_ups: Sequence[Delivery] = (), claim_token: Optional[str] = None,
    ) -> Deferred:
        base = super().finish_attempt
        return self._hold("finish_attempt", lambda: base(delivery_id, attempt, status, next_attempt_at, follow_ups, claim_token))

    def reschedule(
        self, delivery_id: str, next_attempt_at: float, deferred: Optional[str] = None, claim_token: Optional[str] = None
    ) -> Deferred:
        base = super().reschedule
        return self._hold("reschedule", lambda: base(delivery_id, next_attempt_at, deferred, claim_token))


class ClaimedAgainTests(DispatcherTestCase):
    """
    The store hands this dispatcher a new claim on a delivery it still holds
    (its lease ran out mid-attempt, or the answer to its hand-back arrived
    after the next claim): the delivery is attempted once, its outcome is
    recorded at once, and it is not left claimed with nobody attempting it.
    """

    LEASE = 30.0 + 60.0  # hookah.delivery.lease: the timeout plus the margin

    def test_attempts_that_outlive_their_claim_are_recorded_under_the_new_one(self) -> None:
        clock = self.clock()
        # One on the wire, one held for the host's only slot; neither
        # answered until both claims have run out and been claimed again.
        clock, client, dispatcher = self.fake(
            lambda sent: None, clock=clock, hosts=HostGate(clock, limit=1, max_waiting=4), timeout=30.0
        )
        self.submit(dispatcher, self.delivery("WIRE"), self.delivery("HELD"))
        self.assertEqual([s.url for s in client.sent], ["http://a.example/hook"])
        stale = {i: self.get(dispatcher, i).claim_token for i in ("WIRE", "HELD")}
        clock.pump([5.0] * 20)  # 100 s: past both leases, a poll every 5 s
        for delivery_id in ("WIRE", "HELD"):
            again = self.get(dispatcher, delivery_id)
            self.assertEqual(again.status, DELIVERING)
            self.assertNotEqual(again.claim_token, stale[delivery_id])  # claimed again, by this dispatcher
        self.assertEqual(len(client.sent), 1)
        client.sent[0].respond(200)
        self.settle()
        self.assertEqual(self.get(dispatcher, "WIRE").status, DELIVERED)
        self.assertEqual(len(client.sent), 2)
        client.sent[1].respond(200)
        self.settle()
        self.assertEqual(self.get(dispatcher, "HELD").status, DELIVERED)
        clock.pump([5.0] * 60)  # five minutes more: nothing is sent again
        self.assertEqual(len(client.sent), 2)
        for delivery_id in ("WIRE", "HELD"):
            self.assertEqual(len(self.get(dispatcher, delivery_id).attempts), 1)
        self.assertEqual((dispatcher.in_flight, dispatcher.claims(), dispatcher.metrics.registry.get_sample_value("hookah_claims_lost_total")), (0, [], 0.0))

    def test_a_hand_back_answered_after_the_next_claim(self) -> None:
        clock = self.clock()
        store = HoldingStore(clock)
        clock, client, dispatcher = self.fake(
            lambda sent: None if sent.url.endswith("/first") else (200, (), b""),
            clock=clock, store=self.make_store(clock, store), hosts=HostGate(clock, limit=1, max_waiting=0),
        )
        self.submit(dispatcher, self.delivery("FIRST", url="http://a.example/first"))
        # The host is busy: the second is put back (BUSY), and the answer
        # to that hand-back is held while the store claims it again.
        store.late_answers.add("reschedule")
        self.submit(dispatcher, self.delivery("SECOND", url="http://a.example/second"))
        clock.pump([0.1] * 10)
        self.assertGreaterEqual(store.held(), 1)
        client.sent[0].respond(200)
        clock.pump([0.1] * 10)
        self.assertEqual(self.get(dispatcher, "SECOND").status, DELIVERING)  # claimed again meanwhile
        store.release()
        clock.pump([0.1] * 10)
        second = self.get(dispatcher, "SECOND")
        self.assertEqual((second.status, len(second.attempts)), (DELIVERED, 1))
        clock.pump([5.0] * 60)
        self.assertEqual([s.url for s in client.sent], ["http://a.example/first", "http://a.example/second"])
        self.assertEqual((dispatcher.in_flight, dispatcher.claims()), (0, []))

    def test_an_outcome_written_after_the_claim_was_taken_again(self) -> None:
        clock = self.clock()
        store = HoldingStore(clock)
        clock, client, dispatcher = self.fake(always(200), clock=clock, store=self.make_store(clock, store), timeout=30.0)
        # The outcome's write waits behind a commit slower than the lease.
        store.late_writes.add("finish_attempt")
        self.submit(dispatcher, self.delivery("SLOW"))
        self.assertEqual(len(client.sent), 1)
        clock.pump([5.0] * 20)  # 100 s: the claim ran out and was taken again
        self.assertEqual(self.get(dispatcher, "SLOW").attempts, ())
        store.release()
        self.settle()
        slow = self.get(dispatcher, "SLOW")
        self.assertEqual((slow.status, len(slow.attempts)), (DELIVERED, 1))
        clock.pump([5.0] * 60)
        self.assertEqual(len(client.sent), 1)
        self.assertEqual((dispatcher.in_flight, dispatcher.claims(), dispatcher.metrics.registry.get_sample_value("hookah_claims_lost_total")), (0, [], 0.0))

    def test_an_outcome_answered_after_the_next_claim(self) -> None:
        clock = self.clock()
        store = HoldingStore(clock)
        answers = iter([500, 200])
        # A retry due at once (a zero back-off), claimed again by the next
        # poll before the answer to the outcome's write arrives.
        clock, client, dispatcher = self.fake(
            lambda sent: (next(answers), (), b""), clock=clock, store=self.make_store(clock, store), schedule=(0.0,)
        )
        store.late_answers.add("finish_attempt")
        self.submit(dispatcher, self.delivery("RETRY"))
        clock.pump([5.0] * 2)  # a poll
        retry = self.get(dispatcher, "RETRY")
        self.assertEqual((retry.status, len(retry.attempts)), (DELIVERING, 1))
        self.assertEqual(len(client.sent), 1)
        store.release()
        clock.pump([0.1] * 10)
        retry = self.get(dispatcher, "RETRY")
        self.assertEqual([a.status_code for a in retry.attempts], [500, 200])
        self.assertEqual(retry.status, DELIVERED)
        self.assertEqual(len(client.sent), 2)
        self.assertEqual((dispatcher.in_flight, dispatcher.claims()), (0, []))


class SigningTests(DispatcherTestCase):
    def test_dispatch_deliveries_are_signed(self) -> None:
        now = float(int(time.time()))  # the reference verifier checks the timestamp against real time
        clock = self.clock(now)
        clock, target, dispatcher = self.stub(lambda seen: (200, [], b""), clock=clock, signer=Signer([WHSEC]))
        body = b'{"event": "signed"}'
        self.submit(dispatcher, self.delivery("SIGNED", body=body, clock=clock))
        seen = target.seen[0]
        self.assertEqual(seen.header("webhook-id"), "SIGNED")
        self.assertEqual(seen.header("webhook-timestamp"), str(int(now)))
        headers = {name: seen.header(name) for name in ("webhook-id", "webhook-timestamp", "webhook-signature")}
        self.assertEqual(Webhook(WHSEC).verify(seen.body, headers), {"event": "signed"})

    def test_only_dispatch_kind_is_signed(self) -> None:
        clock, client, dispatcher = self.fake(signer=Signer([WHSEC]))
        kinds = (KIND_DISPATCH, KIND_ERRBACK, KIND_CALLBACK, KIND_WEBSUB)
        self.submit(dispatcher, *[self.delivery(kind, kind=kind, url=f"http://{kind}.example/") for kind in kinds])
        signed = {s.host.split(".")[0]: s.header("webhook-signature") is not None for s in client.sent}
        self.assertEqual(signed, {KIND_DISPATCH: True, KIND_ERRBACK: False, KIND_CALLBACK: False, KIND_WEBSUB: False})
        for sent in client.sent:
            present = {s for s in ("webhook-id", "webhook-timestamp") if sent.header(s) is not None}
            self.assertEqual(bool(present), sent.host.startswith(KIND_DISPATCH))

    def test_no_signer_no_signature(self) -> None:
        clock, client, dispatcher = self.fake()
        self.submit(dispatcher, self.delivery("D1"))
        self.assertEqual([n for n, _ in client.sent[0].headers if n.lower().startswith("webhook-")], [])

    def test_each_attempt_is_signed_at_its_own_time(self) -> None:
        clock, client, dispatcher = self.fake(always(500), signer=Signer([WHSEC]))
        self.submit(dispatcher, self.delivery("D1", retries=1))
        clock.pump([1.0] * 15)
        self.assertEqual([s.header("webhook-timestamp") for s in client.sent], [str(int(T0)), str(int(T0 + 10))])
        self.assertEqual({s.header("webhook-id") for s in client.sent}, {"D1"})


run_on(globals(), LaterFlavour, SQLiteFlavour)
