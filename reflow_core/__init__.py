"""Reflow: durable workflow execution for Python.

The one import users and adapter authors need::

    from reflow_core import Workflow, Engine, StepContext, RetryPolicy, open_storage
"""

from __future__ import annotations

from reflow_core.context import CancelSignal, StepContext
from reflow_core.durations import Duration
from reflow_core.engine import Engine, RunView
from reflow_core.errors import (
    AdapterConflictError,
    AdapterError,
    AdapterNotFoundError,
    ConfigError,
    ControlFlow,
    DamagedValueError,
    DuplicateStepError,
    DuplicateWorkflowError,
    EngineStoppedError,
    HookError,
    IdempotencyConflictError,
    InvalidIdentifierError,
    LeaseExpiredError,
    RecoveryLimitError,
    ReflowError,
    RunCancelledError,
    SerializationError,
    StepFailedError,
    StepInterruptedError,
    StepTimeoutError,
    StorageError,
    ValidationError,
    WaitTimeoutError,
    WorkflowNotFoundError,
)
from reflow_core.events import (
    EngineEvent,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepCompleted,
    StepSkipped,
    StepStarted,
)
from reflow_core.hookspecs import hookimpl
from reflow_core.identifiers import check_identifier
from reflow_core.lease import LeaseOptions
from reflow_core.observers import EventStream
from reflow_core.registry import (
    AdapterOption,
    AdapterSpec,
    Capability,
    adapter_specs,
    get_adapter,
    open_storage,
    register_adapter,
)
from reflow_core.retry import RetryDecision, RetryPolicy
from reflow_core.storage import (
    CONTRACT_VERSION,
    Clock,
    StorageAdapter,
    WorkNotifier,
    system_clock,
)
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    DamagedValue,
    ErrorInfo,
    EventRecord,
    LeaseHolder,
    Recurrence,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)
from reflow_core.workflow import Branch, FailureContext, Workflow

__version__ = "0.1.0"

__all__ = [
    "CONTRACT_VERSION",
    "AdapterConflictError",
    "AdapterError",
    "AdapterNotFoundError",
    "AdapterOption",
    "AdapterSpec",
    "Branch",
    "CancelSignal",
    "Capability",
    "ClaimedRun",
    "ClaimedSchedule",
    "Clock",
    "ConfigError",
    "ConsumeResult",
    "ControlFlow",
    "DamagedValueError",
    "CreateRunResult",
    "DamagedValue",
    "DuplicateStepError",
    "DuplicateWorkflowError",
    "Duration",
    "Engine",
    "EngineEvent",
    "EngineStoppedError",
    "ErrorInfo",
    "EventRecord",
    "LeaseHolder",
    "EventStream",
    "FailureContext",
    "HookError",
    "IdempotencyConflictError",
    "InvalidIdentifierError",
    "LeaseExpiredError",
    "LeaseOptions",
    "Recurrence",
    "ReflowError",
    "RetryDecision",
    "RetryPolicy",
    "RunCancelledError",
    "RunCompleted",
    "RunFailed",
    "RunFilter",
    "RunStarted",
    "RunStatus",
    "RunView",
    "Schedule",
    "SerializationError",
    "StepCompleted",
    "StepContext",
    "RecoveryLimitError",
    "StepFailedError",
    "StepInterruptedError",
    "StepResult",
    "StepSkipped",
    "StepStarted",
    "StepStatus",
    "StepTimeoutError",
    "StorageAdapter",
    "StorageError",
    "ValidationError",
    "WaitTimeoutError",
    "WorkNotifier",
    "Workflow",
    "WorkflowNotFoundError",
    "WorkflowRun",
    "adapter_specs",
    "check_identifier",
    "get_adapter",
    "hookimpl",
    "open_storage",
    "register_adapter",
    "system_clock",
    "__version__",
]
