"""
Who may subscribe to the hub.

WebSub expects an open hub: anyone may ask for a callback to receive a
topic, and the callback's answer to the verification is the only consent
asked for. That is the default here. But topics are also where
``/dispatch?_topic=`` publishes, so an operator whose topics carry private
events closes subscription with ``--subscribe-token``: an (un)subscription
request must then present one of those tokens, as ``Authorization:
Bearer <token>`` or as an ``access_token`` parameter (query string or form
field; a parameter outside ``hub.*`` so that it can ride in the hub URL
that unmodified subscribers are given, e.g.
``https://hookah.example/hub?access_token=...``). An admin token is let in
too, but only in the header: a parameter is meant to end up in URLs, and so
in access logs and subscribers' configuration, where an admin token must
never be, so one given there is refused rather than quietly honoured, and
whoever put it there learns to rotate it. ``--subscribe-open``
names topics that stay open even then (same patterns as ``--topic-allow``,
which still decides which topics the hub serves at all).
"""

from __future__ import annotations

import hmac
from typing import Optional, Tuple

import attr

from hookah.websub.subscriptions import TopicPolicy

__all__ = ["SubscribeAccess", "Refusal"]

# (status, plain-text reason)
Refusal = Tuple[int, str]


@attr.s(auto_attribs=True, frozen=True)
class SubscribeAccess:
    tokens: Tuple[bytes, ...] = ()
    open_topics: Tuple[str, ...] = ()
    admin_tokens: Tuple[bytes, ...] = ()

    @classmethod
    def from_config(cls, config: object) -> SubscribeAccess:
        return cls(
            tokens=tuple(t.encode() for t in getattr(config, "subscribe_tokens", ())),
            open_topics=tuple(getattr(config, "subscribe_open", ())),
            admin_tokens=tuple(t.encode() for t in getattr(config, "admin_tokens", ())),
        )

    @property
    def closed(self) -> bool:
        """Whether subscribing needs a token (on the topics not left open)."""
        return bool(self.tokens)

    def is_open(self, topic: str) -> bool:
        if not self.tokens:
            return True
        return bool(self.open_topics) and TopicPolicy(self.open_topics).refusal(topic) is None

    def refusal(self, topic: str, bearer: Optional[bytes], parameter: Optional[str]) -> Optional[Refusal]:
        """
        None when a request may (un)subscribe to ``topic``, else why not.

        ``bearer`` is the request's ``Authorization: Bearer`` token (it wins
        when both are given), ``parameter`` its ``access_token`` parameter.
        """
        if self.is_open(topic):
            return None
        if bearer is None and not parameter:
            return (
                401,
                "This hub accepts subscriptions only with a subscribe token: send Authorization: Bearer <token> "
                "or an access_token parameter.",
            )
        token = bearer if bearer is not None else (parameter or "").encode()
        subscribe = admin = False
        for candidate in self.tokens:  # every candidate compared, always
            subscribe |= hmac.compare_digest(token, candidate)
        for candidate in self.admin_tokens:
            admin |= hmac.compare_digest(token, candidate)
        if admin and not subscribe and bearer is None:
            return (
                403,
                "An admin token is accepted only as Authorization: Bearer, never as access_token (URLs end up in "
                "logs): give subscribers a --subscribe-token, and rotate this admin token if it was shared.",
            )
        if not (subscribe or admin):
            return (403, "The subscribe token is not valid for this hub.")
        return None

    def describe(self) -> str:
        if not self.tokens:
            return "open to anyone (no --subscribe-token)"
        if self.open_topics:
            return f"needs a subscribe token, except on {len(self.open_topics)} open topic pattern(s)"
        return "needs a subscribe token"
