"""
The stores a unit-test suite runs on, so that it sees what production sees.

``MemoryStore`` answers every call at once: its Deferreds have fired before
the call returns. Production stores answer later (SQLite from its writer
thread, through ``callFromThread``), and code that reads state, or starts
work, between a store call and its answer behaves differently there. A
suite written against ``MemoryStore`` alone never sees that.

So a test class takes ``MemoryFlavour`` as a base and builds its clocks and
stores through it (``make_clock``, ``make_store``); ``run_on(globals(), ...)``
at the end of the module adds a copy of each such class per other flavour:

- ``LaterFlavour``: a ``LaterStore`` over ``MemoryStore``, whose every
  Deferred fires on a later tick of the test's ``Clock`` (``callLater(0)``),
  after whatever the caller does next; time itself does not move.
- ``SQLiteFlavour``: the real ``SQLiteStore`` (an in-memory database, its
  own writer thread), whose ``reactor`` is a ``ThreadedClock``: a ``Clock``
  that also receives the worker's ``callFromThread`` calls and, whenever it
  runs timers, waits for the store's outstanding answers and runs them, as
  the real reactor would before any time passes.

In every flavour ``successResultOf``, ``failureResultOf`` and
``assertNoResult`` first let the store answer what it was asked (advance
the clocks by zero), so a test reads the state the store has reached, and
"no result yet" means the code under test is still waiting for something
else.
"""

from __future__ import annotations

import queue
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from hookah.storage.interface import IStore
from hookah.storage.memory import MemoryStore
from hookah.storage.sqlite.store import SQLiteStore

__all__ = ["LaterStore", "ThreadedClock", "MemoryFlavour", "LaterFlavour", "SQLiteFlavour", "run_on"]

# Seconds of real time the SQLite worker may take to answer before the
# test fails as hung (it answers in milliseconds; this only bounds a bug).
WORKER_TIMEOUT = 60.0


