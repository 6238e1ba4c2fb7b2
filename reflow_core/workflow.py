"""Workflow definitions: inert values describing an ordered list of named units.

A :class:`Workflow` does no I/O and knows no engine; an :class:`~reflow_core.Engine`
binds it to storage. Units run in definition order::

    from reflow_core import Workflow, StepContext, RetryPolicy

    orders = Workflow("orders", input=Order)

    @orders.step
    async def reserve(ctx: StepContext[Order]) -> str:
        return await inventory.reserve(ctx.input.sku)

    @orders.step(retry=RetryPolicy(max_attempts=5, backoff="exponential"), timeout="10s")
    def charge(ctx: StepContext[Order]) -> Receipt:      # plain def: runs in a thread
        return payments.charge(ctx.input.card, reservation=ctx.prev)

Unit names key checkpoints, so they are unique per workflow (a duplicate raises
:class:`~reflow_core.errors.DuplicateStepError` right here, at definition time).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec

from reflow_core import codec
from reflow_core.context import StepContext
from reflow_core.durations import Duration, to_millis, to_seconds
from reflow_core.errors import ConfigError, DuplicateStepError, ValidationError
from reflow_core.identifiers import check_identifier
from reflow_core.retry import RetryPolicy
from reflow_core.types import ErrorInfo

__all__ = [
    "Branch",
    "FailureContext",
    "ParallelUnit",
    "SleepUnit",
    "StepUnit",
    "Unit",
    "WaitUnit",
    "Workflow",
]

InputT = TypeVar("InputT")
StepFn = Callable[[StepContext[Any]], Any]
Predicate = Callable[[StepContext[Any]], bool | Awaitable[bool]]
NO_DEFAULT: Any = object()


def _declared_output(fn: Callable[..., Any]) -> Any:
    """The return annotation, if it is a type msgspec must rebuild (Struct, dataclass, ...)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return None
    declared = hints.get("return")
    return declared if needs_conversion(declared) else None


def needs_conversion(declared: Any) -> bool:
    """True if plain JSON data must be converted to get a value of type ``declared`` back."""
    if declared is None or declared is Any:
        return False
    if isinstance(declared, type):
        if issubclass(declared, msgspec.Struct) or dataclasses.is_dataclass(declared):
            return True
        return typing.is_typeddict(declared)
    return any(needs_conversion(arg) for arg in typing.get_args(declared))


@dataclass(frozen=True, slots=True)
class StepUnit:
    """A step: a function whose result is checkpointed before the next unit starts."""

    name: str
    fn: StepFn
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None
    """Seconds per attempt; ``None`` for no limit."""
    when: Predicate | None = None
    output_type: Any = None
    is_async: bool = False


@dataclass(frozen=True, slots=True)
class SleepUnit:
    """A durable sleep: the run is suspended without a lease until the wake time."""

    name: str
    duration_ms: int | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class WaitUnit:
    """A durable wait for an external event delivered with ``Engine.send_event``."""

    name: str
    payload_type: Any = None
    timeout_ms: int | None = None
    default: Any = NO_DEFAULT
    """Output used when the timeout passes; without one, the timeout fails the run."""


@dataclass(frozen=True, slots=True)
class Branch:
    """One branch of a parallel group, with its own retry policy and timeout."""

    fn: StepFn
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class ParallelUnit:
    """Named branches run concurrently; the unit's output is ``{branch: output}``.

    Each branch is checkpointed as it finishes, under its own name (branch names share
    the workflow's namespace).
    """

    name: str
    branches: Mapping[str, StepUnit]
    fail_fast: bool = True


Unit = StepUnit | SleepUnit | WaitUnit | ParallelUnit


@dataclass(frozen=True, slots=True)
class FailureContext:
    """What a workflow's on-failure handler receives."""

    run_id: str
    workflow: str
    input: Any
    error: ErrorInfo
    step: str | None


FailureHandler = Callable[[FailureContext], Any]


