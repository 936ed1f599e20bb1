"""``hookah.web.query.QueryCache``: the same ``request.args`` as Twisted's ``parse_qs``, whether remembered or not."""

from __future__ import annotations

from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase
from twisted.web.http import parse_qs

from hookah.web.query import LONGEST_REMEMBERED, QueryCache

# Bytes that matter to a query parser: separators, escapes, plus, and others.
query_bytes = st.lists(
    st.sampled_from([b"&", b";", b"=", b"+", b"%", b"%2F", b"%zz", b"_url", b"a", b"\xff", b" ", b"%3D"]),
    max_size=20,
).map(b"".join)


class QueryCacheTests(TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(query_bytes, min_size=1, max_size=8))
    def test_same_args_as_parse_qs_first_time_and_after(self, queries: List[bytes]) -> None:
        cache = QueryCache(size=4)
        for query in queries + queries:
            self.assertEqual(cache(query), parse_qs(query, 1))

    def test_changing_one_answer_does_not_change_the_next(self) -> None:
        cache = QueryCache()
        query = b"_url=http%3A%2F%2Fexample.com%2Fhook&x=1&x=2"
        first = cache(query)
        first[b"x"].append(b"3")
        first[b"injected"] = [b"y"]
        self.assertEqual(cache(query), {b"_url": [b"http://example.com/hook"], b"x": [b"1", b"2"]})

    def test_bounded(self) -> None:
        cache = QueryCache(size=8)
        for n in range(100):
            self.assertEqual(cache(b"n=%d" % n), {b"n": [b"%d" % n]})
            self.assertLessEqual(len(cache), 8)

    def test_long_queries_are_parsed_not_remembered(self) -> None:
        cache = QueryCache()
        long_query = b"a=" + b"x" * LONGEST_REMEMBERED
        self.assertEqual(cache(long_query), {b"a": [b"x" * LONGEST_REMEMBERED]})
        self.assertEqual(cache(long_query), {b"a": [b"x" * LONGEST_REMEMBERED]})
        self.assertEqual(len(cache), 0)
