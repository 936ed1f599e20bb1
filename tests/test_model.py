"""Records: ``Delivery.replace`` gives what ``attr.evolve`` gives, for every field."""

from __future__ import annotations

import attr
import pytest

from hookah.model import DELIVERED, HOST_BUSY, KIND_WEBSUB, Attempt, Delivery

ORIGINAL = Delivery(
    id="01A", url="https://example.com/hook", body=b"x", content_type="text/plain", headers=(("A", "b"),),
    created_at=1.0, next_attempt_at=2.0, attempts=(Attempt(1.5, 500, "HTTP 500", 3),), retries=4, timeout=9.0,
    errback="https://example.com/e", callback="https://example.com/c", topic="t", event_id="E", parent_id="P",
    idempotency_key="k", retry_from=1, claimed_until=3.0, claim_token="token",
)

NEW_VALUES = {
    "id": "01B", "url": "https://example.org/", "body": b"y", "content_type": None, "headers": (),
    "status": "delivered", "created_at": 5.0, "next_attempt_at": None, "attempts": (), "retries": None,
    "timeout": None, "errback": None, "callback": None, "kind": "websub", "topic": None, "event_id": None,
    "parent_id": None, "idempotency_key": None, "retry_from": 0, "claimed_until": None, "deferred": "host_busy",
    "claim_token": "other",
}


def test_every_field_is_covered() -> None:
    assert set(NEW_VALUES) == {a.name for a in attr.fields(Delivery)}


@pytest.mark.parametrize("name", sorted(NEW_VALUES))
def test_replace_matches_evolve(name: str) -> None:
    replaced = ORIGINAL.replace(**{name: NEW_VALUES[name]})
    evolved = attr.evolve(ORIGINAL, **{name: NEW_VALUES[name]})
    assert replaced == evolved
    assert replaced.claim_token == evolved.claim_token  # not part of equality
    assert getattr(replaced, name) == getattr(evolved, name)
    assert ORIGINAL.replace() == ORIGINAL and ORIGINAL.replace().claim_token == "token"


def test_replace_converts_as_the_constructor_does() -> None:
    replaced = ORIGINAL.replace(status="delivered", kind="websub", deferred="host_busy")
    assert replaced.status is DELIVERED and replaced.kind is KIND_WEBSUB and replaced.deferred is HOST_BUSY
    with pytest.raises(ValueError):
        ORIGINAL.replace(status="lost")
    with pytest.raises(TypeError):
        ORIGINAL.replace(colour="red")
    with pytest.raises(TypeError):
        attr.evolve(ORIGINAL, colour="red")
