"""
The newest deliveries, found with nothing but ``list_deliveries`` (``DeliveryPages``:
the core in the server, any ``IStore`` in tests).

Storage pages deliveries oldest first (``after=<id>``), which is what an API
client walking the whole queue wants; the status page wants the newest few.
Scanning everything would make the page cost grow with the store's size.
Delivery ids are ULIDs, whose first characters are the creation time in
milliseconds, so "ids after time t" is a bounded range query. We look for a
window ``(now - w, now]`` that holds at least ``count`` deliveries and fewer
than ``cap``: grow ``w`` geometrically from a minute until it holds
enough, then bisect between the last too-small and the first too-large
window. Every query returns at most ``cap`` rows, and there are a few dozen
at worst, whatever the size of the store.
"""

from __future__ import annotations

from typing import List, Optional

from hookah.core import DeliveryPages
from hookah.model import Delivery, DeliveryStatus

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
FIRST_WINDOW = 60.0
GROWTH = 8.0
MAX_BISECTIONS = 48


def id_at(seconds: float) -> str:
    """The smallest ULID created at ``seconds`` (its random part all zero)."""
    value = max(int(seconds * 1000), 0) << 80
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


async def newest_deliveries(store: DeliveryPages, status: Optional[DeliveryStatus], count: int, now: float) -> List[Delivery]:
    """Up to ``count`` deliveries (of ``status`` when given), newest first."""
    if count <= 0:
        return []
    cap = max(4 * count, 100)

    async def created_within(seconds: float) -> List[Delivery]:
        after = id_at(now - seconds) if seconds < now else None
        return list(await store.list_deliveries(status, cap, after))

    def newest(page: List[Delivery]) -> List[Delivery]:
        return list(reversed(page[-count:]))

    sparse, span = 0.0, FIRST_WINDOW
    while True:
        page = await created_within(span)
        if len(page) >= cap:
            break  # too many: the window we want lies between sparse and span
        if len(page) >= count or span >= now:
            return newest(page)
        sparse, span = span, min(span * GROWTH, now)

    dense = span
    for _ in range(MAX_BISECTIONS):
        if dense - sparse < 0.001:
            break
        middle = (sparse + dense) / 2
        page = await created_within(middle)
        if len(page) < count:
            sparse = middle
        elif len(page) >= cap:
            dense = middle
        else:
            return newest(page)
    # More than ``cap`` deliveries within one millisecond: show the newest
    # complete window we found rather than scanning.
    return newest(await created_within(sparse)) if sparse > 0 else []
