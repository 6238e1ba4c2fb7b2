"""``reflow events send RUN NAME``: deliver an event to a run from the command line."""

from __future__ import annotations

import json
from typing import Any

import click

from reflow_cli.common import Refused, console, echo_json, json_option, storage_option
from reflow_cli.db import opened, run_command

__all__ = ["events"]


@click.group()
def events() -> None:
    """Send events to runs."""


@events.command("send")
@click.argument("run_id")
@click.argument("name")
@click.option("--payload", metavar="JSON", help="The event's payload as JSON (default: null).")
@click.option("--key", metavar="K", help="Deduplication key: sending again with it is a no-op.")
@storage_option
@json_option
def send(
    run_id: str, name: str, payload: str | None, key: str | None, storage: str, as_json: bool
) -> None:
    """Deliver event NAME to run RUN_ID; it is buffered durably until the run takes it.

    The payload is stored as given: the workflow validates it against the wait's
    declared type when the run consumes it (send from the application with
    engine.send_event to have it validated at once). Refused (exit 1) when the run does
    not exist or has ended.
    """
    value: Any = None
    if payload is not None:
        try:
            value = json.loads(payload)
        except ValueError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--payload") from None

    async def work() -> None:
        async with opened(storage) as store:
            if await store.deliver_event(run_id, name, value, key=key):
                return
            run = await store.get_run(run_id)
            if run is None:
                raise Refused(f"no run with id {run_id!r} in {storage}")
            raise Refused(f"run {run_id} is {run.status.value}; an ended run takes no events")

    run_command(work)
    if as_json:
        echo_json({"run_id": run_id, "event": name, "key": key, "delivered": True})
    else:
        console().print(f"delivered event {name!r} to run {run_id}", markup=False)
