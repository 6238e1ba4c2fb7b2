"""Connection strings: the ``reflow_schema`` URL parameter, and the migration lock key.

:attr:`PostgresStorage.url` must reopen the same store, schema included, so the schema
rides along as a ``reflow_schema`` query parameter. libpq rejects parameters it does
not know, so it is stripped before the DSN reaches libpq.
"""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict

__all__ = ["SCHEMA_PARAM", "advisory_key", "split_dsn", "with_schema_param"]

SCHEMA_PARAM = "reflow_schema"
"""Query parameter of :attr:`PostgresStorage.url` naming the schema."""


def split_dsn(dsn: str) -> tuple[str, str | None]:
    """``(dsn without reflow_schema, reflow_schema or None)``; libpq rejects unknown params."""
    if "://" not in dsn:
        return dsn, None
    parts = urlsplit(dsn)
    kept: list[tuple[str, str]] = []
    schema: str | None = None
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == SCHEMA_PARAM:
            schema = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), schema


def with_schema_param(dsn: str, schema: str) -> str:
    """A ``postgresql://`` URL for ``dsn`` (URL or key=value form) carrying the schema."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        query = [*parse_qsl(parts.query, keep_blank_values=True), (SCHEMA_PARAM, schema)]
        return urlunsplit(parts._replace(query=urlencode(query)))
    params = {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
    return "postgresql://?" + urlencode({**params, SCHEMA_PARAM: schema})


def advisory_key(schema: str) -> int:
    """A stable signed 64-bit advisory-lock key for migrating ``schema``."""
    digest = hashlib.blake2b(f"reflow-migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
