"""A thin synchronous facade over :class:`~reflow_core.Engine`, for code without an event loop.

The engine keeps running on an event loop in a background thread; each method submits
the matching coroutine there and blocks for its result. Nothing is implemented twice:
every public :class:`Engine` operation has a method here of the same name and
parameters (a test compares them), whose docstring points to the engine's::

    from reflow_core.sync import SyncEngine

    engine = SyncEngine(Engine("sqlite:///app.db", [signup]), worker=False)
    run = engine.enqueue("signup", {"email": "ada@example.com"})   # e.g. in a Flask view
    engine.send_event(run.id, "confirmed", {"at": "..."})
    print(engine.get_run(run.id).run.status)
    engine.close()

With ``worker=True`` (the default) the engine also claims and executes runs in that
thread, so a plain script can host a worker. :meth:`events` is a blocking iterator.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from reflow_core.durations import Duration
from reflow_core.engine import Engine, RunView
from reflow_core.events import EngineEvent
from reflow_core.observers import EventStream
from reflow_core.types import RunStatus, Schedule, WorkflowRun
from reflow_core.workflow import Workflow

__all__ = ["SyncEngine", "SyncEventStream"]

T = TypeVar("T")


class SyncEventStream:
    """A blocking iterator over an :class:`~reflow_core.EventStream` living on the
    engine's loop thread. ``for event in stream`` ends when the engine stops; leave early
    with :meth:`close` (or ``with stream:``), which unsubscribes it."""

    def __init__(self, owner: SyncEngine, stream: EventStream) -> None:
        self._owner = owner
        self.stream = stream
        """The underlying stream (``dropped`` and ``missed`` count lost events)."""

    def __iter__(self) -> Iterator[EngineEvent]:
        return self

    def __next__(self) -> EngineEvent:
        try:
            return self._owner._call(self.stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Leave the stream: unsubscribe it and discard what is buffered."""
        if self._owner._loop is not None:
            self._owner._call(self.stream.aclose())

    def __enter__(self) -> SyncEventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncEngine:
    """Runs an :class:`Engine` on a private event loop thread; every call blocks."""

    def __init__(self, engine: Engine, *, worker: bool = True) -> None:
        self.engine = engine
        self._worker = worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=serve, name="reflow-sync", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
                if self._worker:
                    asyncio.run_coroutine_threadsafe(self.engine.start(), loop).result()
            return self._loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    # -- lifecycle ------------------------------------------------------------

    def register(self, workflow: Workflow[Any]) -> None:
        """See :meth:`Engine.register`."""
        self.engine.register(workflow)

    def workflow(self, name_or_workflow: str | Workflow[Any]) -> Workflow[Any]:
        """See :meth:`Engine.workflow`."""
        return self.engine.workflow(name_or_workflow)

    def start(self) -> None:
        """Start the loop thread (and the worker, if enabled). Calls do this implicitly."""
        self._ensure_loop()

    def stop(self, grace: Duration = 0) -> None:
        """Stop the engine (releasing leases) and the loop thread. Safe to call twice.
        See :meth:`Engine.stop`."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.engine.stop(grace), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    close = stop
    """Another name of :meth:`stop`."""

    def __enter__(self) -> SyncEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_until_idle(self) -> int:
        """See :meth:`Engine.run_until_idle`."""
        return self._call(self.engine.run_until_idle())

    # -- runs -----------------------------------------------------------------

    def enqueue(
        self,
        workflow: str | Workflow[Any],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
    ) -> WorkflowRun:
        """See :meth:`Engine.enqueue`."""
        return self._call(self.engine.enqueue(workflow, input, idempotency_key=idempotency_key))

    def get_run(self, run_id: str) -> RunView | None:
        """See :meth:`Engine.get_run`."""
        return self._call(self.engine.get_run(run_id))

    def wait_for(self, run_id: str, *, within: Duration | None = None) -> WorkflowRun:
        """See :meth:`Engine.wait_for`."""
        return self._call(self.engine.wait_for(run_id, within=within))

    def cancel(self, run_id: str) -> bool:
        """See :meth:`Engine.cancel`."""
        return self._call(self.engine.cancel(run_id))

    def resume(self, run_id: str) -> bool:
        """See :meth:`Engine.resume`."""
        return self._call(self.engine.resume(run_id))

    def list_runs(
        self,
        *,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        before: int | None = None,
        before_id: str | None = None,
        limit: int = 100,
    ) -> list[WorkflowRun]:
        """See :meth:`Engine.list_runs`."""
        return self._call(
            self.engine.list_runs(
                status=status, workflow=workflow, before=before, before_id=before_id, limit=limit
            )
        )

    def send_event(
        self, run_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> bool:
        """See :meth:`Engine.send_event`."""
        return self._call(self.engine.send_event(run_id, name, payload, key=key))

    # -- schedules ------------------------------------------------------------

    def schedule(
        self,
        workflow: str | Workflow[Any],
        input: Any = None,
        *,
        every: Duration | None = None,
        cron: str | None = None,
        timezone: str = "UTC",
        key: str | None = None,
        catch_up: bool = False,
    ) -> str:
        """See :meth:`Engine.schedule`."""
        return self._call(
            self.engine.schedule(
                workflow,
                input,
                every=every,
                cron=cron,
                timezone=timezone,
                key=key,
                catch_up=catch_up,
            )
        )

    def unschedule(self, key: str) -> bool:
        """See :meth:`Engine.unschedule`."""
        return self._call(self.engine.unschedule(key))

    def list_schedules(self) -> list[Schedule]:
        """See :meth:`Engine.list_schedules`."""
        return self._call(self.engine.list_schedules())

    # -- events ---------------------------------------------------------------

    def events(self, *, buffer: int = 1000) -> SyncEventStream:
        """A blocking iterator over the engine's events from now on; see
        :meth:`Engine.events` (the same bounded, lossy buffer)."""

        async def subscribe() -> EventStream:
            # On the loop thread: the stream's wake-up event belongs to that loop.
            return self.engine.events(buffer=buffer)

        return SyncEventStream(self, self._call(subscribe()))
