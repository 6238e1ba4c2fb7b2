"""``reflow db migrate|status|sql``: schema changes on command.

``migrate`` is the only command that changes a schema. ``status`` and ``sql`` read the
version without creating anything, so pointing them at a mistyped URL creates no file
and no PostgreSQL schema.
"""

from __future__ import annotations

import click

from reflow_cli.common import Refused, console, echo_json, json_option, storage_option
from reflow_cli.db import opened, read_status, run_command, schema_of
from reflow_core.migrations import SchemaStatus

__all__ = ["db"]


@click.group()
def db() -> None:
    """Migrate a store, show its schema version, print the DDL."""


def _status_text(status: SchemaStatus) -> str:
    where = status.location or "the store"
    if not status.exists:
        return f"{where} does not exist; 'reflow db migrate' creates it at version {status.latest}"
    if status.too_new:
        return (
            f"{where} is at schema version {status.current}, newer than this Reflow "
            f"({status.latest}): upgrade Reflow"
        )
    if status.up_to_date:
        return f"{where} is at schema version {status.current}, up to date"
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in status.pending)
    return (
        f"{where} is at schema version {status.current} of {status.latest}; pending: {names}; "
        "run 'reflow db migrate'"
    )


@db.command("status")
@storage_option
@click.option("--check", is_flag=True, help="Exit 1 unless the schema is up to date.")
@json_option
def status(storage: str, check: bool, as_json: bool) -> None:
    """Show the schema version of a store and the migrations it lacks (writes nothing)."""
    found, _ = run_command(lambda: read_status(storage))
    if as_json:
        echo_json({**_status_json(found)})
    else:
        console().print(_status_text(found), markup=False, soft_wrap=True)
    if check and not found.up_to_date:
        raise SystemExit(1)


def _status_json(status: SchemaStatus) -> dict[str, object]:
    return {
        "current": status.current,
        "latest": status.latest,
        "up_to_date": status.up_to_date,
        "exists": status.exists,
        "location": status.location,
        "pending": [{"version": m.version, "name": m.name} for m in status.pending],
    }


@db.command("migrate")
@storage_option
@json_option
def migrate(storage: str, as_json: bool) -> None:
    """Apply pending migrations (creating the store if it does not exist). Safe to run
    while workers are running and from several machines at once."""

    async def work() -> tuple[SchemaStatus, SchemaStatus]:
        before, _ = await read_status(storage)
        if before.too_new:
            raise Refused(_status_text(before))
        async with opened(storage, migrate=True) as store:
            after = await schema_of(store).schema_status()
        return before, after

    before, after = run_command(work)
    applied = [m for m in before.pending if m.version <= after.current]
    if as_json:
        echo_json(
            {
                "from": before.current,
                "to": after.current,
                "applied": [{"version": m.version, "name": m.name} for m in applied],
            }
        )
        return
    out = console()
    if not applied:
        out.print(f"nothing to do: {_status_text(after)}", markup=False, soft_wrap=True)
        return
    for m in applied:
        out.print(f"applied {m.version:04d}_{m.name}", markup=False)
    out.print(_status_text(after), markup=False, soft_wrap=True)


@db.command("sql")
@storage_option
@click.option(
    "--from",
    "from_version",
    type=click.IntRange(min=0),
    help="Print the DDL from this version (0: everything) without connecting; "
    "default: read the store's version and print what it lacks.",
)
@json_option
def sql(storage: str, from_version: int | None, as_json: bool) -> None:
    """Print the DDL 'reflow db migrate' would run, without running it (for review, or
    for a DBA to apply by hand)."""

    async def work() -> tuple[int, str]:
        if from_version is not None:
            from reflow_core.registry import open_storage

            store = open_storage(storage)
            try:
                return from_version, schema_of(store).migration_sql(from_version)
            finally:
                await store.close()
        found, schema = await read_status(storage)
        if found.too_new:
            raise Refused(_status_text(found))
        return found.current, schema.migration_sql(found.current)

    start, script = run_command(work)
    if as_json:
        echo_json({"from": start, "sql": script})
    elif script:
        click.echo(script, nl=False)
    else:
        click.echo("-- nothing to apply: the schema is up to date", err=True)
