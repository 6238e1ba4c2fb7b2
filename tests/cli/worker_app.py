"""A small app for ``reflow worker`` tests, imported by the worker processes.

``quick`` doubles a number. ``hold`` writes ``<dir>/<name>.started`` and then waits
until ``<dir>/<name>.go`` exists, so a test decides exactly when (or whether) it ends.
It is an async step: an engine that stops interrupts it at its next ``await``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from reflow_core import Engine, StepContext, Workflow

quick: Workflow[Any] = Workflow("quick")
hold: Workflow[Any] = Workflow("hold")


@quick.step
def double(ctx: StepContext[Any]) -> int:
    return int(ctx.input["n"]) * 2


@hold.step
async def wait_for_go(ctx: StepContext[Any]) -> str:
    folder = Path(ctx.input["dir"])
    name = ctx.input["name"]
    (folder / f"{name}.started").write_text(str(ctx.attempt))
    while not (folder / f"{name}.go").exists():  # noqa: ASYNC110 - set by another process
        await asyncio.sleep(0.02)
    return name


@hold.step
def after(ctx: StepContext[Any]) -> str:
    return f"{ctx.prev} done"


workflows = [quick, hold]


def make_workflows() -> list[Workflow[Any]]:
    """A zero-argument factory, as ``worker_app:make_workflows``."""
    return [quick, hold]


engine = Engine("memory://", [quick, hold], concurrency=2)
"""An Engine target (no I/O at import: an Engine binds storage only when started)."""

not_a_workflow = 42
