"""A tiny named-query loader for ``queries.sql`` and the numbered migrations.

``queries.sql`` holds blocks that start with ``-- name: NAME``; everything up to the
next such line is the query (comments included, PostgreSQL ignores them). Loaded once,
with :mod:`importlib.resources`, so the files ship inside the wheel.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import LiteralString, NamedTuple

__all__ = ["Migration", "migrations", "queries"]

_PACKAGE = "reflow_adapters.postgres"
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


class Migration(NamedTuple):
    """One numbered schema change: ``migrations/0001_initial.sql`` is version 1."""

    version: int
    name: str
    sql: LiteralString


def _trusted(text: str) -> LiteralString:
    # The SQL comes from files shipped in this package, never from user input: that is
    # what LiteralString asks psycopg callers to guarantee. (mypy treats LiteralString as
    # str, so no cast is needed here; the annotation records the promise.)
    return text


def parse_queries(text: str) -> dict[str, LiteralString]:
    """Split named-query text into ``{name: sql}``; a repeated name is an error."""
    parts = _NAME_LINE.split(text)
    found: dict[str, LiteralString] = {}
    # parts = [header, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise ValueError(f"query {name!r} is defined twice in queries.sql")
        found[name] = _trusted(body.strip())
    return found


@functools.cache
def queries() -> dict[str, LiteralString]:
    """Every named query of ``queries.sql``."""
    text = resources.files(_PACKAGE).joinpath("queries.sql").read_text("utf-8")
    return parse_queries(text)


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """The numbered migrations, in order; numbering must have no gaps."""
    folder = resources.files(_PACKAGE).joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], _trusted(entry.read_text("utf-8"))))
    found.sort()
    expected = list(range(1, len(found) + 1))
    if [m.version for m in found] != expected:
        raise ValueError(f"migrations must be numbered 1..n without gaps, found {found!r}")
    return tuple(found)
