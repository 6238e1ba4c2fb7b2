"""Loads the SQL files shipped in this package: named queries, schema, migrations.

``queries.sql`` holds one block per query, opened by a ``-- name: <query_name>`` line
(procrastinate's layout), so a reader looking for the claim query opens one file. The
schema and numbered migrations are plain scripts. Files are read with
:mod:`importlib.resources`, so they work from a wheel or a zip as well as a checkout.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from importlib import resources
from typing import NamedTuple

__all__ = ["Migration", "migrations", "queries", "schema", "split_statements"]

_PACKAGE = "reflow_adapters.sqlite_common"
_NAME_LINE = re.compile(r"^--\s*name:\s*(?P<name>\w+)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>\w+)\.sql$")


class Migration(NamedTuple):
    """One numbered schema change, ``migrations/NNNN_name.sql``."""

    version: int
    name: str
    script: str


def _read(*parts: str) -> str:
    return resources.files(_PACKAGE).joinpath(*parts).read_text(encoding="utf-8")


def parse_queries(text: str) -> dict[str, str]:
    """Split a named-query file into ``{name: sql}``; a repeated name is an error."""
    found: dict[str, str] = {}
    matches = list(_NAME_LINE.finditer(text))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        name = match["name"]
        if name in found:
            raise ValueError(f"query {name!r} is defined twice in queries.sql")
        if not body:
            raise ValueError(f"query {name!r} in queries.sql has no SQL")
        found[name] = body
    return found


@functools.cache
def queries() -> dict[str, str]:
    """The named queries of ``queries.sql``, by name."""
    return parse_queries(_read("queries.sql"))


@functools.cache
def schema() -> str:
    """The current schema as one script, applied to a new database."""
    return _read("schema.sql")


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """Every migration, in version order; versions must be 1, 2, 3... without gaps."""
    found: list[Migration] = []
    for entry in resources.files(_PACKAGE).joinpath("migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match is not None:
            script = entry.read_text(encoding="utf-8")
            found.append(Migration(int(match["version"]), match["name"], script))
    found.sort()
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise ValueError(f"migration versions must be 1..N without gaps, got {found}")
    return tuple(found)


def split_statements(script: str) -> list[str]:
    """Split a script into single statements.

    Needed because the stdlib driver runs one statement per ``execute`` and its
    ``executescript`` commits first, which would break applying a migration inside the
    transaction that records it. ``sqlite3.complete_statement`` knows about strings,
    comments and trigger bodies, so a ``;`` inside them does not split.
    """
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statement = pending.strip()
            if _has_code(statement):
                statements.append(statement)
            pending = ""
    if _has_code(pending):
        raise ValueError(f"unterminated SQL statement: {pending.strip()[:80]!r}")
    return statements


def _has_code(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in text.splitlines())
