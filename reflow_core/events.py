"""Engine events: what hooks receive and what :meth:`Engine.stream` yields.

Each event names its run and workflow. Outputs are the checkpointed values (what a
replay would see), not the objects a step returned.
"""

from __future__ import annotations

from typing import Any

import msgspec

from reflow_core.types import ErrorInfo

__all__ = [
    "EngineEvent",
    "RunCompleted",
    "RunFailed",
    "RunStarted",
    "StepCompleted",
    "StepSkipped",
    "StepStarted",
]


class RunStarted(msgspec.Struct, frozen=True, kw_only=True, tag="run_started"):
    """A worker claimed a run; ``attempt`` > 1 means it resumes after a crash or wake."""

    run_id: str
    workflow: str
    attempt: int


class StepStarted(msgspec.Struct, frozen=True, kw_only=True, tag="step_started"):
    """A step is about to execute its first attempt in this claim."""

    run_id: str
    workflow: str
    step: str


class StepCompleted(msgspec.Struct, frozen=True, kw_only=True, tag="step_completed"):
    """A step's result was checkpointed."""

    run_id: str
    workflow: str
    step: str
    output: Any
    attempts: int


class StepSkipped(msgspec.Struct, frozen=True, kw_only=True, tag="step_skipped"):
    """A conditional step was skipped."""

    run_id: str
    workflow: str
    step: str


class RunCompleted(msgspec.Struct, frozen=True, kw_only=True, tag="run_completed"):
    """A run completed with ``output``."""

    run_id: str
    workflow: str
    output: Any


class RunFailed(msgspec.Struct, frozen=True, kw_only=True, tag="run_failed"):
    """A run failed at ``error.step``."""

    run_id: str
    workflow: str
    error: ErrorInfo


EngineEvent = RunStarted | StepStarted | StepCompleted | StepSkipped | RunCompleted | RunFailed
"""Any engine event."""
