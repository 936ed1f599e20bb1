"""
The retry policy of ``hookah.delivery.retry``: schedule, jitter, ``Retry-After`` and
the final outcomes, through its public functions only (no reactor).
"""

from __future__ import annotations

import email.utils

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from hookah.model import DELIVERED, FAILED, SCHEDULED
from hookah.defaults import RETRY_SCHEDULE as DEFAULT_SCHEDULE
from hookah.delivery.retry import JITTER, MAX_RETRY_AFTER, backoff, decide, parse_retry_after

SCHEDULE = (5.0, 30.0, 120.0, 600.0)
NOW = 1_700_000_000.0  # a realistic epoch, so HTTP-dates mean something

# rand() == 0.5 puts jitter exactly at zero: the schedule's own values.
NO_JITTER = lambda: 0.5  # noqa: E731

unit_interval = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)
steps = st.floats(min_value=0.0, max_value=10 * 86400.0, allow_nan=False, allow_infinity=False)


def retry_decision(**overrides: object):
    arguments = dict(
        status_code=500,
        retry_after=None,
        attempts_made=1,
        retries=len(SCHEDULE),
        schedule=SCHEDULE,
        now=NOW,
        rand=NO_JITTER,
    )
    arguments.update(overrides)
    return decide(**arguments)  # type: ignore[arg-type]


class BackoffTests(TestCase):
    def test_follows_the_schedule(self) -> None:
        self.assertEqual([backoff(SCHEDULE, n, NO_JITTER) for n in range(len(SCHEDULE))], list(SCHEDULE))

    def test_repeats_the_last_step_past_the_end(self) -> None:
        for n in (len(SCHEDULE), len(SCHEDULE) + 1, len(SCHEDULE) + 50):
            self.assertEqual(backoff(SCHEDULE, n, NO_JITTER), SCHEDULE[-1])

    def test_empty_schedule_retries_at_once(self) -> None:
        self.assertEqual(backoff((), 3, NO_JITTER), 0.0)

    def test_jitter_extremes(self) -> None:
        self.assertAlmostEqual(backoff((100.0,), 0, lambda: 0.0), 80.0)
        self.assertAlmostEqual(backoff((100.0,), 0, lambda: 0.999999), 120.0, places=3)

    def test_default_schedule_is_about_a_day(self) -> None:
        total = sum(DEFAULT_SCHEDULE)
        self.assertTrue(20 * 3600 <= total <= 28 * 3600, total)
        self.assertEqual(list(DEFAULT_SCHEDULE), sorted(DEFAULT_SCHEDULE))

    @given(
        schedule=st.lists(steps, min_size=1, max_size=12),
        retry_number=st.integers(min_value=0, max_value=200),
        rand=unit_interval,
    )
    def test_jitter_stays_within_twenty_percent(self, schedule, retry_number, rand) -> None:
        base = schedule[min(retry_number, len(schedule) - 1)]
        wait = backoff(schedule, retry_number, lambda: rand)
        self.assertEqual(JITTER, 0.2)
        self.assertGreaterEqual(wait, base * 0.8 - 1e-9)
        self.assertLessEqual(wait, base * 1.2 + 1e-9)
        self.assertGreaterEqual(wait, 0.0)

    @given(rand_a=unit_interval, rand_b=unit_interval)
    def test_jitter_is_monotonic_in_rand(self, rand_a, rand_b) -> None:
        low, high = sorted((rand_a, rand_b))
        self.assertLessEqual(backoff((600.0,), 0, lambda: low), backoff((600.0,), 0, lambda: high))


class ParseRetryAfterTests(TestCase):
    def test_seconds(self) -> None:
        self.assertEqual(parse_retry_after("120", NOW), 120.0)
        self.assertEqual(parse_retry_after(" 7 ", NOW), 7.0)

    def test_http_date(self) -> None:
        value = email.utils.formatdate(NOW + 300, usegmt=True)
        self.assertAlmostEqual(parse_retry_after(value, NOW), 300.0)

    def test_http_date_in_the_past_means_now(self) -> None:
        self.assertEqual(parse_retry_after(email.utils.formatdate(NOW - 300, usegmt=True), NOW), 0.0)

    def test_capped(self) -> None:
        self.assertEqual(parse_retry_after("99999999", NOW), MAX_RETRY_AFTER)
        far = email.utils.formatdate(NOW + 10 * MAX_RETRY_AFTER, usegmt=True)
        self.assertEqual(parse_retry_after(far, NOW), MAX_RETRY_AFTER)

    def test_garbage_is_ignored(self) -> None:
        for value in (None, "", "soon", "-5", "1.5e3", "Mon, 99 Foo 2024", "\xb2", "\u0661\u0662"):
            self.assertIsNone(parse_retry_after(value, NOW), value)

    @given(st.text(max_size=40))
    def test_never_raises(self, value) -> None:
        wait = parse_retry_after(value, NOW)
        if wait is not None:
            self.assertTrue(0.0 <= wait <= MAX_RETRY_AFTER)


