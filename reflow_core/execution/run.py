"""The replay loop of one claimed run.

Units run in definition order. A unit with a final checkpoint is replayed (its stored
output becomes ``prev``; nothing re-executes); the first unit without one executes.
The run ends by completing (output stored on the run), failing (error stored, the
on-failure handler run first), suspending (sleep or wait: lease released), or by a
control-flow stop (cancelled, lease lost, engine stopped), which writes nothing except
that a stopping engine releases the lease so another worker can resume at once.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from reflow_core import codec
from reflow_core.context import CancelSignal, StepContext, StepOutputs
from reflow_core.errors import (
    ControlFlow,
    DamagedValueError,
    EngineStoppedError,
    HookError,
    LeaseExpiredError,
    RecoveryLimitError,
    ReflowError,
    RunCancelledError,
    StorageError,
)
from reflow_core.events import (
    EngineEvent,
    LeaseLost,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunInterrupted,
    RunStarted,
)
from reflow_core.execution.active import FENCED, ActiveRun, Runtime
from reflow_core.types import (
    ClaimedRun,
    DamagedValue,
    ErrorInfo,
    RunStatus,
    StepResult,
    StepStatus,
)
from reflow_core.workflow import FailureContext, Workflow

__all__ = ["Outcome", "RunContext", "RunExecution", "describe_error", "step_id"]

_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 2.0

log = logging.getLogger("reflow.runs")
"""One record per run outcome this engine saw, with ``run_id``, ``workflow``, ``step``
and ``attempt`` (the run's claim count) as ``extra`` fields: failures and lost leases at
WARNING, cancellations and releases at INFO, claims, suspensions and completions at
DEBUG. Embedded engines log the same as workers."""

step_log = logging.getLogger("reflow.steps")
"""One record per step failure and scheduled retry (INFO: the run's failure is logged
on ``reflow.runs`` at WARNING), with ``run_id``,
``workflow``, ``step`` and ``attempt`` (the step's attempt) as ``extra`` fields."""


def step_id(run_id: str, name: str) -> str:
    """The row id of unit ``name`` of run ``run_id``: deterministic, so a re-executed step
    updates its row in place instead of adding a second one.

    ``<run id>/<name>`` (every id the engine generates has no ``/``). Distinct pairs
    always get distinct ids: a run id containing ``/`` gets ``/<length>/<run id>/<name>``
    instead, which no plain id can equal (a run id is never empty, so a plain id never
    starts with ``/``), so step ``a/b`` of run ``x`` and step ``b`` of run ``x/a`` do
    not collide. At most 516 characters for two 255-character identifiers.

    >>> step_id("x", "a/b"), step_id("x/a", "b")
    ('x/a/b', '/3/x/a/b')
    """
    if "/" in run_id:
        return f"/{len(run_id)}/{run_id}/{name}"
    return f"{run_id}/{name}"


def describe_error(error: BaseException, step: str | None = None) -> ErrorInfo:
    """An exception as stored: type, message, code and traceback text."""
    kind = type(error)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return ErrorInfo(
        type=name,
        message=str(error),
        code=error.code if isinstance(error, ReflowError) else None,
        traceback="".join(traceback.format_exception(error)),
        step=step,
    )


class Outcome(enum.Enum):
    """What a unit executor tells the replay loop."""

    ADVANCE = "advance"
    """The unit produced an output; it is the next ``prev``."""
    PASS = "pass"
    """The unit produced no output (skipped); ``prev`` is unchanged."""
    SUSPEND = "suspend"
    """The run was suspended (sleep, wait) and its lease released; stop here."""
    COMPLETE = "complete"
    """The unit completed the run early with its output."""
    FAIL = "fail"
    """The unit failed for good; ``execution.failure`` says why."""


# The outcomes and statuses the hot path reads, as module constants: every read of
# ``Outcome.ADVANCE`` goes through EnumType's ``__getattr__`` hook (about 50 ns, against
# 6 ns for a module constant; several reads per step: 3% of a run on the memory adapter).
ADVANCE, SUSPEND, COMPLETE, FAIL = (
    Outcome.ADVANCE,
    Outcome.SUSPEND,
    Outcome.COMPLETE,
    Outcome.FAIL,
)
_COMPLETED = RunStatus.COMPLETED

UnitExecutor = Callable[["RunExecution", Any], Awaitable[Outcome]]
_EXECUTORS: dict[type[Any], UnitExecutor] = {}


def executor(kind: type[Any]) -> Callable[[UnitExecutor], UnitExecutor]:
    """Register the executor of a unit kind (used by the sibling modules)."""

    def register(fn: UnitExecutor) -> UnitExecutor:
        _EXECUTORS[kind] = fn
        return fn

    return register


_NOT_LOADED: Any = object()


class RunContext(StepContext[Any]):
    """The context the engine hands a step: ``prev`` and ``steps`` are read from the
    execution when the step asks for them, rather than built for every attempt (most
    steps read neither)."""

    __slots__ = ("_count", "_execution", "_prev_name", "_view")

    def __init__(self, ex: RunExecution, step: str, attempt: int, signal: CancelSignal) -> None:
        # The base __init__ is skipped on purpose: it would store a loader and a view.
        run = ex.run
        self.run_id = run.id
        self.workflow = run.workflow
        self.step = step
        self.attempt = attempt
        self.input = ex.input
        self.cancel = signal
        self._execution = ex
        self._prev_name = ex.prev_name
        self._count = len(ex._order)  # ``steps`` is the outputs recorded by now
        self._prev = _NOT_LOADED
        self._view: StepOutputs | None = None

    @property
    def prev(self) -> Any:
        """Output of the previous unit that produced one (a fresh copy)."""
        if self._prev is _NOT_LOADED:
            name = self._prev_name
            self._prev = self._execution.output(name) if name else None
        return self._prev

    @property
    def steps(self) -> StepOutputs:
        """Every earlier unit's output by name, as of this step's start."""
        view = self._view
        if view is None:
            ex = self._execution
            view = self._view = StepOutputs(ex._order, ex.output, self._count)
        return view


class RunExecution:
    """State of one claimed run while this engine executes it."""

    # One per claim: slots make building it (and every attribute read) cheaper.
    __slots__ = (
        "_encoded",
        "_order",
        "_step_ids",
        "_types",
        "active",
        "current",
        "ended",
        "failure",
        "input",
        "observers",
        "prev_name",
        "rows",
        "run",
        "runtime",
        "started",
        "storage",
        "workflow",
    )

    def __init__(
        self, runtime: Runtime, claimed: ClaimedRun, workflow: Workflow[Any], active: ActiveRun
    ) -> None:
        self.runtime = runtime
        self.storage = runtime.storage
        self.run = claimed.run
        # Every step row's id is this plus the step's name (see step_id): made once.
        self._step_ids = step_id(claimed.run.id, "")
        self.workflow = workflow
        self.active = active
        self.rows: dict[str, StepResult] = {}
        self.input: Any = None
        self.failure: ErrorInfo | None = None
        self._encoded: dict[str, bytes] = {}
        # Name -> position among recorded outputs, only growing: each context's ``steps``
        # views a prefix of it rather than copying it.
        self._order: dict[str, int] = {}
        self._types: dict[str, Any] = {}
        self.prev_name: str | None = None
        self.current: str | None = None
        """The unit executing now (what a stop or a lost lease interrupted)."""
        self.started = time.monotonic()
        """When this claim's execution began (monotonic seconds)."""
        self.ended = False
        """Whether the event ending this claim was sent (see :meth:`ended_with`)."""
        self.observers = runtime.observers
        """Where this run's events go: build an event only if its kind is in
        ``observers.wanted`` (read there each time: a stream may subscribe mid-run)."""

    @property
    def listening(self) -> bool:
        """Whether any hook or stream takes events: build none otherwise."""
        return self.observers.listening

    def emit(self, kind: type[EngineEvent], **fields: Any) -> Awaitable[None]:
        """Send an event of ``kind`` about this run, stamped now (call when listening).

        A plain function handing back the delivery to await: no frame of its own.
        """
        event: Any = kind(
            run_id=self.run.id, workflow=self.run.workflow, at=self.runtime.clock(), **fields
        )
        return self.observers.emit(event)

    async def ended_with(self, kind: type[EngineEvent], **fields: Any) -> None:
        """Send the event that ends this claim (once), with its attempt and duration."""
        self.ended = True
        if kind in self.observers.wanted:
            await self.emit(kind, attempt=self.run.attempt, duration=self.elapsed(), **fields)

    def elapsed(self) -> float:
        """Seconds since this claim's execution began."""
        return time.monotonic() - self.started

    @property
    def lease_id(self) -> str:
        """The lease every write presents (the dispatcher may hand over a newer one)."""
        return self.active.lease_id

    # -- values ---------------------------------------------------------------

    def record(
        self, name: str, plain: Any, declared: Any = None, encoded: bytes | None = None
    ) -> None:
        """Remember a unit's output (plain data) for ``prev`` and ``steps``."""
        self._encoded[name] = encoded if encoded is not None else codec.encode(plain)
        self._order.setdefault(name, len(self._order))
        if declared is not None:
            self._types[name] = declared

    def output(self, name: str) -> Any:
        """A fresh copy of unit ``name``'s output, of its declared type."""
        return codec.from_plain(codec.decode(self._encoded[name]), self._types.get(name))

    def plain_output(self, name: str | None) -> Any:
        """Unit ``name``'s output as plain data (``None`` for no unit)."""
        return None if name is None else codec.decode(self._encoded[name])

    def context(self, step: str, attempt: int, signal: CancelSignal) -> StepContext[Any]:
        """The context a step (or predicate) receives."""
        return RunContext(self, step, attempt, signal)

    # -- writes ---------------------------------------------------------------

    async def save(
        self,
        name: str,
        status: StepStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
        attempts: int = 0,
        wake_at: int | None = None,
        encoded: bytes | None = None,
    ) -> StepResult:
        """Lease-checked upsert of unit ``name``'s row; :class:`LeaseExpiredError` if refused.

        ``encoded`` is ``codec.encode(output)`` when the caller has it: storage then
        reuses it instead of encoding the output a second time.
        """
        row = self.step_row(
            name, status, output=output, error=error, attempts=attempts, wake_at=wake_at
        )
        self.active.guard()
        known = None if encoded is None else codec.encoded_as(output, encoded)
        try:  # the common case, without building the retry machinery
            written = await self.storage.save_step_result(row, self.active.lease_id)
        except StorageError:
            written = await self._save_again(row)
        finally:
            if known is not None:
                codec.forget(known)
        if not written:
            raise LeaseExpiredError(
                self.run.id,
                f"the store refused the checkpoint of {name!r} (the lease is no longer held, "
                "or another execution already wrote that checkpoint)",
            )
        self.rows[name] = row
        return row

    async def _save_again(self, row: StepResult) -> bool:
        """Retry a checkpoint whose first write raised (see :meth:`retrying`).

        A method of its own: the closures below would otherwise make :meth:`save` build
        cells for its variables on every call.
        """

        async def landed() -> bool:
            stored = await self.storage.get_step_results(self.run.id)
            return any(
                r.id == row.id
                and r.status == row.status
                and r.attempts == row.attempts
                and codec.canonical(r.output) == codec.canonical(row.output)
                for r in stored
            )

        return await self.retrying(
            "save_step_result",
            lambda: self.storage.save_step_result(row, self.lease_id),
            landed,
            failed=True,
        )

    async def retrying(
        self,
        operation: str,
        call: Callable[[], Awaitable[bool]],
        landed: Callable[[], Awaitable[bool]],
        *,
        failed: bool = False,
        first_error: StorageError | None = None,
    ) -> bool:
        """A lease-checked write, retried with backoff while a transient ``StorageError``
        lasts and the lease fence allows, instead of abandoning the run at the first one.

        A write that raised may still have been applied (the answer was lost, not the
        commit), so a retry answered ``False`` after an error asks ``landed`` whether the
        first attempt's effect is in storage before calling the lease lost.
        ``first_error`` is what the caller's own first call raised: handled as if this
        loop's first call had raised it.
        """
        loop = asyncio.get_running_loop()
        delay = _RETRY_FIRST_S
        if first_error is not None:
            if loop.time() + delay >= self.active.deadline:
                raise first_error
            self._log(
                logging.WARNING,
                "run %s (%s): %s failed (%s); retrying within the lease",
                operation,
                first_error,
            )
            failed = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)
        elif failed:  # the caller's own first attempt raised: wait before the retry
            self._log(
                logging.WARNING,
                "run %s (%s): %s failed; retrying within the lease",
                operation,
            )
            await asyncio.sleep(delay)
            delay *= 2
        while True:
            self.active.guard()
            try:
                written = await call()
            except StorageError as exc:
                if loop.time() + delay >= self.active.deadline:
                    raise
                if not failed:
                    self._log(
                        logging.WARNING,
                        "run %s (%s): %s failed (%s); retrying within the lease",
                        operation,
                        exc,
                    )
                failed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if not written and failed:
                try:
                    return await landed()
                except StorageError:
                    return False
            return written

    def step_row(
        self,
        name: str,
        status: StepStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
        attempts: int = 0,
        wake_at: int | None = None,
    ) -> StepResult:
        """Unit ``name``'s row as of now, not yet stored (``created_at`` of a known row kept)."""
        now = self.runtime.clock()
        existing = self.rows.get(name)
        return StepResult(
            id=self._step_ids + name,
            run_id=self.run.id,
            name=name,
            status=status,
            output=output,
            error=error,
            attempts=attempts,
            created_at=existing.created_at if existing else now,
            updated_at=now,
            wake_at=wake_at,
        )

    # -- the loop -------------------------------------------------------------

    async def execute(self) -> None:
        """Execute the run to its end, a suspension, or a control-flow stop."""
        try:
            await self._execute()
        except asyncio.CancelledError:
            reason = self.active.abort_reason
            task = asyncio.current_task()
            if reason is None or task is None:
                raise
            task.uncancel()
            await self._stopped(reason)
        except ControlFlow as reason:
            await self._stopped(reason)
        except Exception as exc:
            # Storage failed mid-run: the dispatcher reports it; the lease lapses and
            # another worker resumes. Observers still learn that this claim ended.
            if not self.ended:
                await self.ended_with(
                    RunInterrupted, reason="error", error=describe_error(exc), step=self.current
                )
            raise
        finally:
            self.runtime.run_finished(self.run.id)

    async def _execute(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            self._log(logging.DEBUG, "run %s (%s): claimed (claim %d)", self.run.attempt)
        if RunStarted in self.observers.wanted:
            await self._announce()
        if self.run.attempt > 1:  # a first claim cannot have checkpoints: skip the read
            self.rows = {row.name: row for row in await self.storage.get_step_results(self.run.id)}
        if self.run.recoveries > self.workflow.max_recoveries:
            await self.fail(self._crash_loop())
            return
        # Only a stored value can be damaged: a first claim with a sound input has none.
        damage = self._damage() if self.rows or isinstance(self.run.input, DamagedValue) else None
        if damage is not None:
            await self.fail(damage)
            return
        try:
            self.input = self.workflow.load_input(self.run.input)
        except ReflowError as exc:
            await self.fail(describe_error(exc))
            return
        for unit in self.workflow.units:
            self.current = unit.name
            outcome = await _EXECUTORS[type(unit)](self, unit)
            if outcome is ADVANCE:
                self.prev_name = unit.name
            elif outcome is SUSPEND:
                return
            elif outcome is COMPLETE:
                await self._complete_with(unit.name)
                return
            elif outcome is FAIL:
                assert self.failure is not None
                await self.fail(self.failure)
                return
        await self._complete_with(self.prev_name)

    def _complete_with(self, name: str | None) -> Awaitable[None]:
        """Complete the run with unit ``name``'s output (none for no unit): the
        completion to await, handed back with no frame of its own."""
        if name is None:
            return self.complete(None)
        encoded = self._encoded[name]
        return self.complete(codec.decode(encoded), encoded)

    async def _announce(self) -> None:
        run = self.run
        latency = None
        if run.attempt == 1 and run.claimed_at is not None:
            latency = max(0, run.claimed_at - run.created_at) / 1000
        await self.emit(
            RunStarted,
            attempt=run.attempt,
            recoveries=run.recoveries,
            claimed_at=run.claimed_at,
            claim_latency=latency,
        )

    def _damage(self) -> ErrorInfo | None:
        """The failure of a run whose input or a stored step output cannot be decoded."""
        if isinstance(self.run.input, DamagedValue):
            error = DamagedValueError(self.run.id, "the input", self.run.input.error)
            return describe_error(error)
        for name, row in self.rows.items():
            if isinstance(row.output, DamagedValue):
                what = f"the stored output of step {name!r}"
                return describe_error(DamagedValueError(self.run.id, what, row.output.error), name)
        return None

    def _crash_loop(self) -> ErrorInfo:
        """The failure of a run taken over from an expired lease once too often."""
        done = {name for name, row in self.rows.items() if row.status.is_done}
        step = next((u.name for u in self.workflow.units if u.name not in done), None)
        error = RecoveryLimitError(self.run.id, self.run.recoveries, self.workflow.max_recoveries)
        return describe_error(error, step)

    async def complete(self, output: Any, encoded: bytes | None = None) -> None:
        """Store the run's output and mark it completed (``encoded``: as in :meth:`save`)."""
        known = None if encoded is None else codec.encoded_as(output, encoded)
        try:
            self.active.guard()
            try:  # the common case, without building the retry machinery
                stored = await self.storage.update_claimed_run_status(
                    self.run.id, self.active.lease_id, _COMPLETED, output=output
                )
            except StorageError as exc:
                stored = await self._complete_again(output, exc)
        finally:
            if known is not None:
                codec.forget(known)
        if not stored:
            raise LeaseExpiredError(self.run.id)
        if log.isEnabledFor(logging.DEBUG):
            self._log(logging.DEBUG, "run %s (%s) completed")
        await self.ended_with(RunCompleted, output=output)

    async def _complete_again(self, output: Any, first_error: StorageError) -> bool:
        """Retry completing the run after its first write raised ``first_error`` (a method
        of its own, so that :meth:`complete` builds no cells for its closures)."""
        return await self.retrying(
            "update_claimed_run_status",
            lambda: self.storage.update_claimed_run_status(
                self.run.id, self.lease_id, RunStatus.COMPLETED, output=output
            ),
            lambda: self._status_is(RunStatus.COMPLETED),
            first_error=first_error,
        )

    async def fail(self, error: ErrorInfo) -> None:
        """Run the on-failure handler (lease still held), then mark the run failed."""
        handler = self.workflow.failure_handler
        if handler is not None:
            ctx = FailureContext(
                run_id=self.run.id,
                workflow=self.run.workflow,
                input=self.input,
                error=error,
                step=error.step,
            )
            try:
                result = handler(ctx)
                if inspect.isawaitable(result):
                    await result
            except ControlFlow:
                raise
            except asyncio.CancelledError as exc:
                if self.active.engine_cancelled():
                    raise
                await self.observers.error(HookError("on_failure handler", exc))
            except BaseException as exc:
                # sys.exit() in a handler must not end the worker: the run still fails
                # (else the next claim would call the handler again, forever).
                await self.observers.error(HookError("on_failure handler", exc))
        stored = await self.retrying(
            "update_claimed_run_status",
            lambda: self.storage.update_claimed_run_status(
                self.run.id, self.lease_id, RunStatus.FAILED, error=error
            ),
            lambda: self._status_is(RunStatus.FAILED),
        )
        if not stored:
            raise LeaseExpiredError(self.run.id)
        self._log(
            logging.WARNING,
            "run %s (%s) failed at step %s: %s: %s",
            error.step or "-",
            error.type,
            error.message,
            step=error.step,
        )
        await self.ended_with(RunFailed, error=error)

    async def _stopped(self, reason: ControlFlow) -> None:
        """A control-flow stop: write nothing, except releasing the lease on engine stop.

        A ``def`` step still in its thread cannot be interrupted: the lease is kept (the
        dispatcher goes on heartbeating it) until the thread returns, and only then
        released, so no other worker starts the same step while it still runs here.
        """
        if isinstance(reason, EngineStoppedError):
            await self.active.thread_settled()
            if self.active.fenced():
                self._log(
                    logging.WARNING,
                    "run %s (%s): its lease fence passed while the engine stopped; not "
                    "released, another worker takes it over when the lease expires",
                )
                await self.ended_with(LeaseLost, reason=FENCED, step=self.current)
                return
            try:
                await self.storage.update_claimed_run_status(
                    self.run.id, self.lease_id, RunStatus.PENDING
                )
            except Exception as exc:
                await self.observers.error(exc)
                await self.ended_with(
                    RunInterrupted, reason="error", error=describe_error(exc), step=self.current
                )
                return
            self._log(logging.INFO, "run %s (%s): engine stopping; released for another worker")
            await self.ended_with(RunInterrupted, reason="engine_stopped", step=self.current)
        elif isinstance(reason, LeaseExpiredError):
            # Nothing to write: the run is not ours to write any more. Say what really
            # happened, or an operator cannot tell why this worker dropped it.
            if await self._was_cancelled():
                await self._cancelled()
            else:
                log.warning(
                    "%s; stopped executing it without writing",
                    reason,
                    extra=self._extra(self.current),
                )
                await self.ended_with(LeaseLost, reason=str(reason), step=self.current)
        elif isinstance(reason, RunCancelledError):
            await self._cancelled()
        else:
            await self.ended_with(
                RunInterrupted, reason="error", error=describe_error(reason), step=self.current
            )

    async def _cancelled(self) -> None:
        self._log(logging.INFO, "run %s (%s) was cancelled; stopped executing it")
        await self.ended_with(RunCancelled, executing=True, step=self.current)

    async def _status_is(self, status: RunStatus) -> bool:
        run = await self.storage.get_run(self.run.id)
        return run is not None and run.status is status

    async def _was_cancelled(self) -> bool:
        """Whether a refused write was refused because the run was cancelled meanwhile."""
        try:
            async with asyncio.timeout(self.runtime.lease.heartbeat_every):
                run = await self.storage.get_run(self.run.id)
        except Exception:
            return False
        return run is not None and run.status is RunStatus.CANCELLED

    def _extra(self, step: str | None) -> dict[str, Any]:
        """The ``extra`` fields of this run's log records."""
        return {
            "run_id": self.run.id,
            "workflow": self.run.workflow,
            "step": step,
            "attempt": self.run.attempt,
        }

    def log_step(self, level: int, message: str, step: str, attempt: int, *args: object) -> None:
        """Log ``message`` (``%s`` for run id, workflow and step first) on ``reflow.steps``."""
        if step_log.isEnabledFor(level):
            extra = {**self._extra(step), "attempt": attempt}
            step_log.log(level, message, self.run.id, self.run.workflow, step, *args, extra=extra)

    def _log(self, level: int, message: str, *args: object, step: str | None = None) -> None:
        log.log(level, message, self.run.id, self.run.workflow, *args, extra=self._extra(step))
