"""PostgreSQL storage for Reflow (psycopg 3, async): many workers, many machines.

Install with ``pip install 'reflow[postgres]'`` and open with a URL::

    storage = open_storage("postgresql://user@host/db?reflow_schema=reflow")
"""

from __future__ import annotations

from reflow_adapters.postgres.storage import PostgresStorage

__all__ = ["PostgresStorage"]
