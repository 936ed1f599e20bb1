"""
Hookah's records as table rows, the same for every SQL provider: the
delivery columns in one order, headers as JSON text, and the row-to-record
mappings. SQLite and PostgreSQL differ in placeholders and statements, not
in what a row holds, so the mapping lives here once.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _json_text
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hookah.model import DELIVERED, FAILED, Attempt, Delivery, Event, Headers

DELIVERY_COLUMNS = (
    "id, url, body, content_type, headers, status, created_at, next_attempt_at,"
    " retries, timeout, errback, callback, kind, topic, event_id, parent_id,"
    " idempotency_key, retry_from, claimed_until, deferred, claim_token"
)


def dump_headers(headers: Headers) -> str:
    """
    ``json.dumps([[name, value], ...])``, the same text, built from the C
    string encoder json.dumps itself uses: half its cost, which counts on
    the way to the first send of a WebSub event (the 200 rows of one event
    carry a Link and a signature header each).
    """
    if not headers:
        return "[]"  # most deliveries: json.dumps costs a microsecond or two for it
    return "[" + ", ".join(["[" + _json_text(name) + ", " + _json_text(value) + "]" for name, value in headers]) + "]"


def load_headers(text: str) -> Headers:
    return tuple((name, value) for name, value in json.loads(text))


def finished_at(d: Delivery) -> Optional[float]:
    """A finished delivery's last activity: its last attempt, else its creation."""
    if d.status not in (DELIVERED, FAILED):
        return None
    return d.attempts[-1].at if d.attempts else d.created_at


def delivery_values(d: Delivery) -> Tuple[Any, ...]:
    """``DELIVERY_COLUMNS`` then ``finished_at``, for an INSERT."""
    return (
        d.id, d.url, d.body, d.content_type, dump_headers(d.headers),
        d.status, d.created_at, d.next_attempt_at, d.retries, d.timeout,
        d.errback, d.callback, d.kind, d.topic, d.event_id, d.parent_id,
        d.idempotency_key, d.retry_from, d.claimed_until, d.deferred, d.claim_token,
        finished_at(d),
    )


def deliveries_from_rows(rows: Sequence[Any], attempts: Dict[str, List[Attempt]]) -> List[Delivery]:
    """Rows of ``DELIVERY_COLUMNS`` with their attempts (by delivery id) as records."""
    return [
        Delivery(
            id=row[0], url=row[1], body=bytes(row[2]), content_type=row[3],
            headers=load_headers(row[4]), status=row[5], created_at=row[6],
            next_attempt_at=row[7], attempts=tuple(attempts.get(row[0], ())),
            retries=row[8], timeout=row[9], errback=row[10], callback=row[11],
            kind=row[12], topic=row[13], event_id=row[14], parent_id=row[15],
            idempotency_key=row[16], retry_from=row[17], claimed_until=row[18],
            deferred=row[19], claim_token=row[20],
        )
        for row in rows
    ]


def event_from_row(row: Any) -> Event:
    return Event(
        id=row[0], topic=row[1], body=bytes(row[2]), content_type=row[3],
        headers=load_headers(row[4]), created_at=row[5], idempotency_key=row[6],
    )
