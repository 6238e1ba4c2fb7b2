"""``reflow runs ...``: list, show and explain runs (what changes runs, cancel, resume,
retry and purge, is in :mod:`reflow_cli.commands.run_actions`).

Everything goes through the storage contract (:mod:`reflow_core.storage`) on a store
opened without migrating (:mod:`reflow_cli.db`). The commands need no workflow code, so
they work from any machine that can reach the store.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from reflow_cli.common import (
    DAMAGE_STYLE,
    Refused,
    console,
    echo_json,
    json_option,
    storage_option,
    value_cell,
)
from reflow_cli.db import opened, run_command
from reflow_cli.explain import Facts, explain
from reflow_cli.text import age, when
from reflow_cli.values import damaged_values, record_json
from reflow_core.durations import to_millis
from reflow_core.errors import ConfigError
from reflow_core.storage import StorageAdapter
from reflow_core.types import DamagedValue, RunFilter, RunStatus, StepResult, WorkflowRun

__all__ = ["runs"]

COUNT_LIMIT = 10_000
"""``explain`` counts older pending runs up to this many (then says "at least")."""

ACTIVE = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SLEEPING, RunStatus.WAITING)
"""Statuses of a run that has not ended (what ``runs cancel`` may cancel)."""


@click.group()
def runs() -> None:
    """Inspect and operate on runs."""


# -- cursors and times ---------------------------------------------------------------


def encode_cursor(run: WorkflowRun) -> str:
    """An opaque page cursor: the ``(created_at, id)`` key of the last run shown."""
    raw = json.dumps([run.created_at, run.id], ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[int, str]:
    """The key in a cursor; :class:`click.BadParameter` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, run_id = json.loads(raw)
        if isinstance(created_at, int) and isinstance(run_id, str):
            return created_at, run_id
    except (binascii.Error, ValueError, TypeError):
        pass
    raise click.BadParameter(
        f"{text!r} is not a cursor printed by 'reflow runs list'", param_hint="--cursor"
    )


def parse_time(text: str, now: int, option: str) -> int:
    """``text`` as epoch ms: an ISO 8601 time (UTC unless it says otherwise) or a
    duration before the store's ``now`` (``30m``, ``2h``, ``7d``)."""
    try:
        return now - to_millis(text, what=option)
    except ConfigError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a time (2026-12-01T08:00, UTC unless it has an offset) "
            "nor a duration before now (30m, 2h, 7d)",
            param_hint=option,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# -- list ----------------------------------------------------------------------------


async def list_page(
    storage: StorageAdapter,
    *,
    status: RunStatus | None,
    workflow: str | None,
    since: str | None,
    until: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[WorkflowRun], str | None]:
    """One page, newest first, and the cursor of the next page (``None`` at the end)."""
    now = await storage.now()
    key: tuple[int, str | None] | None = None
    if until is not None:
        # list_runs' bound is strict; "created until T" includes T.
        key = (parse_time(until, now, "--created-until") + 1, None)
    if cursor is not None:
        after = decode_cursor(cursor)
        if key is None or after < (key[0], ""):
            key = after
    since_ms = parse_time(since, now, "--created-since") if since is not None else None
    found = await storage.list_runs(
        RunFilter(
            status=status,
            workflow=workflow,
            before=key[0] if key else None,
            before_id=key[1] if key else None,
            limit=limit + 1,  # one more than shown: whether a next page exists
        )
    )
    more = len(found) > limit
    page = found[:limit]
    if since_ms is not None:
        kept = [run for run in page if run.created_at >= since_ms]
        if len(kept) < len(page) or (more and found[limit].created_at < since_ms):
            more = False
        page = kept
    return page, encode_cursor(page[-1]) if more and page else None


