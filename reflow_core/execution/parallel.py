"""Executor of a parallel group: named branches run concurrently, each checkpointed alone.

Each branch is a child task running the same attempt loop as a step (its own retry
policy and timeout) and writes its row the moment it finishes. So a branch that
completed is never executed again: not after a crash of this worker, and not after a
sibling failed and the run was resumed. The group itself has no row; its output
``{branch: output}`` is rebuilt from the branch rows on replay.

Failure, fail-fast (the default): the first branch to fail for good is the cause. Its
siblings are cancelled at once (task cancellation, and their cancel signal for plain
``def`` branches running in threads) and write nothing; only the cause gets a
``failed`` row and becomes the run's error. With ``fail_fast=False`` every branch runs
to its end, each failure is recorded, and the run fails with the first one.

A control-flow stop of the run (cancelled, lease lost, engine stopped) cancels every
branch and propagates. All branches see the ``steps`` and ``prev`` of the moment the
group started, on first execution and on replay alike.
"""

from __future__ import annotations

import asyncio
import time
import typing
from dataclasses import dataclass, field
from typing import Any

from reflow_core import codec
from reflow_core.context import CancelSignal
from reflow_core.errors import ConfigError, ControlFlow, SerializationError
from reflow_core.events import StepCompleted, StepStarted
from reflow_core.execution.attempts import run_attempts
from reflow_core.execution.run import Outcome, RunExecution, describe_error, executor
from reflow_core.execution.step import step_failed
from reflow_core.types import ErrorInfo, StepResult, StepStatus
from reflow_core.workflow import ParallelUnit, StepUnit

__all__ = ["run_parallel"]

_Output = tuple[Any, bytes | None]
"""A branch's output as plain data, with its encoding when already computed."""


@dataclass(slots=True)
class _Group:
    """The branches of one group executing in this claim."""

    unit: ParallelUnit
    tasks: dict[str, asyncio.Task[_Output | None]] = field(default_factory=dict)
    scopes: dict[str, set[CancelSignal]] = field(default_factory=dict)
    failure: ErrorInfo | None = None
    """The causing branch's error (the first failure)."""
    abort: BaseException | None = None
    """A control-flow stop or an unexpected error raised inside a branch."""
    started: float | None = None
    """When the branches started (monotonic), if observers were listening then."""

    def duration(self) -> float | None:
        """Seconds since the branches started (``None`` if that was not recorded)."""
        return None if self.started is None else time.monotonic() - self.started

    def cancel_siblings(self, cause: str, reason: ControlFlow) -> None:
        """Stop every other unfinished branch; they write nothing."""
        for name, task in self.tasks.items():
            if name != cause and not task.done():
                for signal in list(self.scopes[name]):
                    signal.set(reason)
                task.cancel()


async def _fail(
    ex: RunExecution, group: _Group, unit: StepUnit, error: BaseException, n: int
) -> None:
    fail_fast = group.unit.fail_fast
    if fail_fast and group.failure is not None:
        return  # a sibling failed first: this branch is not the cause, record nothing
    info = describe_error(error, unit.name)
    if group.failure is None:
        group.failure = info
    if fail_fast:
        # Before the write: the siblings stop now, not one storage round trip later.
        group.cancel_siblings(
            unit.name,
            ControlFlow(f"branch {unit.name!r} of parallel group {group.unit.name!r} failed"),
        )
    await ex.save(unit.name, StepStatus.FAILED, error=info, attempts=n)
    await step_failed(ex, unit.name, info, n, group.started)


async def _execute_branch(ex: RunExecution, group: _Group, unit: StepUnit) -> _Output | None:
    """Run one branch and checkpoint it; ``None`` if it failed."""
    result = await run_attempts(ex, unit, scope=group.scopes[unit.name], may_suspend=False)
    error: BaseException | None = result.error
    if error is None and result.early:
        error = ConfigError(
            f"ctx.complete() is not allowed in parallel branch {unit.name!r}: a branch cannot "
            "end the whole workflow; complete early in a step after the group"
        )
    if error is None:
        try:
            plain = codec.to_plain(result.value, unit.output_type)
            encoded = codec.encode(plain)
        except SerializationError as exc:
            error = SerializationError(
                f"branch {unit.name!r} returned a value that cannot be stored: {exc}", exc.path
            )
    if error is not None:
        await _fail(ex, group, unit, error, result.attempts)
        return None
    await ex.save(unit.name, StepStatus.COMPLETED, output=plain, attempts=result.attempts)
    if ex.listening:
        await ex.emit(
            StepCompleted,
            step=unit.name,
            output=codec.decode(encoded),
            attempts=result.attempts,
            duration=group.duration(),
        )
    return plain, encoded


