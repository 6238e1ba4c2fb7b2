"""``reflow runs cancel|resume|retry|purge``: the commands that change runs.

Each change is one conditional write of the storage contract, so a run that moved on
meanwhile (completed while being cancelled, say) is refused, not overwritten. Added to
the ``runs`` group by :func:`reflow_cli.app.build_cli`.
"""

from __future__ import annotations

from typing import Any

import click

from reflow_cli.commands.runs import ACTIVE
from reflow_cli.common import Refused, console, echo_json, json_option, storage_option
from reflow_cli.db import opened, run_command
from reflow_cli.text import when
from reflow_core.durations import to_millis
from reflow_core.errors import ConfigError
from reflow_core.identifiers import new_run_id
from reflow_core.retention import purge_before
from reflow_core.storage import TERMINAL_STATUSES, StorageAdapter
from reflow_core.types import DamagedValue, RunFilter, RunStatus, WorkflowRun

__all__ = ["ACTIONS"]

PURGE_BATCH = 500
"""Runs deleted per ``purge_runs`` call: small enough that no call holds locks long."""


# -- cancel, resume, retry -------------------------------------------------------------


def _outcome(as_json: bool, data: dict[str, Any], text: str) -> None:
    if as_json:
        echo_json(data)
    else:
        console().print(text, soft_wrap=True, markup=False)


@click.command("cancel")
@click.argument("run_id")
@storage_option
@json_option
def cancel_run(run_id: str, storage: str, as_json: bool) -> None:
    """Cancel a pending, running, sleeping or waiting run (a running one stops at its
    worker's next heartbeat). Refused (exit 1) for a run that has ended."""

    async def work() -> None:
        async with opened(storage) as store:
            if await store.update_run_status(run_id, RunStatus.CANCELLED, expected=ACTIVE):
                return
            run = await store.get_run(run_id)
            if run is None:
                raise Refused(f"no run with id {run_id!r} in {storage}")
            raise Refused(
                f"run {run_id} is {run.status.value}; only unfinished runs can be cancelled"
            )

    run_command(work)
    _outcome(as_json, {"run_id": run_id, "status": "cancelled"}, f"cancelled run {run_id}")


@click.command("resume")
@click.argument("run_id")
@storage_option
@json_option
def resume_run(run_id: str, storage: str, as_json: bool) -> None:
    """Put a failed or cancelled run back to pending; it continues at the step that
    failed, keeping completed steps. Refused (exit 1) for any other status."""

    async def work() -> None:
        async with opened(storage) as store:
            if await store.requeue_run(run_id):
                return
            run = await store.get_run(run_id)
            if run is None:
                raise Refused(f"no run with id {run_id!r} in {storage}")
            raise Refused(
                f"run {run_id} is {run.status.value}; only failed or cancelled runs can be resumed"
            )

    run_command(work)
    _outcome(as_json, {"run_id": run_id, "status": "pending"}, f"resumed run {run_id}: pending")


@click.command("retry")
@click.argument("run_id")
@storage_option
@json_option
def retry_run(run_id: str, storage: str, as_json: bool) -> None:
    """Start a new run of a failed or cancelled run's workflow with the same input, from
    the first step; the original run is kept as it is. Prints the new run's id (the new
    run has no idempotency key, so it never collides with the original's)."""

    async def work() -> WorkflowRun:
        async with opened(storage) as store:
            run = await store.get_run(run_id)
            if run is None:
                raise Refused(f"no run with id {run_id!r} in {storage}")
            if run.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
                raise Refused(
                    f"run {run_id} is {run.status.value}; only failed or cancelled runs can "
                    "be retried (to continue one where it stopped: reflow runs resume)"
                )
            if isinstance(run.input, DamagedValue):
                raise Refused(
                    f"the input of run {run_id} cannot be decoded ({run.input.error}), so a "
                    "retry would fail the same way; enqueue a new run with a correct input "
                    "from your application"
                )
            now = await store.now()
            fresh = WorkflowRun(
                id=new_run_id(),
                workflow=run.workflow,
                input=run.input,
                status=RunStatus.PENDING,
                created_at=now,
                updated_at=now,
            )
            return (await store.create_run(fresh)).run

    created = run_command(work)
    _outcome(
        as_json,
        {"run_id": created.id, "retry_of": run_id, "status": created.status.value},
        f"new run {created.id} of {created.workflow!r} (retry of {run_id}): pending",
    )


# -- purge -----------------------------------------------------------------------------


async def count_purgeable(
    store: StorageAdapter, cutoff: int, statuses: frozenset[RunStatus]
) -> int:
    """How many runs ``purge_runs`` would delete: finished, ``updated_at < cutoff``."""
    total = 0
    for status in sorted(statuses):
        before: int | None = None
        before_id: str | None = None
        while True:
            page = await store.list_runs(
                RunFilter(status=status, before=before, before_id=before_id, limit=1000)
            )
            total += sum(1 for run in page if run.updated_at < cutoff)
            if len(page) < 1000:
                break
            before, before_id = page[-1].created_at, page[-1].id
    return total


@click.command("purge")
@storage_option
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="Delete finished runs last updated longer ago than this (30d, 12h).",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(sorted(s.value for s in TERMINAL_STATUSES)),
    help="Only runs with this status (repeatable; default: every finished status).",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.option(
    "--batch", type=click.IntRange(min=1, max=10_000), default=PURGE_BATCH, show_default=True
)
@json_option
def purge_runs(
    storage: str,
    older_than: str,
    statuses: tuple[str, ...],
    dry_run: bool,
    batch: int,
    as_json: bool,
) -> None:
    """Delete finished runs (with their steps and events) older than --older-than, in
    batches. Pending, running, sleeping and waiting runs are never touched."""
    try:
        keep_ms = to_millis(older_than, what="--older-than")
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    chosen = frozenset(RunStatus(s) for s in statuses) or TERMINAL_STATUSES

    async def work() -> tuple[int, int]:
        async with opened(storage) as store:
            cutoff = await store.now() - keep_ms
            if dry_run:
                return cutoff, await count_purgeable(store, cutoff, chosen)
            deleted = await purge_before(
                store, finished_before=cutoff, batch=batch, statuses=chosen
            )
            return cutoff, deleted

    cutoff, count = run_command(work)
    statuses_text = ", ".join(sorted(chosen))
    verb = "would delete" if dry_run else "deleted"
    _outcome(
        as_json,
        {
            "dry_run": dry_run,
            "cutoff": cutoff,
            "statuses": sorted(chosen),
            "would_delete" if dry_run else "deleted": count,
        },
        f"{verb} {count} run(s) ({statuses_text}) last updated before {when(cutoff)}",
    )


ACTIONS = (cancel_run, resume_run, retry_run, purge_runs)
"""The commands that change runs, for the ``runs`` group."""
