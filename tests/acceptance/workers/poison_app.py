"""The app of the poison fleet test (``test_poison_fleet.py``), run by ``reflow worker
poison_app:workflows`` (imported by every worker process through PYTHONPATH).

One good workflow and one per kind of poison:

* :data:`GOOD` (``good``): three steps; its output is :func:`expected_output` of its input.
* :data:`SYSEXIT` (``sysexit``): a plain ``def`` step calls ``sys.exit(3)``.
* :data:`CANCELLED` (``cancelled``): an ``async`` step raises a ``CancelledError`` of its
  own: ``{"how": "raise"}`` raises one, ``{"how": "await"}`` awaits a task it cancelled.
* :data:`HARDEXIT` (``hardexit``, ``max_recoveries=2``): ``prepare`` returns a value,
  then ``die`` calls ``os._exit(1)``, killing whatever process runs it.
* :data:`UNSTORABLE` (``unstorable``): a step returns a ``set``, which cannot be stored.

Every poison step first appends ``<workflow> <step> <run> <pid>`` to the ledger file named
by the environment variable :data:`LEDGER_ENV` (if set), with one ``write`` on an
``O_APPEND`` descriptor, so lines from concurrent processes never interleave and a line
is in the file (the kernel's page cache) before ``os._exit`` can lose anything. The test
matches those pids against the supervisor's log: which processes died, which stopped.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from reflow_core import StepContext, Workflow

__all__ = [
    "CANCELLED",
    "GOOD",
    "HARDEXIT",
    "LEDGER_ENV",
    "MAX_RECOVERIES",
    "SYSEXIT",
    "UNSTORABLE",
    "expected_output",
    "read_ledger",
    "workflows",
]

LEDGER_ENV = "REFLOW_POISON_LEDGER"
MAX_RECOVERIES = 2

GOOD: Workflow[Any] = Workflow("good")
SYSEXIT: Workflow[Any] = Workflow("sysexit")
CANCELLED: Workflow[Any] = Workflow("cancelled")
HARDEXIT: Workflow[Any] = Workflow("hardexit", max_recoveries=MAX_RECOVERIES)
UNSTORABLE: Workflow[Any] = Workflow("unstorable")


def _record(ctx: StepContext[Any], workflow: str, step: str) -> None:
    """Append this execution to the ledger: one atomic ``O_APPEND`` write, no buffering."""
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return
    line = f"{workflow} {step} {ctx.run_id} {os.getpid()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_ledger(path: Path) -> list[tuple[str, str, str, int]]:
    """Every execution the ledger recorded: ``(workflow, step, run_id, pid)`` in order."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        workflow, step, run_id, pid = line.split()
        rows.append((workflow, step, run_id, int(pid)))
    return rows


# -- good ------------------------------------------------------------------------------


@GOOD.step
async def add(ctx: StepContext[Any]) -> int:
    await asyncio.sleep(0.01)  # a moment in flight, so a dying process may hold some
    return int(ctx.input["n"]) + 1


@GOOD.step
def double(ctx: StepContext[Any]) -> int:
    return int(ctx.prev) * 2


@GOOD.step
async def report(ctx: StepContext[Any]) -> dict[str, Any]:
    return {"n": ctx.input["n"], "added": ctx.steps["add"], "doubled": ctx.prev}


def expected_output(n: int) -> dict[str, Any]:
    """The output of a completed ``good`` run of input ``{"n": n}``."""
    return {"n": n, "added": n + 1, "doubled": (n + 1) * 2}


# -- poison ----------------------------------------------------------------------------


@SYSEXIT.step
def exits(ctx: StepContext[Any]) -> None:
    _record(ctx, "sysexit", "exits")
    sys.exit(3)


@CANCELLED.step
async def cancels(ctx: StepContext[Any]) -> None:
    _record(ctx, "cancelled", "cancels")
    if ctx.input["how"] == "raise":
        raise asyncio.CancelledError("the step's own cancellation")
    victim = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    victim.cancel()
    await victim  # raises the victim's CancelledError here, in the step's own task


@HARDEXIT.step
def prepare(ctx: StepContext[Any]) -> str:
    _record(ctx, "hardexit", "prepare")
    return "prepared"


@HARDEXIT.step
def die(ctx: StepContext[Any]) -> None:
    _record(ctx, "hardexit", "die")
    os._exit(1)


@UNSTORABLE.step
def returns_a_set(ctx: StepContext[Any]) -> Any:
    _record(ctx, "unstorable", "returns_a_set")
    return {1, 2, 3}


workflows = [GOOD, SYSEXIT, CANCELLED, HARDEXIT, UNSTORABLE]
