"""
One event as a JSON object, the shape every reader of topic history sees
(``GET /topics/<T>/events``, ``/stream``).

Readers should not have to know Hookah's storage to use an event, and they
should never receive something they cannot decode, so the body travels in
the form that keeps it both usable and intact:

- a JSON body (``application/json`` or any ``+json`` type) that parses is
  embedded as the JSON value itself, so a consumer reads ``data.field``
  instead of parsing a string inside a string;
- any other body that is valid UTF-8 is a string (UTF-8 round-trips
  exactly, so nothing is lost);
- anything else is base64 with ``"encoding": "base64"``; a reader checks
  for that key, and its absence means ``data`` is the content itself.

The function is pure and cheap; streams call it once per event and write
the same encoded bytes to every reader.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, Optional

from hookah.model import Event

__all__ = ["event_to_json", "is_json_type"]


def is_json_type(content_type: Optional[str]) -> bool:
    """Whether a Content-Type names JSON (``application/json``, ``*/*+json``)."""
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; a body holding them is passed on as text
    # so that the object we produce stays valid JSON for every reader.
    raise ValueError(name)


def event_to_json(event: Event) -> Dict[str, Any]:
    """``{"id", "topic", "time", "content_type", "data"[, "encoding"]}`` for ``event``."""
    obj: Dict[str, Any] = {
        "id": event.id,
        "topic": event.topic,
        "time": event.created_at,
        "content_type": event.content_type,
    }
    body = event.body
    if is_json_type(event.content_type) and body.strip():
        try:
            obj["data"] = json.loads(body, parse_constant=_reject_constant)
            return obj
        except (ValueError, RecursionError):
            pass
    try:
        obj["data"] = body.decode("utf-8")
    except UnicodeDecodeError:
        obj["data"] = base64.b64encode(body).decode("ascii")
        obj["encoding"] = "base64"
    return obj