async def _branch(ex: RunExecution, group: _Group, unit: StepUnit) -> _Output | None:
    try:
        return await _execute_branch(ex, group, unit)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        # Lease lost while saving, storage down, ...: the whole group must stop with it.
        if group.abort is None:
            group.abort = exc
        group.cancel_siblings(
            unit.name, exc if isinstance(exc, ControlFlow) else ControlFlow(str(exc))
        )
        raise


async def _run_branches(
    ex: RunExecution, group: _Group, todo: list[StepUnit]
) -> dict[str, _Output]:
    for unit in todo:
        group.scopes[unit.name] = set()
        group.tasks[unit.name] = asyncio.create_task(
            _branch(ex, group, unit), name=f"reflow-branch-{ex.run.id}-{unit.name}"
        )
    tasks = list(group.tasks.values())
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        # The run itself was stopped: no branch may outlive it.
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise
    finally:
        for task in tasks:  # mark every outcome as seen (no "never retrieved" noise)
            if task.done() and not task.cancelled():
                task.exception()
    if group.abort is not None:
        raise group.abort
    outputs: dict[str, _Output] = {}
    for name, task in group.tasks.items():
        value = None if task.cancelled() else task.result()
        if value is not None:
            outputs[name] = value
    return outputs


_MERGED_TYPES: dict[int, tuple[ParallelUnit, Any]] = {}


def _merged_type(unit: ParallelUnit) -> Any:
    """A TypedDict of the branches' declared output types, so ``prev`` after the group
    holds each branch's output as its type; ``None`` when no branch declares one."""
    cached = _MERGED_TYPES.get(id(unit))
    if cached is not None and cached[0] is unit:
        return cached[1]
    fields = {name: branch.output_type for name, branch in unit.branches.items()}
    merged: Any = None
    if any(declared is not None for declared in fields.values()):
        make: Any = typing.TypedDict  # the functional form, with fields known only now
        merged = make(
            f"{unit.name}_outputs",
            {name: Any if declared is None else declared for name, declared in fields.items()},
        )
    _MERGED_TYPES[id(unit)] = (unit, merged)
    return merged


def _first(rows: list[StepResult]) -> ErrorInfo | None:
    return min(rows, key=lambda row: (row.updated_at, row.id)).error if rows else None


@executor(ParallelUnit)
async def run_parallel(ex: RunExecution, unit: ParallelUnit) -> Outcome:
    """Reuse finished branches, run the others concurrently, and merge their outputs."""
    outputs: dict[str, _Output] = {}
    failed: list[StepResult] = []
    todo: list[StepUnit] = []
    for name, branch in unit.branches.items():
        row = ex.rows.get(name)
        if row is not None and row.status is StepStatus.COMPLETED:
            outputs[name] = (row.output, None)
        elif row is not None and row.status is StepStatus.FAILED and row.error is not None:
            failed.append(row)  # final until a resume deletes it
        else:
            todo.append(branch)
    if failed and (unit.fail_fast or not todo):
        ex.failure = _first(failed)
        return Outcome.FAIL
    group = _Group(unit)
    if todo:
        if ex.listening:
            group.started = time.monotonic()
            for branch in todo:
                row = ex.rows.get(branch.name)
                first = row.attempts + 1 if row is not None else 1
                await ex.emit(StepStarted, step=branch.name, attempt=first)
        outputs.update(await _run_branches(ex, group, todo))
    if failed or group.failure is not None:
        # A failure recorded by an earlier claim happened before any of this claim's.
        ex.failure = _first(failed) or group.failure
        return Outcome.FAIL
    merged: dict[str, Any] = {}
    for name, branch in unit.branches.items():
        plain, encoded = outputs[name]
        ex.record(name, plain, branch.output_type, encoded)
        merged[name] = plain
    ex.record(unit.name, merged, _merged_type(unit))
    return Outcome.ADVANCE