class DecideTests(TestCase):
    def test_2xx_is_delivered(self) -> None:
        for code in (200, 201, 202, 204, 299):
            decision = retry_decision(status_code=code)
            self.assertEqual(decision.status, DELIVERED)
            self.assertTrue(decision.final)
            self.assertIsNone(decision.next_attempt_at)

    def test_2xx_on_the_last_attempt_is_delivered(self) -> None:
        self.assertEqual(retry_decision(status_code=200, attempts_made=99, retries=0).status, DELIVERED)

    def test_410_is_final_with_retries_left(self) -> None:
        decision = retry_decision(status_code=410, attempts_made=1, retries=10)
        self.assertEqual(decision.status, FAILED)
        self.assertTrue(decision.final)
        self.assertIn("410", decision.reason)

    def test_other_failures_are_retried_on_the_schedule(self) -> None:
        for code in (None, 300, 301, 302, 303, 307, 400, 404, 408, 500, 502, 504):
            for made in range(1, len(SCHEDULE) + 1):
                decision = retry_decision(status_code=code, attempts_made=made)
                self.assertEqual(decision.status, SCHEDULED, (code, made))
                self.assertFalse(decision.final)
                self.assertEqual(decision.next_attempt_at, NOW + SCHEDULE[made - 1])

    def test_exhausted_retries_are_final(self) -> None:
        decision = retry_decision(status_code=500, attempts_made=len(SCHEDULE) + 1, retries=len(SCHEDULE))
        self.assertEqual(decision.status, FAILED)
        self.assertIn("exhausted", decision.reason)
        self.assertIsNone(decision.next_attempt_at)

    def test_zero_retries_means_one_attempt(self) -> None:
        self.assertEqual(retry_decision(status_code=None, attempts_made=1, retries=0).status, FAILED)

    def test_more_retries_than_the_schedule_repeat_its_last_step(self) -> None:
        decision = retry_decision(attempts_made=len(SCHEDULE) + 3, retries=len(SCHEDULE) + 5)
        self.assertEqual(decision.status, SCHEDULED)
        self.assertEqual(decision.next_attempt_at, NOW + SCHEDULE[-1])

    def test_retry_after_seconds_on_429_and_503(self) -> None:
        for code in (429, 503):
            decision = retry_decision(status_code=code, retry_after="3600")
            self.assertEqual(decision.status, SCHEDULED)
            self.assertGreaterEqual(decision.next_attempt_at, NOW + 3600)

    def test_retry_after_http_date_on_429_and_503(self) -> None:
        value = email.utils.formatdate(NOW + 1800, usegmt=True)
        for code in (429, 503):
            decision = retry_decision(status_code=code, retry_after=value)
            self.assertGreaterEqual(decision.next_attempt_at, NOW + 1800)

    def test_retry_after_shorter_than_the_schedule_keeps_the_schedule(self) -> None:
        decision = retry_decision(status_code=503, retry_after="1", attempts_made=3)
        self.assertEqual(decision.next_attempt_at, NOW + SCHEDULE[2])

    def test_retry_after_is_capped(self) -> None:
        decision = retry_decision(status_code=429, retry_after=str(365 * 86400))
        self.assertEqual(decision.next_attempt_at, NOW + MAX_RETRY_AFTER)

    def test_retry_after_does_not_extend_the_retry_budget(self) -> None:
        decision = retry_decision(status_code=503, retry_after="60", attempts_made=2, retries=1)
        self.assertEqual(decision.status, FAILED)

    def test_other_statuses_ignore_retry_after(self) -> None:
        for code in (None, 302, 400, 500, 502, 504):
            decision = retry_decision(status_code=code, retry_after="3600")
            self.assertEqual(decision.next_attempt_at, NOW + SCHEDULE[0], code)

    def test_unparseable_retry_after_falls_back_to_the_schedule(self) -> None:
        for value in ("later", "\xb2"):
            decision = retry_decision(status_code=503, retry_after=value)
            self.assertEqual(decision.next_attempt_at, NOW + SCHEDULE[0])

    @given(
        code=st.one_of(st.none(), st.integers(min_value=100, max_value=599)),
        made=st.integers(min_value=1, max_value=30),
        retries=st.integers(min_value=0, max_value=30),
        rand=unit_interval,
        retry_after=st.one_of(st.none(), st.integers(min_value=0, max_value=10**7).map(str)),
    )
    def test_decision_invariants(self, code, made, retries, rand, retry_after) -> None:
        decision = retry_decision(
            status_code=code, attempts_made=made, retries=retries, rand=lambda: rand, retry_after=retry_after
        )
        if code is not None and 200 <= code < 300:
            self.assertEqual(decision.status, DELIVERED)
        elif code == 410 or made > retries:
            self.assertEqual(decision.status, FAILED)
        else:
            self.assertEqual(decision.status, SCHEDULED)
            wait = decision.next_attempt_at - NOW
            base = SCHEDULE[min(made - 1, len(SCHEDULE) - 1)]
            self.assertGreaterEqual(wait, base * 0.8 - 1e-6)
            self.assertLessEqual(wait, max(base * 1.2, MAX_RETRY_AFTER) + 1e-6)
            if code in (429, 503) and retry_after is not None:
                self.assertGreaterEqual(wait, min(float(retry_after), MAX_RETRY_AFTER) - 1e-6)
            else:
                self.assertLessEqual(wait, base * 1.2 + 1e-6)
        self.assertEqual(decision.final, decision.status != SCHEDULED)
