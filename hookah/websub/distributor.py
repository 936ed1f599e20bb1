"""
WebSub content distribution: an event on a topic becomes one delivery per
subscriber whose lease is running, each carrying the Link header and, for
a subscription with a secret, ``X-Hub-Signature`` (WebSub 7, 7.1).

Both doors into a topic — ``/dispatch?_topic=T`` and ``hub.mode=publish``
(``hookah.websub.publisher``) — end in ``HookahCore.publish``, which asks the
``Distributor`` for the deliveries and stores the event with them in one
transaction; from there the dispatcher's durable retries apply to WebSub
notifications like to any webhook.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Callable, Dict, List, Optional, Sequence
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hookah.model import KIND_WEBSUB, SCHEDULED, Delivery, Event, Headers, Subscription
from hookah.storage.interface import IStore

log = Logger()

HUB_PATH = "/hub"
# Headers a WebSub notification carries from the hub alone: an event's own
# extra headers (``X-Hookah-Header-*``) may not forge or duplicate them.
RESERVED_HEADERS = frozenset(["link", "x-hub-signature", "content-type"])
# Characters kept as they are inside ``<...>`` of a Link header; anything
# else (spaces, ``<``, ``>``, quotes, control and non-ASCII characters) is
# percent-encoded so that a topic name can never break the header.
_LINK_SAFE = "!#$%&'()*+,-./:;=?@[]_~"


def hub_url(public_url: Optional[str], request_base: Optional[str] = None) -> str:
    """
    The hub URL of a base URL: its ``/hub`` path.

    ``--public-url`` is the base URL of the whole service, taken byte for
    byte except for trailing slashes: ``https://hooks.example.com`` (or
    ``https://hooks.example.com/``) gives ``https://hooks.example.com/hub``,
    and ``https://example.com/hookah`` gives ``https://example.com/hookah/hub``.
    That is the URL to give subscribers (and websub.rocks, which compares
    rel=hub with it byte for byte). ``request_base`` is used only without
    it; ``http://localhost`` when there is neither.
    """
    base = public_url if public_url else (request_base or "http://localhost")
    return base.rstrip("/") + HUB_PATH


def link_header(hub: str, topic: str) -> str:
    """``<hub>; rel="hub", <topic>; rel="self"``, one header as 7 recommends."""
    return f'<{quote(hub, safe=_LINK_SAFE)}>; rel="hub", <{quote(topic, safe=_LINK_SAFE)}>; rel="self"'


def signature(secret: str, body: bytes) -> str:
    """``X-Hub-Signature`` value (7.1): ``sha256=`` and the lowercase hex HMAC of the body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class Distributor:
    """
    ``HookahCore.distribution``: the deliveries of one event, one per
    subscriber whose lease is still running at ``now``.

    Each is a POST of the event's exact body and ``Content-Type`` to the
    exact callback URL, with the Link header and, only for a subscription
    with a secret, ``X-Hub-Signature``. The body is shared; the Link header
    is shared by the subscribers that name the same hub.

    The hub URL in ``rel="hub"`` never comes from an unauthenticated
    request that anyone could send with a forged ``Host``: it is
    ``--public-url`` plus ``/hub`` when that is set, otherwise the hub URL
    each subscriber itself sent its subscription request to
    (``Subscription.hub_url``), so what a request claims reaches only the
    subscriber that sent it. A subscription stored before Hookah kept that
    URL names ``http://localhost/hub`` until it is renewed.
    """

    def __init__(self, store: IStore, new_id: Callable[[], str], public_url: Optional[str] = None) -> None:
        self.store = store
        self.new_id = new_id
        self.public_url = public_url
        self._warned = False

    def hub_url_for(self, subscription: Subscription) -> str:
        if self.public_url:
            return hub_url(self.public_url)
        if subscription.hub_url:
            return subscription.hub_url
        if not self._warned:
            self._warned = True
            log.warn(
                "a subscription without a recorded hub URL and no --public-url: its notifications name "
                "http://localhost/hub as their hub until it is renewed; set --public-url to this hub's "
                "public base URL"
            )
        return hub_url(None)

    def __call__(self, event: Event, now: float) -> Deferred:
        d = self.store.active_subscriptions(event.topic, now)
        d.addCallback(self.deliveries, event, now)
        return d

    def deliveries(self, subscriptions: Sequence[Subscription], event: Event, now: float) -> List[Delivery]:
        if not subscriptions:
            return []
        extra: Headers = tuple(
            (name, value) for name, value in event.headers if name.lower() not in RESERVED_HEADERS
        )
        # Usually every subscriber names the same hub: one header for all.
        by_hub: Dict[str, Headers] = {}
        deliveries = []
        for subscription in subscriptions:
            hub = self.hub_url_for(subscription)
            shared = by_hub.get(hub)
            if shared is None:
                shared = by_hub[hub] = extra + (("Link", link_header(hub, event.topic)),)
            headers = shared
            if subscription.secret:
                headers = shared + (("X-Hub-Signature", signature(subscription.secret, event.body)),)
            deliveries.append(
                Delivery(
                    id=self.new_id(),
                    url=subscription.callback,
                    body=event.body,
                    content_type=event.content_type,
                    headers=headers,
                    status=SCHEDULED,
                    created_at=now,
                    next_attempt_at=now,
                    kind=KIND_WEBSUB,
                    topic=event.topic,
                    event_id=event.id,
                )
            )
        return deliveries
