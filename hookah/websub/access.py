"""
Who may subscribe to the hub.

WebSub expects an open hub: anyone may ask for a callback to receive a
topic, and the callback's answer to the verification is the only consent
asked for. That is the default here. But topics are also where
``/dispatch?_topic=`` publishes, so an operator whose topics carry private
events closes subscription with ``--subscribe-token``: an (un)subscription
request must then present one of those tokens (or an admin token), as
``Authorization: Bearer <token>`` or as an ``access_token`` parameter
(query string or form field; a parameter outside ``hub.*`` so that it
can ride in the hub URL that unmodified subscribers are given, e.g.
``https://hookah.example/hub?access_token=...``). ``--subscribe-open``
names topics that stay open even then (same patterns as ``--topic-allow``,
which still decides which topics the hub serves at all).
"""

from __future__ import annotations

import hmac
from typing import Optional, Tuple

import attr

from hookah.websub.subscriptions import TopicPolicy

__all__ = ["SubscribeAccess", "Refusal", "presented_token"]

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

    def refusal(self, topic: str, token: Optional[bytes]) -> Optional[Refusal]:
        """None when a request with ``token`` may (un)subscribe to ``topic``, else why not."""
        if self.is_open(topic):
            return None
        if token is None:
            return (
                401,
                "This hub accepts subscriptions only with a subscribe token: send Authorization: Bearer <token> "
                "or an access_token parameter.",
            )
        found = False
        for candidate in self.tokens + self.admin_tokens:
            found |= hmac.compare_digest(token, candidate)  # every candidate compared, always
        if not found:
            return (403, "The subscribe token is not valid for this hub.")
        return None

    def describe(self) -> str:
        if not self.tokens:
            return "open to anyone (no --subscribe-token)"
        if self.open_topics:
            return f"needs a subscribe token, except on {len(self.open_topics)} open topic pattern(s)"
        return "needs a subscribe token"


def presented_token(bearer: Optional[bytes], parameter: Optional[str]) -> Optional[bytes]:
    """The token a request presents: its bearer token, else its ``access_token`` parameter."""
    if bearer is not None:
        return bearer
    return parameter.encode() if parameter else None
