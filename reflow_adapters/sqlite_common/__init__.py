"""The SQLite dialect shared by the ``sqlite`` (stdlib) and ``apsw`` adapters.

Not an adapter itself: it holds the named queries (``queries.sql``), the schema and
numbered migrations, the group-commit worker threads and the contract implementation
(:class:`SQLiteStorageBase`), all written against a small driver shim
(:class:`Driver`, :class:`Connection`). Each adapter supplies only its driver glue.
"""

from __future__ import annotations

from reflow_adapters.sqlite_common.driver import Connection, Driver
from reflow_adapters.sqlite_common.storage import SQLiteStorageBase
from reflow_adapters.sqlite_common.url import parse_url

__all__ = ["Connection", "Driver", "SQLiteStorageBase", "parse_url"]
