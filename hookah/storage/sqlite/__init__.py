"""The embedded store: SQLite in WAL mode behind one writer thread (``store.SQLiteStore``)."""

from hookah.storage.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore"]