@runs.command("list")
@storage_option
@click.option("--status", type=click.Choice([s.value for s in RunStatus]))
@click.option("--workflow", metavar="NAME")
@click.option(
    "--created-since",
    "since",
    metavar="TIME",
    help="Only runs created at or after TIME: ISO 8601 (UTC) or a duration ago (2h, 7d).",
)
@click.option(
    "--created-until",
    "until",
    metavar="TIME",
    help="Only runs created at or before TIME: ISO 8601 (UTC) or a duration ago.",
)
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=20, show_default=True)
@click.option("--cursor", metavar="CURSOR", help="Continue after the page that printed it.")
@json_option
def list_runs(
    storage: str,
    status: str | None,
    workflow: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List runs, newest first, a page at a time (the next page's cursor is printed)."""

    async def work() -> tuple[list[WorkflowRun], str | None]:
        async with opened(storage) as store:
            return await list_page(
                store,
                status=RunStatus(status) if status else None,
                workflow=workflow,
                since=since,
                until=until,
                cursor=cursor,
                limit=limit,
            )

    page, next_cursor = run_command(work)
    if as_json:
        echo_json({"runs": [record_json(r) for r in page], "next_cursor": next_cursor})
        return
    damaged = {run.id: [d.value for d in damaged_values(run, [])] for run in page}
    table = Table(title=f"{len(page)} run(s), newest first", title_justify="left")
    columns = ["id", "workflow", "status", "claims", "created", "updated"]
    # The column only when needed: a healthy page prints as it always did.
    columns += ["damage"] if any(damaged.values()) else []
    for column in columns:
        table.add_column(column, no_wrap=column == "id")
    for run in page:
        cells: list[str | Text] = [
            run.id,
            run.workflow,
            run.status.value,
            str(run.attempt),
            when(run.created_at),
            when(run.updated_at),
        ]
        if len(columns) > len(cells):
            what = ", ".join(damaged[run.id])
            cells.append(Text(f"damaged: {what}" if what else "", style=DAMAGE_STYLE))
        table.add_row(*cells)
    out = console()
    out.print(table)
    if any(damaged.values()):
        out.print(
            Text(
                "A run marked damaged holds a stored value that cannot be decoded; "
                "'reflow runs explain RUN' says what happens to it and what to do.",
                style=DAMAGE_STYLE,
            ),
            soft_wrap=True,
        )
    if next_cursor:
        out.print(f"next page: --cursor {next_cursor}", soft_wrap=True)


# -- show ------------------------------------------------------------------------------


async def load_run(store: StorageAdapter, run_id: str, url: str) -> tuple[WorkflowRun, int]:
    """The run and the store's clock; :class:`Refused` (exit 1) if there is no such run."""
    run = await store.get_run(run_id)
    if run is None:
        raise Refused(f"no run with id {run_id!r} in {url}")
    return run, await store.now()


def _show_json(run: WorkflowRun, steps: list[StepResult], now: int) -> dict[str, Any]:
    return {
        "run": record_json(run),
        "steps": [record_json(step) for step in steps],
        "now": now,
        "heartbeat_age_ms": now - run.heartbeat_at if run.heartbeat_at is not None else None,
        "lease_expires_in_ms": (
            run.lease_expires_at - now if run.lease_expires_at is not None else None
        ),
        "wakes_in_ms": run.wake_at - now if run.wake_at is not None else None,
        "waiting_for": run.waiting_for,
    }


def _wakes(wake_at: int | None, now: int) -> str:
    if wake_at is None:
        return ""
    return f"{when(wake_at)} ({'in ' + age(wake_at - now) if wake_at > now else 'due'})"


@runs.command("show")
@click.argument("run_id")
@storage_option
@json_option
def show_run(run_id: str, storage: str, as_json: bool) -> None:
    """Show one run: its state, lease, wake time, awaited event, steps and errors."""

    async def work() -> tuple[WorkflowRun, list[StepResult], int]:
        async with opened(storage) as store:
            run, now = await load_run(store, run_id, storage)
            return run, await store.get_step_results(run_id), now

    run, steps, now = run_command(work)
    if as_json:
        echo_json(_show_json(run, steps, now))
        return
    out = console()
    holder = run.holder
    fields = {
        "run": run.id,
        "workflow": run.workflow,
        "status": run.status.value,
        "key": run.idempotency_key or "",
        "claims": str(run.attempt),
        "recovered": str(run.recoveries) if run.recoveries else "",
        "held by": (
            f"worker {holder.worker} on {holder.host} (pid {holder.pid})" if holder else ""
        ),
        "claimed": when(run.claimed_at),
        "heartbeat": (
            f"{when(run.heartbeat_at)} ({age(now - run.heartbeat_at)} ago)"
            if run.heartbeat_at is not None
            else ""
        ),
        "lease to": (
            f"{when(run.lease_expires_at)} "
            + (
                f"(in {age(run.lease_expires_at - now)})"
                if run.lease_expires_at > now
                else f"(expired {age(now - run.lease_expires_at)} ago)"
            )
            if run.lease_expires_at is not None
            else ""
        ),
        "wakes": _wakes(run.wake_at, now),
        "awaits": f"event {run.waiting_for!r}" if run.waiting_for else "",
        "created": when(run.created_at),
        "updated": when(run.updated_at),
        "input": value_cell(run.input, 200),
        "output": (
            value_cell(run.output, 200)
            if run.status is RunStatus.COMPLETED or isinstance(run.output, DamagedValue)
            else ""
        ),
        "error": f"{run.error.type}: {run.error.message}" if run.error else "",
    }
    for key, text in fields.items():
        if text:
            # A Text, not markup: a stored value may hold brackets rich would interpret.
            line = Text.assemble((f"{key:>9}", "bold"), "  ", text)
            out.print(line, highlight=False, soft_wrap=True)
    table = Table(title="steps", title_justify="left")
    for column in ("step", "status", "attempts", "updated", "output / error"):
        table.add_column(column)
    for step in steps:
        detail = (
            Text(f"{step.error.type}: {step.error.message}")
            if step.error
            else value_cell(step.output)
        )
        table.add_row(
            Text(step.name), step.status.value, str(step.attempts), when(step.updated_at), detail
        )
    out.print(table)
    tracebacks = [(s.name, s.error.traceback) for s in steps if s.error and s.error.traceback]
    if run.error and run.error.traceback and not tracebacks:
        tracebacks.append(("run", run.error.traceback))
    for name, text in tracebacks:
        out.print(f"[bold]traceback of {name}[/bold]")
        out.print(text, markup=False, highlight=False, soft_wrap=True)


# -- explain ---------------------------------------------------------------------------


async def count_older_pending(store: StorageAdapter, run: WorkflowRun) -> int:
    """Pending runs of ``run``'s workflow created before it (up to :data:`COUNT_LIMIT`)."""
    count, before, before_id = 0, run.created_at, run.id
    while count < COUNT_LIMIT:
        page = await store.list_runs(
            RunFilter(
                status=RunStatus.PENDING,
                workflow=run.workflow,
                before=before,
                before_id=before_id,
                limit=min(1000, COUNT_LIMIT - count),
            )
        )
        count += len(page)
        if len(page) < 1000:
            break
        before, before_id = page[-1].created_at, page[-1].id
    return count


@runs.command("explain")
@click.argument("run_id")
@storage_option
@json_option
def explain_run(run_id: str, storage: str, as_json: bool) -> None:
    """Say in plain words why a run is where it is, and what to do about it."""

    async def work() -> Facts:
        async with opened(storage) as store:
            run, now = await load_run(store, run_id, storage)
            older = await count_older_pending(store, run) if run.status is RunStatus.PENDING else 0
            return Facts(run, await store.get_step_results(run_id), now, older)

    facts = run_command(work)
    result = explain(facts)
    if as_json:
        echo_json(
            {
                "run_id": facts.run.id,
                "status": facts.run.status.value,
                "situation": result.situation.value,
                "state": result.state,
                "details": result.details,
                "action": result.action,
                "damaged": [d.to_json() for d in damaged_values(facts.run, facts.steps)],
                "now": facts.now,
            }
        )
        return
    out = console()
    for sentence in result.sentences():
        out.print(sentence, soft_wrap=True, markup=False)
