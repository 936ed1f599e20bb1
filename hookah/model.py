"""
The records Hookah keeps: deliveries with their attempts, events, subscriptions.

They are frozen so that a record handed to storage, to the dispatcher and to
the web layer is the same value everywhere; a change is a new record
(``attr.evolve``), never a mutation that one layer would miss.
"""

from __future__ import annotations

from enum import Enum
from operator import attrgetter
from typing import Any, Optional, Tuple

import attr


class TextEnum(str, Enum):
    """
    Named values that are text on the wire and in storage: each member is a
    ``str`` equal to its value, and prints, formats, JSON-encodes and binds
    to SQL as that value alone (``"failed"``, never ``DeliveryStatus.FAILED``),
    on every Python ``setup.py`` allows. Code compares members, not strings.
    """

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class DeliveryStatus(TextEnum):
    """Where a delivery stands (``scheduled → delivering → delivered | failed``)."""

    SCHEDULED = "scheduled"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"


SCHEDULED = DeliveryStatus.SCHEDULED
DELIVERING = DeliveryStatus.DELIVERING
DELIVERED = DeliveryStatus.DELIVERED
FAILED = DeliveryStatus.FAILED
STATUSES: Tuple[DeliveryStatus, ...] = tuple(DeliveryStatus)


class DeliveryKind(TextEnum):
    """
    What a delivery is for; errbacks and callbacks never spawn errbacks of
    their own, so a failing report cannot recurse.
    """

    DISPATCH = "dispatch"
    ERRBACK = "errback"
    CALLBACK = "callback"
    WEBSUB = "websub"


KIND_DISPATCH = DeliveryKind.DISPATCH
KIND_ERRBACK = DeliveryKind.ERRBACK
KIND_CALLBACK = DeliveryKind.CALLBACK
KIND_WEBSUB = DeliveryKind.WEBSUB


def delivery_status(value: str) -> DeliveryStatus:
    """A status read back as text (storage, a query string) as the member it names; ``ValueError`` for another."""
    return value if isinstance(value, DeliveryStatus) else DeliveryStatus(value)


def delivery_kind(value: str) -> DeliveryKind:
    """A kind read back as text as the member it names; ``ValueError`` for another."""
    return value if isinstance(value, DeliveryKind) else DeliveryKind(value)

Headers = Tuple[Tuple[str, str], ...]



class Deferral(TextEnum):
    """
    Why a delivery was pushed back by its host's state rather than by its
    own schedule (``Delivery.deferred``): the host's breaker is open, or the
    host has no free slot. A restart, which starts with a clean view of
    hosts, makes what only a pause held due at once.
    """

    HOST_PAUSED = "host_paused"
    HOST_BUSY = "host_busy"


HOST_PAUSED = Deferral.HOST_PAUSED
HOST_BUSY = Deferral.HOST_BUSY


def deferral(value: Optional[str]) -> Optional[Deferral]:
    """A deferral read back as text (storage) as the member it names; ``None`` stays ``None``."""
    if value is None or isinstance(value, Deferral):
        return value
    return Deferral(value)

