"""Delivery of engine events to hooks and streams, isolated from runs.

Hooks come from two places: plugins in the ``reflow`` entry-point group (every engine
fires them) and objects passed to ``Engine(hooks=[...])``. A hook is a function named
after a hook specification (``reflow_run_completed(event)``), sync or async. Each is
called on its own, so one that raises neither stops the others nor changes the run:
its error is wrapped in :class:`HookError` and reported through ``reflow_error`` hooks,
the ``on_error`` callback and the ``reflow`` logger.

Hooks run inline: the run that produced the event goes on once its hooks return. An
async hook (and an async ``reflow_error`` hook or ``on_error`` callback) gets at most
:attr:`Observers.hook_timeout` seconds (default 30); one that takes longer is cancelled
and reported as a :class:`HookError` caused by a :class:`TimeoutError`, and the run goes
on, so a hook that never returns cannot hold a leased run forever. A plain ``def`` hook
cannot be interrupted: it blocks the event loop (heartbeats included) while it runs, so
keep it quick.

Streams (:class:`EventStream`, from ``Engine.events()``) never slow a run down: an event
is appended to each stream's bounded buffer without waiting, and a stream whose buffer
is full loses the event instead (see :class:`EventStream` for how the loss is counted
and reported).

Pluggy calls are untyped; this is the only place the engine touches them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from reflow_core.errors import ConfigError, HookError
from reflow_core.events import (
    EngineEvent,
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

__all__ = ["EventStream", "Observers"]

log = logging.getLogger("reflow")
stream_log = logging.getLogger("reflow.events")

_HOOK_NAMES: dict[type[Any], str] = {
    RunStarted: "reflow_run_started",
    StepStarted: "reflow_step_started",
    StepCompleted: "reflow_step_completed",
    StepSkipped: "reflow_step_skipped",
    StepFailed: "reflow_step_failed",
    RetryScheduled: "reflow_retry_scheduled",
    RunCompleted: "reflow_run_completed",
    RunFailed: "reflow_run_failed",
    RunSuspended: "reflow_run_suspended",
    RunCancelled: "reflow_run_cancelled",
    LeaseLost: "reflow_lease_lost",
    RunInterrupted: "reflow_run_interrupted",
}
_ALL_KINDS: frozenset[type[Any]] = frozenset(_HOOK_NAMES)


class EventStream:
    """An async iterator over engine events with a bounded, lossy buffer.

    Delivering an event never waits for the consumer: it is appended to this stream's
    buffer of ``buffer`` events, or, when the buffer is full, lost for this stream (other
    streams and hooks still get it). Losses are never silent:

    * :attr:`dropped` counts every event this stream lost;
    * :attr:`missed` is how many events were lost just before the event the consumer
      read last (``0`` when none was), so a consumer can tell where the gaps are;
    * each gap (a run of consecutive losses) is reported once, when it begins, by a
      warning on the ``reflow.events`` logger.

    The stream ends (iteration stops after what is buffered) when the engine stops.
    Leaving it ends it too and unsubscribes it, so nothing is buffered for it after:
    ``break`` or an exception out of ``async for`` (the event loop closes the abandoned
    iterator at its next turn), cancellation of the consuming task while it waits in
    ``async for``, :meth:`aclose` (or leaving ``async with stream``), and dropping every
    reference to the stream. A left stream cannot be iterated again.
    ``await anext(stream)`` reads one event without entering a loop (cancelling it does
    not leave the stream).
    """

    def __init__(self, owner: Observers, buffer: int) -> None:
        self._owner = owner
        self.buffer = buffer
        self._items: deque[tuple[int, EngineEvent]] = deque()  # (missed before, event)
        self._ready = asyncio.Event()  # set when an item arrives or the stream ends
        self._gap = 0  # events lost since the last one buffered
        self._ended = False  # the engine stopped: the consumer gets what is buffered
        self._left = False  # the consumer left: nothing more, buffer discarded
        self.dropped = 0
        """Events this stream lost because its buffer was full."""
        self.missed = 0
        """Events lost just before the event read last (``0``: none)."""

    @property
    def closed(self) -> bool:
        """Whether the stream takes no more events (the engine stopped or it was left)."""
        return self._ended or self._left

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        # An async generator, not ``self``: ``break`` out of ``async for`` drops it, and
        # the event loop then closes it, which runs the ``finally`` below.
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[EngineEvent]:
        try:
            while True:
                event = await self._next()
                if event is None:
                    return
                yield event
        finally:
            self._leave()

    async def __anext__(self) -> EngineEvent:
        event = await self._next()
        if event is None:
            raise StopAsyncIteration
        return event

    async def _next(self) -> EngineEvent | None:
        while not self._items:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        self.missed, event = self._items.popleft()
        return event

    def offer(self, event: EngineEvent) -> None:
        """Buffer ``event`` for the consumer, or count it lost if the buffer is full."""
        if self.closed:
            return
        if len(self._items) >= self.buffer:
            self.dropped += 1
            self._gap += 1
            if self._gap == 1:
                stream_log.warning(
                    "event stream buffer full (%d events): dropping events until its "
                    "consumer catches up (%d lost on this stream so far)",
                    self.buffer,
                    self.dropped,
                )
            return
        self._items.append((self._gap, event))
        self._gap = 0
        self._ready.set()

    def end(self) -> None:
        """Finish the stream: the consumer gets what is buffered, then the end."""
        self._ended = True
        self._ready.set()

    def _leave(self) -> None:
        self._left = True
        self._items.clear()
        self._ready.set()  # a consumer waiting elsewhere ends too
        self._owner.unsubscribe(self)

    async def aclose(self) -> None:
        """Leave the stream now: unsubscribe it and discard what is buffered."""
        self._leave()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Observers:
    """Hooks and streams of one engine."""

    hook_timeout: float | None = 30.0
    """Seconds an async hook call may take before it is cancelled and reported
    (``None``: no limit). Set it on an engine's ``observers`` to change it."""

    def __init__(
        self,
        hooks: Iterable[object],
        plugin_impls: Callable[[str], list[Callable[..., Any]]] | None,
        on_error: Callable[[BaseException], Any] | None,
    ) -> None:
        self._direct = list(hooks)
        self._plugin_impls = plugin_impls
        self._on_error = on_error
        self._table: dict[str, list[Callable[..., Any]]] = {}
        # Weak: a stream its consumer dropped without closing is collected and skipped.
        self._streams: list[weakref.ref[EventStream]] = []
        self._hooked = False
        self._kinds: frozenset[type[Any]] = frozenset()
        self.wanted: frozenset[type[Any]] = frozenset()
        """The event kinds some hook or stream takes now: build an event only if its kind
        is here. Kept current by every change of hooks or streams, so the hot path reads
        it with no call (a hook for only ``reflow_run_completed`` costs nothing per step)."""
        self._stopped = False
        self.refresh()

    def refresh(self) -> None:
        """Re-read hook implementations (plugins may have been registered since)."""
        table: dict[str, list[Callable[..., Any]]] = {}
        for name in (*_HOOK_NAMES.values(), "reflow_error"):
            funcs = [
                getattr(obj, name) for obj in self._direct if callable(getattr(obj, name, None))
            ]
            if self._plugin_impls is not None:
                funcs.extend(self._plugin_impls(name))
            if funcs:
                table[name] = funcs
        self._table = table
        # Read several times per step on the hot path, so computed only on change.
        self._hooked = any(n != "reflow_error" for n in table)
        self._kinds = frozenset(kind for kind, name in _HOOK_NAMES.items() if name in table)
        self._streams_changed()

    def _streams_changed(self) -> None:
        # A stream takes every kind of event.
        self.wanted = _ALL_KINDS if self._streams else self._kinds

    @property
    def listening(self) -> bool:
        """Whether any hook or stream would receive run events (else skip building them)."""
        return self._hooked or bool(self._streams)

    def wants(self, kind: type[EngineEvent]) -> bool:
        """Whether an event of ``kind`` would reach any hook or stream (else skip building
        it): ``kind in`` :attr:`wanted`."""
        return kind in self.wanted

    @property
    def streams(self) -> list[EventStream]:
        """The streams subscribed now (left, ended and collected ones are not)."""
        self._prune()
        return [s for s in (ref() for ref in self._streams) if s is not None]

    def subscribe(self, buffer: int) -> EventStream:
        """A new stream receiving every event from now on (ended at once after stop)."""
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ConfigError(f"stream buffer must be a positive int, got {buffer!r}")
        stream = EventStream(self, buffer)
        if self._stopped:
            stream.end()
        else:
            self._streams = [*self._streams, weakref.ref(stream)]
            self._streams_changed()
        return stream

    def unsubscribe(self, stream: EventStream) -> None:
        # Lists are replaced, never changed in place: an emit going through one is safe.
        self._streams = [
            ref for ref in self._streams if (live := ref()) is not None and live is not stream
        ]
        self._streams_changed()

    def _prune(self) -> None:
        if any(ref() is None for ref in self._streams):
            self._streams = [ref for ref in self._streams if ref() is not None]
            self._streams_changed()

    def close_streams(self) -> None:
        """End every stream (the engine stopped); later subscribers get an ended one."""
        self._stopped = True
        streams, self._streams = self._streams, []
        self._streams_changed()
        for ref in streams:
            stream = ref()
            if stream is not None:
                stream.end()

    async def emit(self, event: EngineEvent) -> None:
        """Call every hook for ``event``, then offer it to every stream (never waits)."""
        name = _HOOK_NAMES[type(event)]
        for func in self._table.get(name, ()):
            pending = self._call(func, event, name)
            if pending is not None:
                await pending
        stale = False
        for ref in self._streams:
            stream = ref()
            if stream is None:
                stale = True
            else:
                stream.offer(event)
        if stale:
            self._prune()

    async def _settle(self, result: Awaitable[Any]) -> None:
        """Await a hook's result for at most :attr:`hook_timeout` seconds."""
        limit = self.hook_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                await result
        except TimeoutError:
            if deadline.expired():
                raise TimeoutError(f"no result within {limit:g}s; cancelled") from None
            raise

    def _call(self, func: Callable[..., Any], event: Any, name: str) -> Awaitable[None] | None:
        """Call hook ``func`` (an implementation of hook ``name``) with ``event``; return
        what is left to await (an async hook's result, or the report of an error), or
        ``None`` when the call is over: a sync hook costs no coroutine."""
        try:
            result = func(event)
        except BaseException as exc:
            return self._failed(exc, name)
        # A sync hook returns None: skip isawaitable's ABC check for it.
        if result is not None and inspect.isawaitable(result):
            return self._awaited(result, name)
        return None

    async def _awaited(self, result: Awaitable[Any], name: str) -> None:
        """Finish an async hook's call: await its result within the time limit."""
        try:
            await self._settle(result)
        except BaseException as exc:
            await self._failed(exc, name)

    def _failed(self, exc: BaseException, name: str) -> Awaitable[None]:
        """Report a hook's error; re-raise the engine's own cancellation instead.

        A hook that calls sys.exit() or raises its own BaseException must not end the
        run's task (or the worker); only the engine's cancellation passes.
        """
        if _cancelled_from_outside(exc):
            raise exc
        return self.error(HookError(f"{name} hook", exc))

    async def error(self, error: BaseException) -> None:
        """Report an error that is no run's outcome; never raises."""
        log.error("%s", error, exc_info=error)
        for func in self._table.get("reflow_error", ()):
            try:
                result = func(error)
                if inspect.isawaitable(result):
                    await self._settle(result)
            except BaseException as exc:
                if _cancelled_from_outside(exc):
                    raise
                log.exception("reflow_error hook raised; ignored")
        if self._on_error is not None:
            try:
                result = self._on_error(error)
                if inspect.isawaitable(result):
                    await self._settle(result)
            except BaseException as exc:
                if _cancelled_from_outside(exc):
                    raise
                log.exception("on_error callback raised; ignored")


def _cancelled_from_outside(exc: BaseException) -> bool:
    """Whether ``exc`` is the current task being cancelled (by the engine's stop or a
    caller's timeout), as opposed to a hook raising ``CancelledError`` on its own."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
