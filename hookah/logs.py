"""
Log output for the server: twistd's text log by default, or one JSON object
per line (``--log-format json``) for log shippers.

Under ``twistd`` the plugin's ``makeService`` runs *before* twistd starts
its own logging, and twistd then adds its text observer on stdout whatever
was begun before; two observers would interleave text and JSON. So for
twistd the JSON observer is handed over the way twistd asks for it: as the
``ILogObserver`` component of its ``Application``, which twistd then uses
*instead of* its text log. ``hookah serve`` (no twistd) begins logging
itself with ``start_logging``.

A JSON line holds ``time`` (ISO 8601, UTC), ``level``, ``namespace``, the
formatted ``message`` and every named field of the event (``id``, ``url``,
``ms``... as logged), plus ``failure`` with the traceback for errors.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any, Dict, Optional

from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.components import Componentized
from zope.interface import implementer

_SCALARS = (str, int, float, bool, type(None))


def _field(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    text = repr(value) if not isinstance(value, bytes) else value.decode("utf-8", "replace")
    return text if len(text) <= 500 else text[:500] + "…"


def event_as_json(event: LogEvent) -> Dict[str, Any]:
    """A log event as a flat JSON-safe dict, named fields kept."""
    when = event.get("log_time")
    record: Dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="milliseconds")
        if when is not None
        else None,
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and not key.startswith("_"):
            record[key] = _field(value)
    return record


@implementer(ILogObserver)
class JsonLineObserver:
    """Writes each event as one line of JSON (no record separator, unlike Twisted's)."""

    def __init__(self, out: Optional[IO[str]] = None) -> None:
        # Taken now: twistd later replaces sys.stdout with a file that logs,
        # and writing a log line there would log it again, forever.
        self.out = out if out is not None else sys.stdout

    def __call__(self, event: LogEvent) -> None:
        out = self.out
        try:
            line = json.dumps(event_as_json(event), ensure_ascii=False, default=str)
        except Exception as e:  # one odd event must never silence the log
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        out.write(line + "\n")
        out.flush()


def json_observer() -> ILogObserver:
    """
    Also usable as ``twistd --logger hookah.logs.json_observer``. JSON
    goes to standard output: run twistd in the foreground (``-n``), as log
    shippers and containers expect.
    """
    return JsonLineObserver()


def configure_logging(log_format: str, service: Any = None) -> None:
    """
    Called by ``makeService``: for ``json``, arrange that the ``Application``
    twistd parents ``service`` to logs through ``JsonLineObserver``. Text
    needs nothing: twistd's own log is text.
    """
    if log_format != "json" or service is None:
        return
    parent_it = service.setServiceParent

    def setServiceParent(parent: Any) -> None:
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, JsonLineObserver())
        parent_it(parent)

    service.setServiceParent = setServiceParent


def start_logging(log_format: str, out: Optional[IO[str]] = None) -> None:
    """Begin logging outside twistd (``hookah serve``): text or JSON lines on stdout."""
    stream = out if out is not None else sys.stdout
    observer = JsonLineObserver(stream) if log_format == "json" else textFileLogObserver(stream)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
