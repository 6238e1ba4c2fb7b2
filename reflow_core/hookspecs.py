"""Hook specifications: what a plugin in the ``reflow`` entry-point group may implement.

Every hook is prefixed ``reflow_``. Implement them with :data:`hookimpl`::

    from reflow_core import hookimpl

    @hookimpl
    def reflow_run_completed(event):
        print("done:", event.run_id)

Adapter plugins answer :func:`reflow_adapters`; observer plugins implement any of the
lifecycle hooks, which every engine in the process fires. A lifecycle hook that raises
never changes a run's outcome: the error is reported through ``reflow_error``.

Each lifecycle hook receives one event of :mod:`reflow_core.events`, which carries its
timestamps (``at``, ``monotonic``) and, where something ends, its ``duration``. Events are
built only when some hook or stream listens, so an engine with no observer pays nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from reflow_core.events import (
        LeaseLost,
        RetryScheduled,
        RunCancelled,
        RunCompleted,
        RunFailed,
        RunInterrupted,
        RunStarted,
        RunSuspended,
        StepCompleted,
        StepFailed,
        StepSkipped,
        StepStarted,
    )
    from reflow_core.registry import AdapterSpec

PROJECT = "reflow"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "hookimpl", "hookspec"]


@hookspec
def reflow_adapters() -> list[AdapterSpec]:  # type: ignore[empty-body]
    """Return the storage adapters this plugin provides."""


@hookspec
def reflow_run_started(event: RunStarted) -> None:
    """A worker claimed a run and starts (or resumes) executing it."""


@hookspec
def reflow_step_started(event: StepStarted) -> None:
    """A step's first attempt is about to run."""


@hookspec
def reflow_step_completed(event: StepCompleted) -> None:
    """A step's result was checkpointed."""


@hookspec
def reflow_step_skipped(event: StepSkipped) -> None:
    """A conditional step's predicate was false; the skip was recorded."""


@hookspec
def reflow_step_failed(event: StepFailed) -> None:
    """A step failed for good and its error was checkpointed; the run fails next."""


@hookspec
def reflow_retry_scheduled(event: RetryScheduled) -> None:
    """An attempt of a step failed and another was scheduled (the failure is stored)."""


@hookspec
def reflow_run_completed(event: RunCompleted) -> None:
    """A run completed and its output was stored."""


@hookspec
def reflow_run_failed(event: RunFailed) -> None:
    """A run failed and its error was stored."""


@hookspec
def reflow_run_suspended(event: RunSuspended) -> None:
    """A run was suspended (sleep, wait for an event, durable retry); lease released."""


@hookspec
def reflow_run_cancelled(event: RunCancelled) -> None:
    """A run was cancelled by this engine, or this engine stopped executing a cancelled run."""


@hookspec
def reflow_lease_lost(event: LeaseLost) -> None:
    """This engine lost a run's lease and stopped executing it without writing."""


@hookspec
def reflow_run_interrupted(event: RunInterrupted) -> None:
    """This engine stopped executing a run without an outcome (engine stop, storage error)."""


@hookspec
def reflow_error(error: BaseException) -> None:
    """Something went wrong outside any run's outcome: a hook, a poll, a schedule."""
