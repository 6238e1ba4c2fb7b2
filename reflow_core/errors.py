"""Every error Reflow raises, under one root.

Each class carries a stable ``code`` string that callers may match on; the text
says what happened, to what, and what to do about it. The tree::

    ReflowError
    ├── ConfigError                  CONFIG             bad option or definition
    │   ├── DuplicateStepError       DUPLICATE_STEP
    │   ├── DuplicateWorkflowError   DUPLICATE_WORKFLOW
    │   └── InvalidIdentifierError   INVALID_IDENTIFIER  a name, key or id storage cannot hold
    ├── ValidationError              VALIDATION         input or payload has the wrong shape
    ├── SerializationError           SERIALIZATION      value is not persistable (carries .path)
    ├── WorkflowNotFoundError        WORKFLOW_NOT_FOUND
    ├── IdempotencyConflictError     IDEMPOTENCY_CONFLICT
    ├── AdapterError                 ADAPTER            adapter discovery and registration
    │   ├── AdapterNotFoundError     ADAPTER_NOT_FOUND
    │   └── AdapterConflictError     ADAPTER_CONFLICT
    ├── StorageError                 STORAGE            a driver failed (its error is __cause__)
    ├── StepTimeoutError             STEP_TIMEOUT
    ├── StepInterruptedError         STEP_INTERRUPTED   a step raised SystemExit, CancelledError
    ├── StepFailedError              STEP_FAILED
    ├── RecoveryLimitError           RECOVERY_LIMIT     a run's worker died too often
    ├── DamagedValueError            DAMAGED_VALUE      a stored value cannot be decoded
    ├── WaitTimeoutError             WAIT_TIMEOUT
    ├── HookError                    HOOK               a hook or on-failure handler raised
    └── ControlFlow                  (never a run's failure: the run is left to its owner)
        ├── LeaseExpiredError        LEASE_EXPIRED
        ├── RunCancelledError        RUN_CANCELLED
        └── EngineStoppedError       ENGINE_STOPPED
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AdapterConflictError",
    "AdapterError",
    "AdapterNotFoundError",
    "ConfigError",
    "ControlFlow",
    "DuplicateStepError",
    "DuplicateWorkflowError",
    "EngineStoppedError",
    "HookError",
    "IdempotencyConflictError",
    "InvalidIdentifierError",
    "LeaseExpiredError",
    "ReflowError",
    "RunCancelledError",
    "SerializationError",
    "DamagedValueError",
    "RecoveryLimitError",
    "StepFailedError",
    "StepInterruptedError",
    "StepTimeoutError",
    "StorageError",
    "ValidationError",
    "WaitTimeoutError",
    "WorkflowNotFoundError",
]


class ReflowError(Exception):
    """Root of every error raised by Reflow; ``code`` is stable across releases."""

    code: ClassVar[str] = "REFLOW"


class ConfigError(ReflowError):
    """An option, a definition or an argument is invalid. Fix the call named in the text."""

    code = "CONFIG"


class DuplicateStepError(ConfigError):
    """Two units of one workflow share a name; names key checkpoints, so they must be unique."""

    code = "DUPLICATE_STEP"


class DuplicateWorkflowError(ConfigError):
    """Two workflows registered on one engine share a name."""

    code = "DUPLICATE_WORKFLOW"


class InvalidIdentifierError(ConfigError):
    """A run id, workflow or step name, idempotency key, event name or key, schedule key,
    lease id or holder field breaks the identifier rule (:mod:`reflow_core.identifiers`):
    empty, too long, not a str, or holding a control character or a surrogate.

    Raised before anything is stored, by the engine (at definition or call time) and by
    every adapter. ``what`` names the kind of identifier, ``value`` is the string given,
    ``reason`` says what is wrong with it.
    """

    code = "INVALID_IDENTIFIER"

    def __init__(self, what: str, value: object, reason: str) -> None:
        shown = repr(value)
        if isinstance(value, str) and len(value) > 40:
            shown = f"{repr(value[:12])[:-1]}...' ({len(value)} characters)"
        super().__init__(
            f"{what} {shown} is not a valid identifier: {reason}; identifiers are non-empty "
            "str without control characters or surrogates (see reflow_core.identifiers)"
        )
        self.what = what
        self.value = value
        self.reason = reason


class ValidationError(ReflowError):
    """A run input or event payload does not match its declared type."""

    code = "VALIDATION"


class SerializationError(ReflowError):
    """A value cannot be persisted exactly; nothing was written.

    ``path`` locates the offending part in JSONPath-like form, e.g. ``$.items[2].price``.
    """

    code = "SERIALIZATION"

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


class WorkflowNotFoundError(ReflowError):
    """No workflow of that name is registered on this engine."""

    code = "WORKFLOW_NOT_FOUND"

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        known_text = ", ".join(sorted(known)) if known else "none"
        super().__init__(
            f"workflow {name!r} is not registered on this engine (registered: {known_text}); "
            "pass it to Engine(workflows=[...])"
        )
        self.workflow = name


class IdempotencyConflictError(ReflowError):
    """An idempotency key was reused with a different input for the same workflow."""

    code = "IDEMPOTENCY_CONFLICT"

    def __init__(self, workflow: str, key: str, run_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} of workflow {workflow!r} already names run {run_id} "
            "with a different input; use a new key or the same input"
        )
        self.workflow = workflow
        self.key = key
        self.run_id = run_id


class AdapterError(ReflowError):
    """A storage adapter could not be found, loaded or registered."""

    code = "ADAPTER"


class AdapterNotFoundError(AdapterError):
    """No installed adapter has that name or serves that URL scheme."""

    code = "ADAPTER_NOT_FOUND"


class AdapterConflictError(AdapterError):
    """Two installed adapters claim the same name or scheme."""

    code = "ADAPTER_CONFLICT"


class StorageError(ReflowError):
    """The storage driver failed during ``operation``; the driver's exception is ``__cause__``."""

    code = "STORAGE"

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(f"storage operation {operation} failed: {message}")
        self.operation = operation


