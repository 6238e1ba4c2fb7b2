"""``reflow schedules list|delete``: the durable schedules every worker fires."""

from __future__ import annotations

import click
from rich.table import Table

from reflow_cli.common import (
    Refused,
    console,
    echo_json,
    json_option,
    storage_option,
    value_cell,
)
from reflow_cli.db import opened, run_command
from reflow_cli.text import age, when
from reflow_cli.values import record_json
from reflow_core.types import Schedule

__all__ = ["schedules"]


@click.group()
def schedules() -> None:
    """List and delete schedules."""


def _recurrence(schedule: Schedule) -> str:
    rule = schedule.recurrence
    if rule.cron:
        text = f"cron {rule.cron} ({rule.timezone})"
    else:
        text = f"every {age(rule.every_ms or 0)}"
    return text + (", catch up" if rule.catch_up else "")


@schedules.command("list")
@storage_option
@json_option
def list_schedules(storage: str, as_json: bool) -> None:
    """List every schedule, by key, with its next firing."""

    async def work() -> tuple[list[Schedule], int]:
        async with opened(storage) as store:
            return await store.list_schedules(), await store.now()

    found, now = run_command(work)
    if as_json:
        echo_json({"schedules": [record_json(s) for s in found], "now": now})
        return
    table = Table(title=f"{len(found)} schedule(s)", title_justify="left")
    for column in ("key", "workflow", "recurrence", "next run", "input"):
        table.add_column(column, no_wrap=column == "key")
    for schedule in found:
        due = schedule.next_run_at
        table.add_row(
            schedule.key,
            schedule.workflow,
            _recurrence(schedule),
            f"{when(due)} ({'in ' + age(due - now) if due > now else 'due'})",
            value_cell(schedule.input, 40),
        )
    console().print(table)


@schedules.command("delete")
@click.argument("key")
@storage_option
@json_option
def delete_schedule(key: str, storage: str, as_json: bool) -> None:
    """Delete schedule KEY for every worker. A worker that registers it again at start-up
    recreates it: remove it from the application too."""

    async def work() -> None:
        async with opened(storage) as store:
            if not await store.delete_schedule(key):
                raise Refused(f"no schedule with key {key!r} in {storage}")

    run_command(work)
    if as_json:
        echo_json({"key": key, "deleted": True})
    else:
        console().print(f"deleted schedule {key!r}", markup=False)
