"""The default storage adapter: one SQLite file through the standard library's ``sqlite3``."""

from __future__ import annotations

from reflow_adapters.sqlite.storage import SQLiteStorage

__all__ = ["SQLiteStorage"]
