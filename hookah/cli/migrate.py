"""
``hookah migrate``: bring a database's schema to this Hookah's version.

Nodes migrate by themselves at start-up (under an advisory lock, so several
starting at once do not race); the command lets an operator do it ahead of
a rolling upgrade, or check what a database holds. Blocking code: it runs
alone, not in the server.
"""

from __future__ import annotations

from typing import Tuple

from hookah.config import ConfigError, _storage


def migrate(storage: str) -> Tuple[int, int]:
    """Upgrade ``storage``; (migrations applied, schema version now). Raises on failure."""
    storage = _storage("storage", storage)
    if storage.startswith(("postgresql://", "postgres://")):
        import psycopg

        from hookah.storage.postgres import schema as pg

        with psycopg.connect(storage, connect_timeout=10) as connection:
            return pg.upgrade(connection), pg.SCHEMA_VERSION
    if storage.startswith("sqlite:"):
        import sqlite3

        from hookah.storage.sqlite import schema as lite

        path = storage[len("sqlite:"):]
        db = sqlite3.connect(path, isolation_level=None)
        try:
            (before,) = db.execute("PRAGMA user_version").fetchone()
            lite.upgrade(db, path)
        finally:
            db.close()
        return max(lite.SCHEMA_VERSION - before, 0), lite.SCHEMA_VERSION
    raise ConfigError("--storage memory: keeps no schema to migrate")
