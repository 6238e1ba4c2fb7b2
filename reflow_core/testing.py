"""Test helpers: run a workflow to completion in memory and look at what each step returned.

>>> from reflow_core import Workflow
>>> from reflow_core.testing import run_workflow
>>> wf = Workflow("double")
>>> @wf.step
... def double(ctx) -> int:
...     return ctx.input * 2
>>> result = run_workflow(wf, 21)
>>> result.status.value, result.output, result.outputs["double"]
('completed', 42, 42)

The storage is the in-memory adapter, found through the ``reflow`` entry points like
any other; pass ``storage=`` to use another. For ``async`` tests use
:func:`run_workflow_async`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from reflow_core.engine import Engine
from reflow_core.errors import ConfigError
from reflow_core.registry import open_storage
from reflow_core.storage import Clock, StorageAdapter
from reflow_core.types import ErrorInfo, RunStatus, StepResult, WorkflowRun
from reflow_core.workflow import Workflow

__all__ = ["WorkflowResult", "run_workflow", "run_workflow_async"]


@dataclass(frozen=True)
class WorkflowResult:
    """What a test wants to know about a finished run."""

    run: WorkflowRun
    steps: list[StepResult]

    @property
    def status(self) -> RunStatus:
        """The run's final status."""
        return self.run.status

    @property
    def output(self) -> Any:
        """The run's output (``None`` unless completed)."""
        return self.run.output

    @property
    def error(self) -> ErrorInfo | None:
        """Why the run failed, if it did."""
        return self.run.error

    @property
    def outputs(self) -> dict[str, Any]:
        """Outputs of completed steps by name (skipped steps are absent)."""
        return {
            s.name: s.output for s in self.steps if s.status in ("completed", "completed-early")
        }

    @property
    def step_statuses(self) -> dict[str, str]:
        """Every step row's status by name (``skipped`` shows as skipped, not failed)."""
        return {s.name: s.status.value for s in self.steps}


async def run_workflow_async(
    workflow: Workflow[Any],
    input: Any = None,
    *,
    storage: StorageAdapter | None = None,
    clock: Clock | None = None,
    hooks: list[object] | None = None,
) -> WorkflowResult:
    """Enqueue one run and execute claimable runs until none is left; return the result."""
    owned = storage is None
    store = storage if storage is not None else open_storage("memory://", clock=clock)
    engine = Engine(store, [workflow], clock=clock, hooks=hooks or (), poll_interval=0.01)
    try:
        run = await engine.enqueue(workflow, input)
        await engine.run_until_idle()
        view = await engine.get_run(run.id)
        if view is None:  # pragma: no cover - the run was just created
            raise ConfigError(f"run {run.id} vanished from storage")
        return WorkflowResult(run=view.run, steps=view.steps)
    finally:
        await engine.stop()
        if owned:
            await store.close()


def run_workflow(
    workflow: Workflow[Any],
    input: Any = None,
    *,
    storage: StorageAdapter | None = None,
    clock: Clock | None = None,
    hooks: list[object] | None = None,
) -> WorkflowResult:
    """Synchronous :func:`run_workflow_async` (must not be called from a running loop)."""
    return asyncio.run(
        run_workflow_async(workflow, input, storage=storage, clock=clock, hooks=hooks)
    )
