"""
``MemoryStore``: ``IStore`` in process memory, for tests and ``--storage memory:``.

Nothing survives a restart, so a ``202`` from a memory-backed Hookah promises
delivery only while the process lives. Lookups that the dispatcher does per
delivery use a heap, so cost stays flat as the queue grows; so do the
retention purges (a heap of finished deliveries by last activity, one of
events by creation, one of idempotency keys by creation) and WebSub
cancellation (scheduled notifications indexed by (topic, callback)).

Idempotency keys live in a structure of their own (key -> (created_at, id)
entries), written with the delivery or event that carries the key and
forgotten only by age (``purge_idempotency_keys``), never when that record
is trimmed or purged.
"""

from __future__ import annotations

import heapq
import uuid
from bisect import bisect_left, bisect_right, insort
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import attr
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from hookah.model import (
    CANCELLED_EXPIRED,
    DELIVERED,
    DELIVERING,
    FAILED,
    HOST_PAUSED,
    KIND_WEBSUB,
    SCHEDULED,
    STATUSES,
    Attempt,
    Delivery,
    Event,
    Subscription,
)
from hookah import defaults
from hookah.storage.interface import ClaimLost, IStore


@implementer(IStore)
class MemoryStore:
    def __init__(self, reactor: Any) -> None:
        self._clock = reactor
        self._deliveries: Dict[str, Delivery] = {}
        self._ids: List[str] = []
        # (time, id) of every claimable moment; stale entries are skipped lazily.
        self._due: List[Tuple[float, str]] = []
        self._events: Dict[str, Event] = {}
        self._topic_events: Dict[str, List[str]] = {}
        self._subscriptions: Dict[Tuple[str, str], Subscription] = {}
        self._topic_subscribers: Dict[str, Dict[str, Subscription]] = {}
        # Scheduled WebSub notifications by (topic, callback), for cancellation.
        self._queued_notifications: Dict[Tuple[str, str], Set[str]] = {}
        # (last activity, id) of finished deliveries and (created_at, id) of
        # events, for retention; stale entries are skipped lazily.
        self._finished: List[Tuple[float, str]] = []
        self._event_times: List[Tuple[float, str]] = []
        # Idempotency keys: key -> sorted (created_at, id) of the records
        # created with it, and (created_at, key, id) by age for the purge.
        self._keys: Dict[str, List[Tuple[float, str]]] = {}
        self._key_times: List[Tuple[float, str, str]] = []

    def open(self) -> Deferred:
        return succeed(None)

    def close(self) -> Deferred:
        return succeed(None)

    def ping(self) -> Deferred:
        return succeed(None)

    # -- deliveries ---------------------------------------------------------

    def _put(self, delivery: Delivery) -> None:
        self._deliveries[delivery.id] = delivery
        when = self._claimable_at(delivery)
        if when is not None:
            heapq.heappush(self._due, (when, delivery.id))
        if delivery.status in (DELIVERED, FAILED):
            heapq.heappush(self._finished, (_last_activity(delivery), delivery.id))
        if delivery.kind == KIND_WEBSUB and delivery.topic is not None:
            key = (delivery.topic, delivery.url)
            if delivery.status == SCHEDULED:
                self._queued_notifications.setdefault(key, set()).add(delivery.id)
            else:
                queued = self._queued_notifications.get(key)
                if queued is not None:
                    queued.discard(delivery.id)
                    if not queued:
                        del self._queued_notifications[key]

    @staticmethod
    def _claimable_at(delivery: Delivery) -> Optional[float]:
        if delivery.status == SCHEDULED:
            return delivery.next_attempt_at if delivery.next_attempt_at is not None else 0.0
        if delivery.status == DELIVERING and delivery.claimed_until is not None:
            return delivery.claimed_until
        return None

    def _duplicates(self, deliveries: Sequence[Delivery]) -> bool:
        ids = [d.id for d in deliveries]
        return len(set(ids)) != len(ids) or any(i in self._deliveries for i in ids)

    def add_deliveries(self, deliveries: Sequence[Delivery]) -> Deferred:
        if self._duplicates(deliveries):
            return fail(ValueError("duplicate delivery id"))
        for delivery in deliveries:
            insort(self._ids, delivery.id)
            self._put(delivery)
            if delivery.idempotency_key is not None:
                self._remember_key(delivery.idempotency_key, delivery.id, delivery.created_at)
        return succeed(None)

    def get_delivery(self, delivery_id: str) -> Deferred:
        return succeed(self._deliveries.get(delivery_id))

    def list_deliveries(self, status: Optional[str], limit: int, after: Optional[str]) -> Deferred:
        start = bisect_right(self._ids, after) if after is not None else 0
        page: List[Delivery] = []
        for delivery_id in self._ids[start:]:
            delivery = self._deliveries[delivery_id]
            if status is None or delivery.status == status:
                page.append(delivery)
                if len(page) >= limit:
                    break
        return succeed(page)

    def _pop_due(self, now: float) -> Optional[Delivery]:
        while self._due and self._due[0][0] <= now:
            when, delivery_id = heapq.heappop(self._due)
            delivery = self._deliveries.get(delivery_id)
            if delivery is not None and self._claimable_at(delivery) == when:
                return delivery
        return None

    def claim_due(self, now: float, limit: int, lease_until: float) -> Deferred:
        claimed: List[Delivery] = []
        while len(claimed) < limit:
            delivery = self._pop_due(now)
            if delivery is None:
                break
            delivery = attr.evolve(
                delivery, status=DELIVERING, claimed_until=lease_until, claim_token=uuid.uuid4().hex
            )
            self._put(delivery)
            claimed.append(delivery)
        return succeed(claimed)

    def finish_attempt(
        self,
        delivery_id: str,
        attempt: Attempt,
        status: str,
        next_attempt_at: Optional[float],
        follow_ups: Sequence[Delivery] = (),
        claim_token: Optional[str] = None,
    ) -> Deferred:
        delivery = self._deliveries.get(delivery_id)
        if delivery is None:
            return fail(KeyError(delivery_id))
        if claim_token is not None and not self._holds(delivery, claim_token):
            return fail(ClaimLost(delivery_id))
        if follow_ups:
            if self._duplicates(follow_ups):
                return fail(ValueError("duplicate delivery id"))
            self.add_deliveries(follow_ups)
        self._put(
            attr.evolve(
                delivery,
                attempts=delivery.attempts + (attempt,),
                status=status,
                next_attempt_at=next_attempt_at,
                claimed_until=None,
                deferred=None,
                claim_token=None,
            )
        )
        return succeed(None)

    @staticmethod
    def _holds(delivery: Delivery, claim_token: str) -> bool:
        return delivery.status == DELIVERING and delivery.claim_token == claim_token

    def renew_claims(self, claims: Sequence[Tuple[str, str]], now: float, lease_until: float) -> Deferred:
        lost: List[str] = []
        for delivery_id, token in claims:
            delivery = self._deliveries.get(delivery_id)
            if delivery is None or not self._holds(delivery, token):
                lost.append(delivery_id)
            else:
                self._put(attr.evolve(delivery, claimed_until=lease_until))
        return succeed(lost)

    def release_claims(self, now: float) -> Deferred:
        claimed = [d for d in self._deliveries.values() if d.status == DELIVERING]
        for delivery in claimed:
            self._put(attr.evolve(delivery, status=SCHEDULED, claimed_until=None, claim_token=None))
        paused = [
            d for d in self._deliveries.values()
            if d.status == SCHEDULED and d.deferred == HOST_PAUSED and d.next_attempt_at is not None and d.next_attempt_at > now
        ]
        for delivery in paused:
            self._put(attr.evolve(delivery, next_attempt_at=now))
        return succeed(len(claimed) + len(paused))

    def renew_claim(self, delivery_id: str, claimed_until: float) -> Deferred:
        delivery = self._deliveries.get(delivery_id)
        if delivery is not None and delivery.status == DELIVERING:
            self._put(attr.evolve(delivery, claimed_until=claimed_until))
        return succeed(None)

    def reschedule(
        self, delivery_id: str, next_attempt_at: float, deferred: Optional[str] = None, claim_token: Optional[str] = None
    ) -> Deferred:
        delivery = self._deliveries.get(delivery_id)
        if delivery is not None and delivery.status == DELIVERING and (
            claim_token is None or delivery.claim_token == claim_token
        ):
            self._put(
                attr.evolve(
                    delivery, status=SCHEDULED, next_attempt_at=next_attempt_at, claimed_until=None,
                    deferred=deferred,
                    claim_token=None,
                )
            )
        return succeed(None)

    def requeue(self, delivery_id: str, now: float) -> Deferred:
        delivery = self._deliveries.get(delivery_id)
        if delivery is None or delivery.status not in (DELIVERED, FAILED):
            return succeed(None)
        delivery = attr.evolve(
            delivery,
            status=SCHEDULED,
            next_attempt_at=now,
            retry_from=len(delivery.attempts),
            claimed_until=None,
            deferred=None,
        )
        self._put(delivery)
        return succeed(delivery)

    def next_due(self) -> Deferred:
        while self._due:
            when, delivery_id = self._due[0]
            delivery = self._deliveries.get(delivery_id)
            if delivery is not None and self._claimable_at(delivery) == when:
                return succeed(when)
            heapq.heappop(self._due)
        return succeed(None)

    def cancel_deliveries(self, topic: str, callback: str, reason: str) -> Deferred:
        queued = sorted(self._queued_notifications.get((topic, callback), ()))
        cancelled = Attempt(at=self._clock.seconds(), status_code=None, error=reason, duration_ms=0)
        for delivery_id in queued:
            delivery = self._deliveries[delivery_id]
            self._put(
                attr.evolve(
                    delivery,
                    status=FAILED,
                    next_attempt_at=None,
                    claimed_until=None,
                    attempts=delivery.attempts + (cancelled,),
                )
            )
        return succeed(len(queued))

    def purge_finished(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred:
        doomed: Set[str] = set()
        while self._finished and len(doomed) < limit and self._finished[0][0] < before:
            when, delivery_id = heapq.heappop(self._finished)
            delivery = self._deliveries.get(delivery_id)
            if (
                delivery is not None
                and delivery.status in (DELIVERED, FAILED)
                and _last_activity(delivery) == when
            ):
                del self._deliveries[delivery_id]
                doomed.add(delivery_id)
        if doomed:
            self._ids = [i for i in self._ids if i not in doomed]
        return succeed(len(doomed))

    def count_deliveries(self) -> Deferred:
        counts = dict.fromkeys(STATUSES, 0)
        for delivery in self._deliveries.values():
            counts[delivery.status] += 1
        return succeed(counts)

    def _remember_key(self, key: str, record_id: str, created_at: float) -> None:
        entries = self._keys.setdefault(key, [])
        entry = (created_at, record_id)
        if entry not in entries:
            insort(entries, entry)
            heapq.heappush(self._key_times, (created_at, key, record_id))

    def find_idempotency_key(self, key: str, since: Optional[float]) -> Deferred:
        entries = self._keys.get(key, [])
        start = 0 if since is None else bisect_left(entries, (since,))
        return succeed(entries[start][1] if start < len(entries) else None)

    def purge_idempotency_keys(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred:
        count = 0
        while self._key_times and count < limit and self._key_times[0][0] < before:
            created_at, key, record_id = heapq.heappop(self._key_times)
            entries = self._keys.get(key)
            if entries is not None and (created_at, record_id) in entries:
                entries.remove((created_at, record_id))
                if not entries:
                    del self._keys[key]
                count += 1
        return succeed(count)

    # -- events ---------------------------------------------------------------

    def add_event(
        self, event: Event, deliveries: Sequence[Delivery], keep_count: int, keep_after: float
    ) -> Deferred:
        if event.id in self._events or self._duplicates(deliveries):
            return fail(ValueError("duplicate event or delivery id"))
        self.add_deliveries(deliveries)
        self._events[event.id] = event
        if event.idempotency_key is not None:
            self._remember_key(event.idempotency_key, event.id, event.created_at)
        heapq.heappush(self._event_times, (event.created_at, event.id))
        history = self._topic_events.setdefault(event.topic, [])
        insort(history, event.id)
        while history and (
            len(history) > keep_count or self._events[history[0]].created_at <= keep_after
        ):
            del self._events[history.pop(0)]
        if not history:
            del self._topic_events[event.topic]
        return succeed(None)

    def trim_events(self, before: float, limit: int = defaults.PURGE_BATCH) -> Deferred:
        doomed: Dict[str, Set[str]] = {}
        count = 0
        while self._event_times and count < limit and self._event_times[0][0] < before:
            created_at, event_id = heapq.heappop(self._event_times)
            event = self._events.get(event_id)
            if event is not None and event.created_at == created_at:
                del self._events[event_id]
                doomed.setdefault(event.topic, set()).add(event_id)
                count += 1
        for topic, ids in doomed.items():
            history = [i for i in self._topic_events[topic] if i not in ids]
            if history:
                self._topic_events[topic] = history
            else:
                del self._topic_events[topic]
        return succeed(count)

    def get_event(self, event_id: str) -> Deferred:
        return succeed(self._events.get(event_id))

    def _history(self, topics: Sequence[str]) -> List[str]:
        ids: List[str] = []
        for topic in set(topics):
            ids.extend(self._topic_events.get(topic, ()))
        ids.sort()
        return ids

    def events_after(self, topics: Sequence[str], after: Optional[str], limit: int) -> Deferred:
        ids = self._history(topics)
        start = bisect_right(ids, after) if after is not None else 0
        return succeed([self._events[i] for i in ids[start : start + limit]])

    def last_events(self, topics: Sequence[str], count: int) -> Deferred:
        ids = self._history(topics)
        return succeed([self._events[i] for i in ids[max(0, len(ids) - count) :]] if count > 0 else [])

    def events_page(self, topics: Sequence[str], after: Optional[str], limit: int, max_bytes: int) -> Deferred:
        return succeed(self._page(self._history(topics), after, limit, max_bytes))

    def _page(self, ids: List[str], after: Optional[str], limit: int, max_bytes: int) -> List[Event]:
        start = bisect_right(ids, after) if after is not None else 0
        page: List[Event] = []
        size = 0
        for event_id in ids[start : start + max(limit, 0)]:
            event = self._events[event_id]
            page.append(event)
            size += len(event.body)
            if size >= max_bytes:
                break
        return page

    def resume_page(self, topics: Sequence[str], after: str, limit: int, max_bytes: int) -> Deferred:
        ids = self._history(topics)
        at = bisect_left(ids, after)
        kept = at < len(ids) and ids[at] == after
        return succeed((kept, self._page(ids, after, limit, max_bytes)))

    def replay_cursor(self, topics: Sequence[str], count: int) -> Deferred:
        ids = self._history(topics)
        return succeed(ids[len(ids) - count - 1] if len(ids) > count else None)

    def list_topics(self) -> Deferred:
        now = self._clock.seconds()
        active = {
            topic: sum(1 for s in subscribers.values() if s.expires_at > now)
            for topic, subscribers in self._topic_subscribers.items()
        }
        names = set(self._topic_events) | {t for t, n in active.items() if n}
        return succeed(
            [(name, len(self._topic_events.get(name, ())), active.get(name, 0)) for name in sorted(names)]
        )

    # -- subscriptions --------------------------------------------------------

    def put_subscription(self, subscription: Subscription) -> Deferred:
        key = (subscription.topic, subscription.callback)
        self._subscriptions[key] = subscription
        self._topic_subscribers.setdefault(subscription.topic, {})[subscription.callback] = subscription
        return succeed(None)

    def remove_subscription(self, topic: str, callback: str, cancel_reason: Optional[str] = None) -> Deferred:
        removed = self._subscriptions.pop((topic, callback), None)
        if removed is not None:
            subscribers = self._topic_subscribers[topic]
            del subscribers[callback]
            if not subscribers:
                del self._topic_subscribers[topic]
        if cancel_reason is not None:
            self.cancel_deliveries(topic, callback, cancel_reason)
        return succeed(removed is not None)

    def get_subscription(self, topic: str, callback: str) -> Deferred:
        return succeed(self._subscriptions.get((topic, callback)))

    def active_subscriptions(self, topic: str, now: float) -> Deferred:
        return succeed(
            [s for s in self._topic_subscribers.get(topic, {}).values() if s.expires_at > now]
        )

    def list_subscriptions(self, topic: Optional[str]) -> Deferred:
        if topic is None:
            return succeed(list(self._subscriptions.values()))
        return succeed(list(self._topic_subscribers.get(topic, {}).values()))

    def purge_expired(self, now: float) -> Deferred:
        expired = [s for s in self._subscriptions.values() if s.expires_at <= now]
        removed: List[Tuple[str, str]] = []
        for subscription in expired:
            self.remove_subscription(subscription.topic, subscription.callback)
            self.cancel_deliveries(subscription.topic, subscription.callback, CANCELLED_EXPIRED)
            removed.append((subscription.topic, subscription.callback))
        return succeed(removed)


def _last_activity(delivery: Delivery) -> float:
    """When a delivery last did something: its last attempt, else its creation."""
    return delivery.attempts[-1].at if delivery.attempts else delivery.created_at