class StepTimeoutError(ReflowError):
    """One attempt of a step ran longer than its timeout."""

    code = "STEP_TIMEOUT"

    def __init__(self, step: str, timeout_s: float) -> None:
        super().__init__(f"step {step!r} attempt exceeded its timeout of {timeout_s:g}s")
        self.step = step
        self.timeout_s = timeout_s


class StepInterruptedError(ReflowError):
    """A step raised a ``BaseException`` that is not an ordinary error: ``SystemExit``
    (a library calling ``sys.exit()``), ``KeyboardInterrupt``, ``GeneratorExit``, or a
    ``CancelledError`` of its own (awaiting a task that something else cancelled).

    Recorded as the step's failure and never retried: letting it propagate would kill
    the worker, and every worker that claimed the run after it, or loop the run forever.
    The original exception is the ``__cause__``; its traceback is stored with the error.
    """

    code = "STEP_INTERRUPTED"

    def __init__(self, step: str, error: BaseException) -> None:
        kind = type(error)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        detail = f": {error}" if str(error) else ""
        super().__init__(f"step {step!r} raised {name}{detail}")
        self.step = step
        self.error = error


class DamagedValueError(ReflowError):
    """A value stored for a run cannot be decoded: a damaged row, or one written by a
    newer version of Reflow. The run fails naming the value; other runs are unaffected."""

    code = "DAMAGED_VALUE"

    def __init__(self, run_id: str, what: str, error: str) -> None:
        super().__init__(
            f"{what} of run {run_id} cannot be decoded ({error}); the stored row is damaged "
            "or was written by a newer version. Inspect it with `reflow runs show`, repair "
            "or delete it; other runs are unaffected"
        )
        self.run_id = run_id
        self.what = what


class RecoveryLimitError(ReflowError):
    """A run was taken over from an expired lease more often than its workflow allows.

    Each takeover means its worker died, hung or lost the store while running it; past
    the limit the run most likely kills whatever runs it (out of memory, a crash in
    native code, ``os._exit``), so it fails instead of looping across the fleet.
    """

    code = "RECOVERY_LIMIT"

    def __init__(self, run_id: str, recoveries: int, limit: int) -> None:
        super().__init__(
            f"run {run_id} was recovered from a lost worker {recoveries} times (limit "
            f"{limit}): its step probably kills the process that runs it. Fix the step, "
            "then resume the run, or raise Workflow(max_recoveries=...)"
        )
        self.run_id = run_id
        self.recoveries = recoveries
        self.limit = limit


class StepFailedError(ReflowError):
    """A step failed without an exception of its own to report (e.g. aborted before any attempt)."""

    code = "STEP_FAILED"


class WaitTimeoutError(ReflowError):
    """No event of the awaited name arrived before the wait's deadline."""

    code = "WAIT_TIMEOUT"

    def __init__(self, event: str, timeout_s: float) -> None:
        super().__init__(f"no event {event!r} arrived within {timeout_s:g}s")
        self.event = event
        self.timeout_s = timeout_s


class HookError(ReflowError):
    """A lifecycle hook, stream consumer or on-failure handler raised; the run is unaffected."""

    code = "HOOK"

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(f"{where} raised {type(cause).__name__}: {cause}")
        self.where = where


class ControlFlow(ReflowError):
    """Stops a run's execution without failing it: the run is left for its rightful owner."""

    code = "CONTROL_FLOW"


class LeaseExpiredError(ControlFlow):
    """This worker no longer holds the run's lease; another worker owns the run now."""

    code = "LEASE_EXPIRED"

    def __init__(self, run_id: str, why: str = "another worker may own it now") -> None:
        super().__init__(f"lease on run {run_id} was lost: {why}")
        self.run_id = run_id
        self.why = why


class RunCancelledError(ControlFlow):
    """The run was cancelled while this worker executed it."""

    code = "RUN_CANCELLED"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} was cancelled")
        self.run_id = run_id


class EngineStoppedError(ControlFlow):
    """The engine stopped while the run executed; its lease was released for another worker."""

    code = "ENGINE_STOPPED"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"engine stopped while executing run {run_id}; the run was released")
        self.run_id = run_id
