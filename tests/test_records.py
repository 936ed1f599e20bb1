"""
The row mapping shared by the SQL stores: headers as JSON text, written as
``json.dumps`` writes them (rows stored before and after read the same) and
read back as they were.
"""

from __future__ import annotations

import json
from typing import List, Tuple

from hypothesis import given
from hypothesis import strategies as st

from hookah.storage.records import dump_headers, load_headers

# Any text: quotes, backslashes, control characters, non-ASCII, surrogates' neighbours.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(st.lists(st.tuples(TEXT, TEXT), max_size=6))
def test_headers_are_written_as_json_dumps_writes_them_and_read_back(headers: List[Tuple[str, str]]) -> None:
    text = dump_headers(tuple(headers))
    assert text == json.dumps([[name, value] for name, value in headers])
    assert load_headers(text) == tuple(headers)


def test_a_websub_notifications_headers() -> None:
    headers = (
        ("Link", '<https://hub.example/hub>; rel="hub", <https://example.com/feed?a=1&b=\\\\>; rel="self"'),
        ("X-Hub-Signature", "sha256=" + "ab" * 32),
        ("X-Note", "caf\u00e9\t\u2603"),
    )
    assert dump_headers(headers) == json.dumps([list(h) for h in headers])
    assert dump_headers(()) == "[]"
