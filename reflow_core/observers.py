"""Delivery of engine events to hooks and streams, isolated from runs.

Hooks come from two places: plugins in the ``reflow`` entry-point group (every engine
fires them) and objects passed to ``Engine(hooks=[...])``. A hook is a function named
after a hook specification (``reflow_run_completed(event)``), sync or async. Each is
called on its own, so one that raises neither stops the others nor changes the run:
its error is wrapped in :class:`HookError` and reported through ``reflow_error`` hooks,
the ``on_error`` callback and the ``reflow`` logger.

Pluggy calls are untyped; this is the only place the engine touches them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from reflow_core.errors import ConfigError, HookError
from reflow_core.events import (
    EngineEvent,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepCompleted,
    StepSkipped,
    StepStarted,
)

__all__ = ["EventStream", "Observers"]

log = logging.getLogger("reflow")

_HOOK_NAMES: dict[type[Any], str] = {
    RunStarted: "reflow_run_started",
    StepStarted: "reflow_step_started",
    StepCompleted: "reflow_step_completed",
    StepSkipped: "reflow_step_skipped",
    RunCompleted: "reflow_run_completed",
    RunFailed: "reflow_run_failed",
}
_END: Any = object()


class EventStream:
    """An async iterator over engine events with a bounded buffer.

    When the buffer is full the engine waits (backpressure) before going on with the run
    that produced the event. The stream ends when the engine stops or when the consumer
    leaves the ``async for`` (or calls :meth:`aclose`).
    """

    def __init__(self, owner: Observers, buffer: int) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=buffer)
        self.closed = False

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self

    async def __anext__(self) -> EngineEvent:
        if self.closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        event: EngineEvent = item
        return event

    async def deliver(self, event: EngineEvent) -> None:
        if not self.closed:
            await self._queue.put(event)

    def end(self) -> None:
        """Finish the stream: the consumer gets what is buffered, then the end."""
        if self.closed:
            return
        self.closed = True
        if self._queue.empty():
            self._queue.put_nowait(_END)

    async def aclose(self) -> None:
        """Leave the stream now, discarding what is buffered and unblocking the engine."""
        self._owner.unsubscribe(self)
        self.closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Observers:
    """Hooks and streams of one engine."""

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
        self._streams: list[EventStream] = []
        self._listening = False
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
        self._update_listening()

    def _update_listening(self) -> None:
        # Read several times per step on the hot path, so computed only on change.
        self._listening = bool(self._streams) or any(n != "reflow_error" for n in self._table)

    @property
    def listening(self) -> bool:
        """Whether any hook or stream would receive run events (else skip building them)."""
        return self._listening

    def subscribe(self, buffer: int) -> EventStream:
        """A new stream receiving every event from now on."""
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ConfigError(f"stream buffer must be a positive int, got {buffer!r}")
        stream = EventStream(self, buffer)
        self._streams.append(stream)
        self._update_listening()
        return stream

    def unsubscribe(self, stream: EventStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
            self._update_listening()

    def close_streams(self) -> None:
        for stream in self._streams:
            stream.end()
        self._streams.clear()
        self._update_listening()

    async def emit(self, event: EngineEvent) -> None:
        """Call every hook for ``event``, then hand it to every stream."""
        for func in self._table.get(_HOOK_NAMES[type(event)], ()):
            await self._call(func, event, f"{_HOOK_NAMES[type(event)]} hook")
        for stream in list(self._streams):
            try:
                await stream.deliver(event)
            except Exception as exc:  # pragma: no cover - a Queue put does not fail
                await self.error(HookError("event stream delivery", exc))

    async def _call(self, func: Callable[..., Any], event: Any, where: str) -> None:
        try:
            result = func(event)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            await self.error(HookError(where, exc))

    async def error(self, error: BaseException) -> None:
        """Report an error that is no run's outcome; never raises."""
        log.error("%s", error, exc_info=error)
        for func in self._table.get("reflow_error", ()):
            try:
                result = func(error)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("reflow_error hook raised; ignored")
        if self._on_error is not None:
            try:
                result = self._on_error(error)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_error callback raised; ignored")
