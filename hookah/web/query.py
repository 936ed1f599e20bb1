"""
Parsed query strings, remembered by their bytes.

Applications send most dispatches with a query string they have sent
before (``?_url=<their endpoint>``, ``?_topic=<a topic>``), and Twisted's
``parse_qs`` unquotes it again each time: about 3 % of the reactor thread
under dispatch load, most of it in ``urllib``'s percent-decoding. A hit
costs a dict look-up and a copy, so that a resource that changes its
``request.args`` cannot change what the next request sees.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from twisted.web.http import parse_qs

# Queries longer than this are parsed every time: they are seldom repeated,
# and a bound on each entry bounds the cache's memory with its size.
LONGEST_REMEMBERED = 512


class QueryCache:
    """``parse_qs(query, 1)`` for at most ``size`` distinct queries; when full it starts over."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._parsed: Dict[bytes, Tuple[Tuple[bytes, Tuple[bytes, ...]], ...]] = {}

    def __call__(self, query: bytes) -> Dict[bytes, List[bytes]]:
        parsed = self._parsed.get(query)
        if parsed is None:
            args = parse_qs(query, 1)
            if len(query) <= LONGEST_REMEMBERED:
                if len(self._parsed) >= self.size:
                    # Whole-sale: a working set that fits is back after one
                    # miss per query; one that does not fit pays parse_qs,
                    # as it would without the cache.
                    self._parsed.clear()
                self._parsed[query] = tuple((name, tuple(values)) for name, values in args.items())
            return args
        return {name: list(values) for name, values in parsed}

    def __len__(self) -> int:
        return len(self._parsed)
