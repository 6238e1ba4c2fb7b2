"""PostgreSQL storage for Reflow (psycopg 3, async): many workers, many machines.

Install with ``pip install 'reflow[postgres]'`` and open with a URL::

    storage = open_storage("postgresql://user@host/db?reflow_schema=reflow")

``PostgresStorage`` is imported lazily: the entry point loads ``plugin`` from this
package in every process that uses Reflow, and a user without the ``postgres`` extra
must not pay for (or be warned about) a missing psycopg until they ask for PostgreSQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflow_adapters.postgres.storage import PostgresStorage

__all__ = ["PostgresStorage"]


def __getattr__(name: str) -> Any:
    if name == "PostgresStorage":
        from reflow_adapters.postgres.storage import PostgresStorage

        return PostgresStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