class _Delegate:
    """
    ``IStore`` by delegation: every method of the interface calls the same
    method of ``inner`` and hands its outcome to ``_answer``. The methods are
    written out below (not generated) so that ``verifyObject`` checks each
    one's signature against the interface.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Deferred:
        # Looked up at call time: a test may replace a method of the inner store.
        return self._answer(maybeDeferred(getattr(self.inner, name), *args, **kwargs))

    def _answer(self, d: Deferred) -> Deferred:
        raise NotImplementedError

    def open(self) -> Deferred:
        return self._call("open")

    def close(self) -> Deferred:
        return self._call("close")

    def ping(self) -> Deferred:
        return self._call("ping")

    def add_deliveries(self, deliveries: Any) -> Deferred:
        return self._call("add_deliveries", deliveries)

    def get_delivery(self, delivery_id: Any) -> Deferred:
        return self._call("get_delivery", delivery_id)

    def list_deliveries(self, status: Any, limit: Any, after: Any) -> Deferred:
        return self._call("list_deliveries", status, limit, after)

    def claim_due(self, now: Any, limit: Any, lease_until: Any) -> Deferred:
        return self._call("claim_due", now, limit, lease_until)

    def finish_attempt(
        self, delivery_id: Any, attempt: Any, status: Any, next_attempt_at: Any, follow_ups: Any = (), claim_token: Any = None
    ) -> Deferred:
        return self._call("finish_attempt", delivery_id, attempt, status, next_attempt_at, follow_ups, claim_token=claim_token)

    def release_claims(self, now: Any) -> Deferred:
        return self._call("release_claims", now)

    def renew_claims(self, claims: Any, now: Any, lease_until: Any) -> Deferred:
        return self._call("renew_claims", claims, now, lease_until)

    def renew_claim(self, delivery_id: Any, claimed_until: Any) -> Deferred:
        return self._call("renew_claim", delivery_id, claimed_until)

    def reschedule(self, delivery_id: Any, next_attempt_at: Any, deferred: Any = None, claim_token: Any = None) -> Deferred:
        return self._call("reschedule", delivery_id, next_attempt_at, deferred, claim_token=claim_token)

    def requeue(self, delivery_id: Any, now: Any) -> Deferred:
        return self._call("requeue", delivery_id, now)

    def next_due(self) -> Deferred:
        return self._call("next_due")

    def cancel_deliveries(self, topic: Any, callback: Any, reason: Any) -> Deferred:
        return self._call("cancel_deliveries", topic, callback, reason)

    def count_deliveries(self) -> Deferred:
        return self._call("count_deliveries")

    def purge_finished(self, before: Any, *limit: Any) -> Deferred:
        return self._call("purge_finished", before, *limit)

    def add_event(self, event: Any, deliveries: Any, keep_count: Any, keep_after: Any) -> Deferred:
        return self._call("add_event", event, deliveries, keep_count, keep_after)

    def get_event(self, event_id: Any) -> Deferred:
        return self._call("get_event", event_id)

    def find_idempotency_key(self, key: Any, since: Any) -> Deferred:
        return self._call("find_idempotency_key", key, since)

    def purge_idempotency_keys(self, before: Any, *limit: Any) -> Deferred:
        return self._call("purge_idempotency_keys", before, *limit)

    def events_after(self, topics: Any, after: Any, limit: Any) -> Deferred:
        return self._call("events_after", topics, after, limit)

    def last_events(self, topics: Any, count: Any) -> Deferred:
        return self._call("last_events", topics, count)

    def events_page(self, topics: Any, after: Any, limit: Any, max_bytes: Any) -> Deferred:
        return self._call("events_page", topics, after, limit, max_bytes)

    def resume_page(self, topics: Any, after: Any, limit: Any, max_bytes: Any) -> Deferred:
        return self._call("resume_page", topics, after, limit, max_bytes)

    def replay_cursor(self, topics: Any, count: Any) -> Deferred:
        return self._call("replay_cursor", topics, count)

    def list_topics(self) -> Deferred:
        return self._call("list_topics")

    def trim_events(self, before: Any, *limit: Any) -> Deferred:
        return self._call("trim_events", before, *limit)

    def put_subscription(self, subscription: Any) -> Deferred:
        return self._call("put_subscription", subscription)

    def get_subscription(self, topic: Any, callback: Any) -> Deferred:
        return self._call("get_subscription", topic, callback)

    def remove_subscription(self, topic: Any, callback: Any, cancel_reason: Any = None) -> Deferred:
        return self._call("remove_subscription", topic, callback, cancel_reason)

    def list_subscriptions(self, topic: Any) -> Deferred:
        return self._call("list_subscriptions", topic)

    def active_subscriptions(self, topic: Any, now: Any) -> Deferred:
        return self._call("active_subscriptions", topic, now)

    def purge_expired(self, now: Any) -> Deferred:
        return self._call("purge_expired", now)


@implementer(IStore)
class LaterStore(_Delegate):
    """
    ``inner``'s answers, each delivered on a later tick of ``clock``: the
    work is done when asked (as a single-writer store queues it in order),
    the answer arrives after the caller has moved on.
    """

    def __init__(self, inner: Any, clock: Clock) -> None:
        super().__init__(inner)
        self.clock = clock

    def _answer(self, d: Deferred) -> Deferred:
        later: Deferred = Deferred()

        def fire(result: Any) -> None:
            if isinstance(result, Failure):
                later.errback(result)
            else:
                later.callback(result)

        def answered(result: Any) -> None:
            self.clock.callLater(0, fire, result)

        d.addBoth(answered)
        return later


class ThreadedClock(Clock):
    """
    A ``Clock`` that can be a threaded store's reactor: ``callFromThread``
    queues the call, and ``advance`` runs it as soon as nothing else is due,
    waiting for the store while it owes answers (``owed``), then runs what
    those answers made due, until neither is left.
    """

    def __init__(self) -> None:
        super().__init__()
        self._from_threads: queue.Queue[Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]] = queue.Queue()
        self.owed = 0

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._from_threads.put((f, args, kwargs))

    def advance(self, amount: float) -> None:
        super().advance(amount)
        while self._run_from_threads():
            super().advance(0)

    def _run_from_threads(self) -> bool:
        ran = False
        while self.owed > 0 or not self._from_threads.empty():
            try:
                f, args, kwargs = self._from_threads.get(timeout=WORKER_TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"the store owes {self.owed} answers and gave none for {WORKER_TIMEOUT:g}s")
            f(*args, **kwargs)
            ran = True
        return ran


@implementer(IStore)
class OwingStore(_Delegate):
    """``inner``'s answers as they come, counted on ``clock.owed`` until they do."""

    def __init__(self, inner: Any, clock: ThreadedClock) -> None:
        super().__init__(inner)
        self.clock = clock

    def _answer(self, d: Deferred) -> Deferred:
        if d.called:
            return d
        self.clock.owed += 1

        def paid(result: Any) -> Any:
            self.clock.owed -= 1
            return result

        return d.addBoth(paid)


