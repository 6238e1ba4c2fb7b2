"""Named queries (``queries.sql``) and numbered migrations, bound to one table prefix.

``queries.sql`` holds blocks that start with ``-- name: NAME``. Comment lines are
dropped at load: the driver formats every statement with ``%`` and the comments
mention parameters. ``{p}`` becomes the table prefix and ``{now}`` the server-clock
expression (see the header of ``queries.sql``). Migrations are
``migrations/NNNN_name.sql``, numbered 1..n without gaps, split into statements at
lines ending in ``;``. Files are read with :mod:`importlib.resources`, so they ship
inside the wheel.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import NamedTuple

__all__ = ["NOW", "Migration", "migrations", "queries"]

_PACKAGE = "reflow_mysql"
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")

NOW = "COALESCE(%(now)s, TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) DIV 1000)"
"""The store's clock in epoch milliseconds: the server's UTC clock, or the test clock's
value when the ``now`` parameter is not NULL."""


class Migration(NamedTuple):
    """One numbered schema change: ``migrations/0001_initial.sql`` is version 1."""

    version: int
    name: str
    statements: tuple[str, ...]


def _strip_comments(text: str) -> str:
    return "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("--")
    ).strip()


def _bind(text: str, prefix: str) -> str:
    return text.replace("{p}", prefix).replace("{now}", NOW)


def parse_queries(text: str, prefix: str) -> dict[str, str]:
    """Split named-query text into ``{name: sql}``; a repeated name is an error."""
    parts = _NAME_LINE.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise ValueError(f"query {name!r} is defined twice in queries.sql")
        found[name] = _bind(_strip_comments(body), prefix).rstrip(";")
    return found


@functools.cache
def queries(prefix: str) -> dict[str, str]:
    """Every named query of ``queries.sql`` for tables named ``prefix + table``."""
    text = resources.files(_PACKAGE).joinpath("queries.sql").read_text("utf-8")
    return parse_queries(text, prefix)


def _statements(text: str) -> tuple[str, ...]:
    body = _strip_comments(text)
    chunks = re.split(r";\s*$", body, flags=re.MULTILINE)
    return tuple(chunk.strip() for chunk in chunks if chunk.strip())


@functools.cache
def migrations(prefix: str) -> tuple[Migration, ...]:
    """The numbered migrations for ``prefix``, in order; numbering must have no gaps."""
    folder = resources.files(_PACKAGE).joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            text = _bind(entry.read_text("utf-8"), prefix)
            found.append(Migration(int(match[1]), match[2], _statements(text)))
    found.sort()
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 1..n without gaps, found {found!r}")
    return tuple(found)