# Why queued WebSub notifications were cancelled: the ``error`` of the
# attempt-less ``Attempt`` that ``IStore.cancel_deliveries`` appends.
CANCELLED_UNSUBSCRIBED = "cancelled: the subscriber unsubscribed"
CANCELLED_GONE = "cancelled: the callback answered 410 Gone"
CANCELLED_EXPIRED = "cancelled: the subscription's lease expired"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Attempt:
    """One try at delivering: when, and what came of it."""

    at: float
    status_code: Optional[int] = None
    error: Optional[str] = None
    duration_ms: int = 0

    def to_json(self) -> dict:
        return {
            "at": self.at,
            "status_code": self.status_code,
            "error": self.error,
            "duration_ms": self.duration_ms,
        }


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Delivery:
    """
    One POST to one URL, retried until it succeeds or gives up.

    ``retry_from`` is the index in ``attempts`` where the current retry budget
    began: a manual retry starts a fresh budget without forgetting history.
    ``claimed_until`` is the lease of whoever is delivering it; a lease that
    ran out (a killed process) makes the delivery claimable again.
    ``deferred`` says why ``next_attempt_at`` is later than the delivery's
    own schedule: ``None`` (it is not), ``"host_paused"`` (its host's
    breaker is open) or ``"host_busy"`` (its host has no free slot); an
    attempt clears it.
    ``claim_token`` names that claim: an outcome written with the token of
    a claim that was since taken over is refused (``ClaimLost``), so a slow
    deliverer never overwrites its successor's result. It is not part of
    the record's value (equality ignores it).
    """

    id: str
    url: str
    body: bytes
    content_type: Optional[str] = None
    headers: Headers = ()
    status: DeliveryStatus = attr.ib(default=SCHEDULED, converter=delivery_status)
    created_at: float = 0.0
    next_attempt_at: Optional[float] = None
    attempts: Tuple[Attempt, ...] = ()
    retries: Optional[int] = None
    timeout: Optional[float] = None
    errback: Optional[str] = None
    callback: Optional[str] = None
    kind: DeliveryKind = attr.ib(default=KIND_DISPATCH, converter=delivery_kind)
    topic: Optional[str] = None
    event_id: Optional[str] = None
    parent_id: Optional[str] = None
    idempotency_key: Optional[str] = None
    retry_from: int = 0
    claimed_until: Optional[float] = None
    deferred: Optional[Deferral] = attr.ib(default=None, converter=deferral)
    claim_token: Optional[str] = attr.ib(default=None, eq=False)

    def replace(self, **changes: Any) -> Delivery:
        """
        This record with ``changes``: ``attr.evolve``'s result at about half
        its cost (the dispatcher makes two per webhook), reading every field
        in one ``attrgetter`` call and passing them by position.
        """
        values = list(_delivery_values(self))
        try:
            for name, value in changes.items():
                values[_DELIVERY_INDEX[name]] = value
        except KeyError:
            raise TypeError(f"Delivery has no field {name!r}") from None
        return Delivery(*values)

    @property
    def current_attempts(self) -> Tuple[Attempt, ...]:
        """The attempts that count against the current retry budget."""
        return self.attempts[self.retry_from :]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "url": self.url,
            "status": self.status,
            "kind": self.kind,
            "content_type": self.content_type,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at,
            "attempts": [a.to_json() for a in self.attempts],
            "retries": self.retries,
            "timeout": self.timeout,
            "errback": self.errback,
            "callback": self.callback,
            "topic": self.topic,
            "event_id": self.event_id,
            "parent_id": self.parent_id,
        }


_DELIVERY_FIELDS = tuple(a.name for a in attr.fields(Delivery))
_delivery_values = attrgetter(*_DELIVERY_FIELDS)
_DELIVERY_INDEX = {name: i for i, name in enumerate(_DELIVERY_FIELDS)}


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Event:
    """Something published on a topic, kept in the topic's bounded history."""

    id: str
    topic: str
    body: bytes
    content_type: Optional[str] = None
    headers: Headers = ()
    created_at: float = 0.0
    idempotency_key: Optional[str] = None


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Subscription:
    """
    A verified WebSub subscription: one per (topic, callback).

    ``hub_url`` is the hub URL the subscriber itself sent its request to
    (scheme, ``Host`` and path as it sent them); without ``--public-url``
    its notifications name that URL in ``Link: rel="hub"``, so that what
    one request claims about the hub never reaches another subscriber.
    ``None`` for subscriptions stored before Hookah kept it.
    """

    topic: str
    callback: str
    secret: Optional[str] = None
    lease_seconds: int = 0
    created_at: float = 0.0
    expires_at: float = 0.0
    hub_url: Optional[str] = None

    def to_json(self) -> dict:
        return {
            "topic": self.topic,
            "callback": self.callback,
            "lease_seconds": self.lease_seconds,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "has_secret": self.secret is not None,
            "hub_url": self.hub_url,
        }