class Workflow(Generic[InputT]):
    """An ordered list of named units, plus an optional input type and failure handler."""

    def __init__(
        self, name: str, *, input: type[InputT] | Any = None, max_recoveries: int = 10
    ) -> None:
        check_identifier(name, "workflow name")
        if not name.strip():
            raise ConfigError(f"workflow name must not be only spaces, got {name!r}")
        if isinstance(max_recoveries, bool) or not isinstance(max_recoveries, int) or not (
            0 <= max_recoveries <= 10_000
        ):
            raise ConfigError(
                f"max_recoveries of workflow {name!r} must be an int from 0 to 10000, "
                f"got {max_recoveries!r}"
            )
        self.name = name
        self.max_recoveries = max_recoveries
        """How many times a run may be taken over from an expired lease (its worker
        crashed, hung or lost the store) before it fails instead of looping across the
        fleet: a step that kills its process (OOM, segfault, ``os._exit``) ends there."""
        self.input_type: Any = input
        self._units: list[Unit] = []
        self._names: set[str] = set()
        self.failure_handler: FailureHandler | None = None

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, units={[u.name for u in self._units]})"

    @property
    def units(self) -> tuple[Unit, ...]:
        """The units in execution order."""
        return tuple(self._units)

    def _claim_name(self, name: str) -> None:
        # A unit's name names its checkpoint (and, for a wait, the event it waits for).
        check_identifier(name, "step name")
        if name in self._names:
            raise DuplicateStepError(
                f"workflow {self.name!r} already has a unit named {name!r}; "
                "unit names key checkpoints and must be unique"
            )
        self._names.add(name)

    @staticmethod
    def _make_step(
        fn: StepFn,
        name: str,
        retry: RetryPolicy | None,
        timeout: Duration | None,
        when: Predicate | None,
    ) -> StepUnit:
        if not callable(fn):
            raise ConfigError(f"step {name!r} must be a function, got {fn!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry of step {name!r} must be a RetryPolicy, got {retry!r}")
        seconds = None
        if timeout is not None:
            seconds = to_seconds(timeout, what=f"timeout of step {name!r}", allow_zero=False)
        return StepUnit(
            name=name,
            fn=fn,
            retry=retry or RetryPolicy(),
            timeout=seconds,
            when=when,
            output_type=_declared_output(fn),
            is_async=inspect.iscoroutinefunction(fn),
        )

    def step(
        self,
        fn: Callable[[StepContext[InputT]], Any] | None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: Duration | None = None,
        when: Predicate | None = None,
    ) -> Any:
        """Append a step (decorator, with or without options). Returns the function unchanged.

        ``retry`` sets the retry policy, ``timeout`` limits each attempt, ``when`` is a
        predicate over the context deciding (once, durably) whether the step runs.
        """

        def register(func: Callable[[StepContext[InputT]], Any]) -> Callable[..., Any]:
            unit_name = name or getattr(func, "__name__", None) or repr(func)
            self._claim_name(unit_name)
            self._units.append(self._make_step(func, unit_name, retry, timeout, when))
            return func

        return register(fn) if fn is not None else register

    def sleep(
        self, name: str, duration: Duration | None = None, *, until: datetime | None = None
    ) -> Workflow[InputT]:
        """Append a durable sleep for ``duration`` or until an aware ``datetime``."""
        if (duration is None) == (until is None):
            raise ConfigError(f"sleep {name!r} needs exactly one of a duration or until=")
        if until is not None and until.tzinfo is None:
            raise ConfigError(f"sleep {name!r}: until= must be timezone-aware")
        millis = None if duration is None else to_millis(duration, what=f"sleep {name!r}")
        self._claim_name(name)
        self._units.append(SleepUnit(name=name, duration_ms=millis, until=until))
        return self

    def wait_for_event(
        self,
        name: str,
        *,
        type: Any = None,
        timeout: Duration | None = None,
        default: Any = NO_DEFAULT,
    ) -> Workflow[InputT]:
        """Append a durable wait for an event called ``name``; its payload is the output.

        ``type`` validates payloads when they are sent; ``timeout`` fails the run with
        :class:`~reflow_core.errors.WaitTimeoutError`, or continues with ``default``.
        """
        millis = None
        if timeout is not None:
            millis = to_millis(timeout, what=f"timeout of wait {name!r}", allow_zero=False)
        if default is not NO_DEFAULT and millis is None:
            raise ConfigError(f"wait {name!r}: default= only makes sense with a timeout=")
        self._claim_name(name)
        self._units.append(
            WaitUnit(name=name, payload_type=type, timeout_ms=millis, default=default)
        )
        return self

    def parallel(
        self,
        name: str,
        branches: Mapping[str, StepFn | Branch],
        *,
        fail_fast: bool = True,
    ) -> Workflow[InputT]:
        """Append a group of named branches that run concurrently."""
        if not branches:
            raise ConfigError(f"parallel group {name!r} needs at least one branch")
        self._claim_name(name)
        made: dict[str, StepUnit] = {}
        for branch_name, spec in branches.items():
            self._claim_name(branch_name)
            branch = spec if isinstance(spec, Branch) else Branch(fn=spec)
            made[branch_name] = self._make_step(
                branch.fn, branch_name, branch.retry, branch.timeout, None
            )
        self._units.append(ParallelUnit(name=name, branches=made, fail_fast=fail_fast))
        return self

    def on_failure(self, fn: FailureHandler) -> FailureHandler:
        """Register the compensation handler (decorator), run when the run fails for good.

        It runs before the run is marked failed, while the worker still holds the lease,
        so a crash during it means it runs again on another worker (at least once). What it
        raises is reported and never changes the outcome.
        """
        if self.failure_handler is not None:
            raise ConfigError(f"workflow {self.name!r} already has an on_failure handler")
        self.failure_handler = fn
        return fn

    def validate_input(self, value: Any) -> Any:
        """Check ``value`` against the declared input type; return the plain data to store."""
        if not needs_conversion(self.input_type) and self.input_type in (None, Any):
            return codec.to_plain(value)
        try:
            typed = codec.validate(value, self.input_type)
        except ValidationError as exc:
            raise ValidationError(f"input of workflow {self.name!r}: {exc}") from None
        return codec.to_plain(typed, self.input_type)

    def load_input(self, plain: Any) -> Any:
        """Rebuild the typed input from stored plain data."""
        return codec.from_plain(plain, self.input_type)
