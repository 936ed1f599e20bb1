"""Identifiers: ULIDs as IdGenerator makes them, checked against a plain decoding of Crockford base32."""

from __future__ import annotations

from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st

from hookah.ids import IdGenerator

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def decode(ulid: str) -> int:
    value = 0
    for char in ulid:
        value = value * 32 + ALPHABET.index(char)
    return value


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@settings(max_examples=200)
@given(st.lists(st.floats(min_value=0, max_value=2**47 / 1000, allow_nan=False), min_size=1, max_size=20))
def test_ids_carry_their_millisecond_and_grow(times: List[float]) -> None:
    clock = Clock(0.0)
    new_id = IdGenerator(clock)
    ids = []
    for at in sorted(times):
        clock.now = at
        ulid = new_id()
        assert len(ulid) == 26 and set(ulid) <= set(ALPHABET)
        assert decode(ulid) >> 80 == int(at * 1000)
        ids.append(ulid)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@given(st.integers(min_value=0, max_value=2**47), st.integers(min_value=2, max_value=50))
def test_ids_within_one_millisecond_count_up_by_one(ms: int, count: int) -> None:
    new_id = IdGenerator(Clock(ms / 1000 + 0.0001))
    values = [decode(new_id()) for _ in range(count)]
    assert [v - values[0] for v in values] == list(range(count))
    assert all(v >> 80 == values[0] >> 80 for v in values)


def test_a_clock_going_back_keeps_ids_growing() -> None:
    clock = Clock(1000.0)
    new_id = IdGenerator(clock)
    first = new_id()
    clock.now = 999.0
    second = new_id()
    assert second > first
    assert decode(second) >> 80 == 1000000


def test_the_random_parts_differ_between_milliseconds() -> None:
    clock = Clock(1.0)
    new_id = IdGenerator(clock)
    tails = set()
    for i in range(50):
        clock.now = 1.0 + i / 1000
        tails.add(new_id()[10:])
    assert len(tails) == 50