class MemoryFlavour:
    """
    Mixin for a trial test case (before ``TestCase`` in its bases): clocks
    and stores come from here. This flavour is ``MemoryStore`` on a plain
    ``Clock``, answering at once, as the suites were written.
    """

    flavour = "memory"
    _flavour_clocks: List[Clock]

    def make_clock(self) -> Clock:
        clock = Clock()
        self._flavour_clocks_list().append(clock)
        return clock

    def make_store(self, clock: Clock, inner: Optional[Any] = None) -> Any:
        """
        The store of this flavour on ``clock``. ``inner``: a ``MemoryStore``
        (subclass) a test needs for what it counts or holds back; flavours
        that can wrap it do.
        """
        self._adopt(clock)
        return inner if inner is not None else MemoryStore(clock)

    def settle(self) -> None:
        """Let the store answer what it has been asked (time does not move)."""
        for clock in self._flavour_clocks_list():
            clock.advance(0)

    def _flavour_clocks_list(self) -> List[Clock]:
        if "_flavour_clocks" not in self.__dict__:
            self._flavour_clocks = []
        return self._flavour_clocks

    def _adopt(self, clock: Clock) -> None:
        clocks = self._flavour_clocks_list()
        if clock not in clocks:
            clocks.append(clock)

    def successResultOf(self, deferred: Any) -> Any:
        self.settle()
        return super().successResultOf(deferred)  # type: ignore[misc]

    def failureResultOf(self, deferred: Any, *expected: Any) -> Any:
        self.settle()
        return super().failureResultOf(deferred, *expected)  # type: ignore[misc]

    def assertNoResult(self, deferred: Any) -> None:
        self.settle()
        super().assertNoResult(deferred)  # type: ignore[misc]


class LaterFlavour(MemoryFlavour):
    """``MemoryStore`` (or the test's own) behind a ``LaterStore``: answers on a later tick."""

    flavour = "later"

    def make_store(self, clock: Clock, inner: Optional[Any] = None) -> Any:
        self._adopt(clock)
        return LaterStore(inner if inner is not None else MemoryStore(clock), clock)


class SQLiteFlavour(MemoryFlavour):
    """
    The real ``SQLiteStore`` (an in-memory database on its own worker
    thread) on a ``ThreadedClock``. A test that brings its own ``inner``
    store gets it behind a ``LaterStore``: what it holds back is
    ``MemoryStore`` behaviour, not SQLite's.
    """

    flavour = "sqlite"

    def make_clock(self) -> Clock:
        clock = ThreadedClock()
        self._adopt(clock)
        return clock

    def make_store(self, clock: Clock, inner: Optional[Any] = None) -> Any:
        self._adopt(clock)
        if inner is not None:
            return LaterStore(inner, clock)
        if not isinstance(clock, ThreadedClock):
            raise TypeError("SQLiteFlavour needs a clock from make_clock()")
        store = OwingStore(SQLiteStore(":memory:", clock, synchronous="NORMAL"), clock)
        super().successResultOf(self._settled(store.open()))  # type: ignore[misc]
        self.addCleanup(lambda: super(SQLiteFlavour, self).successResultOf(self._settled(store.close())))  # type: ignore[attr-defined,misc]
        return store

    def _settled(self, d: Deferred) -> Deferred:
        self.settle()
        return d


def run_on(namespace: Dict[str, Any], *flavours: type[MemoryFlavour]) -> None:
    """
    Add to a test module (its ``globals()``) a copy of each of its test
    classes built on ``MemoryFlavour``, per flavour: ``HubTests`` gains
    ``HubTests_later`` (its clocks and stores from ``LaterFlavour``).
    """
    module = namespace["__name__"]
    for name, cls in list(namespace.items()):
        if not (isinstance(cls, type) and issubclass(cls, MemoryFlavour) and cls.__module__ == module):
            continue
        if cls.flavour != MemoryFlavour.flavour or not any(attr.startswith("test") for attr in dir(cls)):
            continue
        for flavour in flavours:
            copy = type(f"{name}_{flavour.flavour}", (flavour, cls), {"__module__": module, "__qualname__": f"{name}_{flavour.flavour}"})
            namespace[copy.__name__] = copy
