"""
How the background loops (the dispatcher's claims and outcomes, retention)
log a failed store call.

While the database is down or restarting every poll fails the same way,
with ``StorageUnavailable``; a traceback per poll would bury the log in
identical stacks that say nothing the one-line reason does not. So that
failure is one warning line with the reason, and any other failure, a bug
or a surprise, keeps its full traceback.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from hookah.storage.interface import StorageUnavailable

__all__ = ["log_store_failure"]


def log_store_failure(log: Logger, failure: Failure, message: str, **fields: Any) -> None:
    """Log ``failure`` of a store call under ``message`` (a ``twisted.logger`` format)."""
    if failure.check(StorageUnavailable):
        log.warn(message + ": storage unavailable ({storage_error})", storage_error=str(failure.value), **fields)
    else:
        log.failure(message, failure, **fields)
