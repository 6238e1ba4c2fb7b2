"""What a step sees while it runs: :class:`StepContext` and its :class:`CancelSignal`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any, Generic, NoReturn, TypeVar

from reflow_core.errors import ControlFlow

__all__ = ["CancelSignal", "EarlyCompletion", "StepContext", "StepOutputs"]

InputT = TypeVar("InputT")


class CancelSignal:
    """Set when the step should stop: run cancelled, lease lost, engine stopped, or timeout.

    Async steps are interrupted at their next ``await`` anyway; plain ``def`` steps run in
    a worker thread that Python cannot interrupt, so long-running ones should check
    :attr:`is_set` (or ``wait(timeout)``) and return early.
    """

    # No __init__: a signal is made for every attempt of every step, and with these
    # class-level defaults making one costs no Python call. An instance gets attributes
    # of its own only once set or waited on, which most never are. Both events are made
    # on first wait only: a threading.Event per step was a measurable part of its cost.
    _event: threading.Event | None = None
    _async_event: asyncio.Event | None = None
    reason: ControlFlow | TimeoutError | None = None
    """Why the step should stop (``None`` until set)."""

    def set(self, reason: ControlFlow | TimeoutError) -> None:
        """Raise the signal (engine use, on the event loop's thread)."""
        if self.reason is None:
            self.reason = reason
        # Read after ``reason`` is written; wait() publishes its event before reading
        # ``reason``: whichever runs second sees the other's write, so no wake is lost.
        event = self._event
        if event is not None:
            event.set()
        if self._async_event is not None:
            self._async_event.set()

    @property
    def is_set(self) -> bool:
        """True once the step should stop."""
        return self.reason is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling thread until set or ``timeout``; True if set. For ``def`` steps."""
        event = self._event
        if event is None:
            with _CREATING:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        if self.reason is not None:
            return True
        return event.wait(timeout)

    async def wait_async(self) -> None:
        """Wait until set, from async code (async steps are also cancelled directly)."""
        if self._async_event is None:
            self._async_event = asyncio.Event()
            if self.reason is not None:
                self._async_event.set()
        await self._async_event.wait()


_CREATING = threading.Lock()
"""Guards the first :meth:`CancelSignal.wait` of a signal that two threads wait on."""


class EarlyCompletion(BaseException):
    """Raised by :meth:`StepContext.complete`; a BaseException so ``except Exception``
    in user code does not swallow it."""

    def __init__(self, value: Any) -> None:
        super().__init__("workflow completed early")
        self.value = value


class StepOutputs(Mapping[str, Any]):
    """Read-only view of earlier outputs by unit name; each read is a fresh copy, so a step
    that mutates what it reads cannot make this execution differ from a replay.

    ``order`` maps each unit name to its position among recorded outputs and only grows;
    the view holds the first ``count`` of them (those recorded when it was made), so the
    engine shares one mapping between all of a run's contexts instead of copying it.
    """

    __slots__ = ("_count", "_decode", "_order")

    def __init__(
        self, order: Mapping[str, int], decode: Callable[[str], Any], count: int | None = None
    ) -> None:
        self._order = order
        self._decode = decode
        self._count = len(order) if count is None else count

    def __getitem__(self, name: str) -> Any:
        position = self._order.get(name)
        if position is None or position >= self._count:
            known = ", ".join(self) or "none yet"
            raise KeyError(f"no completed unit named {name!r} (completed: {known})")
        return self._decode(name)

    def __contains__(self, name: object) -> bool:
        position = self._order.get(name)  # type: ignore[call-overload]
        return position is not None and position < self._count

    def __iter__(self) -> Iterator[str]:
        return iter(list(islice(self._order, self._count)))

    def __len__(self) -> int:
        return self._count


class StepContext(Generic[InputT]):
    """Everything a step receives.

    ``input`` is the run's validated input (of the workflow's declared type), ``prev``
    the previous unit's output (``None`` for the first), ``steps`` every earlier unit's
    output by name, ``cancel`` the cancellation signal, ``attempt`` the 1-based attempt.
    """

    __slots__ = (
        "_prev",
        "_prev_loader",
        "_steps",
        "attempt",
        "cancel",
        "input",
        "run_id",
        "step",
        "workflow",
    )

    def __init__(
        self,
        *,
        run_id: str,
        workflow: str,
        step: str,
        attempt: int,
        input: InputT,
        prev_loader: Callable[[], Any],
        steps: StepOutputs,
        cancel: CancelSignal,
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.step = step
        self.attempt = attempt
        self.input = input
        self._prev_loader = prev_loader
        self._prev: Any = _UNSET
        self._steps = steps
        self.cancel = cancel

    @property
    def steps(self) -> StepOutputs:
        """Every earlier unit's output by name (as of this step's start)."""
        return self._steps

    @property
    def prev(self) -> Any:
        """Output of the previous unit that produced one (a fresh copy)."""
        if self._prev is _UNSET:
            self._prev = self._prev_loader()
        return self._prev

    @property
    def cancelled(self) -> bool:
        """Shorthand for ``ctx.cancel.is_set``."""
        return self.cancel.is_set

    def complete(self, value: Any = None) -> NoReturn:
        """End the whole workflow now, successfully, with ``value`` as its output.

        Later units do not run. The decision is checkpointed, so a replay also ends here.
        """
        raise EarlyCompletion(value)


_UNSET: Any = object()
