"""The engine: binds workflows to storage, enqueues runs, and executes them.

One async implementation (``reflow_core.sync`` wraps it for synchronous callers)::

    import asyncio
    from reflow_core import Engine, Workflow

    hello = Workflow("hello")

    @hello.step
    def greet(ctx) -> str:
        return f"hello {ctx.input['name']}"

    async def main() -> None:
        async with Engine("sqlite:///reflow.db", [hello]) as engine:
            run = await engine.enqueue("hello", {"name": "Ada"})
            done = await engine.wait_for(run.id)
            print(done.output)        # hello Ada

Constructing an engine does no I/O; ``start()`` (or ``async with``) initializes the
storage and starts claiming. An engine that only enqueues and reads (a web view) needs
no ``start()``: the storage is initialized on first use.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from reflow_core import codec
from reflow_core.dispatcher import Dispatcher
from reflow_core.durations import Duration, to_seconds
from reflow_core.errors import (
    ConfigError,
    DuplicateWorkflowError,
    EngineStoppedError,
    IdempotencyConflictError,
    ReflowError,
    RunCancelledError,
    WorkflowNotFoundError,
)
from reflow_core.events import RunCancelled
from reflow_core.execution import ActiveRun, RunExecution, Runtime
from reflow_core.execution.wait import event_payload
from reflow_core.identifiers import MAX_LENGTH, check_identifier, is_identifier, new_run_id
from reflow_core.lease import LeaseOptions
from reflow_core.migrations import open_without_migrating
from reflow_core.observers import EventStream, Observers
from reflow_core.registry import hook_functions, open_storage
from reflow_core.retention import RetentionPolicy, retention_loop
from reflow_core.scheduling import Scheduler, build_schedule
from reflow_core.storage import Clock, StorageAdapter, WorkNotifier, system_clock
from reflow_core.types import (
    ClaimedRun,
    LeaseHolder,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    WorkflowRun,
)
from reflow_core.waits import wait_set
from reflow_core.workflow import Workflow

__all__ = ["Engine", "RunView"]

_RECANCEL_EVERY_S = 0.5
_BACKGROUND_STOP_S = 10.0
"""How long ``stop()`` keeps cancelling a background task that will not end."""

_ACTIVE_STATUSES = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SLEEPING, RunStatus.WAITING)


class RunView(msgspec.Struct, frozen=True):
    """A run and its step rows, as returned by :meth:`Engine.get_run`."""

    run: WorkflowRun
    steps: list[StepResult]

    @property
    def outputs(self) -> dict[str, Any]:
        """Outputs of the completed steps, by name."""
        return {s.name: s.output for s in self.steps if s.status.is_done and s.status != "skipped"}


def _host_name() -> str:
    """This machine's name as a valid lease-holder identifier (it is only informational):
    a name the OS reports with control characters or undecodable bytes has them replaced
    by ``?``, and it is cut to the identifier length limit."""
    host = socket.gethostname()[:MAX_LENGTH]
    if is_identifier(host):
        return host
    cleaned = "".join(c if is_identifier(c) else "?" for c in host)
    return cleaned or "unknown-host"


class Engine:
    """Executes registered workflows on one storage.

    ``concurrency`` bounds the runs executing at once in this engine; ``lease`` sets how
    long a claim survives without a heartbeat; ``poll_interval`` (seconds) is how often
    an idle engine looks for work enqueued by *other* processes when the storage cannot
    notify it. ``hooks`` are objects with ``reflow_*`` hook methods; ``on_error``
    receives errors that are no run's outcome. ``worker_id`` names this engine as the
    holder of the runs it claims (default: a random id). ``clock`` (milliseconds) is for
    tests: it stamps records and paces local waits; leases, wake-ups and due times are
    always judged by the storage's clock. ``retention`` (``"30d"``, a ``timedelta``,
    seconds, or a :class:`~reflow_core.retention.RetentionPolicy`) makes the started
    engine delete finished runs older than that, with their steps and events,
    periodically and in bounded batches; unfinished runs are never deleted. With
    ``migrate=False`` the engine never changes the store's schema: a store that is not
    at this version's schema raises :class:`~reflow_core.migrations.SchemaNotCurrentError`
    naming the command to run (``reflow db migrate``).
    """

    def __init__(
        self,
        storage: StorageAdapter | str,
        workflows: Iterable[Workflow[Any]] = (),
        *,
        concurrency: int = 10,
        lease: LeaseOptions | None = None,
        poll_interval: Duration = 1.0,
        hooks: Iterable[object] = (),
        on_error: Callable[[BaseException], Any] | None = None,
        clock: Clock | None = None,
        use_plugins: bool = True,
        worker_id: str | None = None,
        retention: Duration | RetentionPolicy | None = None,
        migrate: bool = True,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be a positive int, got {concurrency!r}")
        self._owns_storage = isinstance(storage, str)
        self.storage: StorageAdapter = (
            open_storage(storage) if isinstance(storage, str) else storage
        )
        self.concurrency = concurrency
        self.lease = lease or LeaseOptions()
        self.poll_interval = to_seconds(poll_interval, what="poll_interval", allow_zero=False)
        self.clock: Clock = clock or system_clock
        if worker_id is not None:
            check_identifier(worker_id, "worker_id")
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.retention = RetentionPolicy.parse(retention)
        self.migrate = migrate
        self.workflows: dict[str, Workflow[Any]] = {}
        for workflow in workflows:
            self.register(workflow)
        self.observers = Observers(hooks, hook_functions if use_plugins else None, on_error)
        self._initialized = False
        self._init_lock: asyncio.Lock | None = None
        self._dispatcher: Dispatcher | None = None
        self._scheduler: Scheduler | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._runtime: Runtime | None = None
        self._background: list[asyncio.Task[None]] = []
        self._finished: dict[str, asyncio.Event] = {}
        self._started = False
        self._closed = False

    def register(self, workflow: Workflow[Any]) -> None:
        """Add a workflow before the engine starts."""
        if not isinstance(workflow, Workflow):
            raise ConfigError(f"expected a Workflow, got {workflow!r}")
        if getattr(self, "_started", False):
            raise ConfigError("register workflows before the engine starts")
        if workflow.name in self.workflows:
            raise DuplicateWorkflowError(f"two workflows are named {workflow.name!r}")
        self.workflows[workflow.name] = workflow

    def workflow(self, name_or_workflow: str | Workflow[Any]) -> Workflow[Any]:
        """The registered workflow of that name; :class:`WorkflowNotFoundError` otherwise."""
        name = name_or_workflow.name if isinstance(name_or_workflow, Workflow) else name_or_workflow
        found = self.workflows.get(name)
        if found is None:
            raise WorkflowNotFoundError(name, list(self.workflows))
        return found

    # -- lifecycle ------------------------------------------------------------

    async def _ready(self) -> None:
        if self._closed:
            raise ConfigError("this engine was stopped; create a new Engine")
        if self._initialized:
            return
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if not self._initialized:
                if self.migrate:
                    await self.storage.initialize()
                else:
                    await open_without_migrating(self.storage)
                self._initialized = True

    def _get_dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            self._threads = ThreadPoolExecutor(
                max_workers=max(4, self.concurrency * 2), thread_name_prefix="reflow-step"
            )
            self._dispatcher = Dispatcher(
                storage=self.storage,
                names=list(self.workflows),
                concurrency=self.concurrency,
                lease=self.lease,
                poll_interval=self.poll_interval,
                clock=self.clock,
                observers=self.observers,
                # Read when the engine first claims, not when it is built: a worker
                # process forked after building the engine reports its own pid.
                holder=LeaseHolder(worker=self.worker_id, host=_host_name(), pid=os.getpid()),
                execute=self._execute,
            )
        return self._dispatcher

    def _get_scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = Scheduler(
                storage=self.storage,
                names=list(self.workflows),
                clock=self.clock,
                observers=self.observers,
                enqueue=lambda name, input, key: self.enqueue(name, input, idempotency_key=key),
                poll_interval=self.poll_interval,
            )
        return self._scheduler

    async def start(self) -> None:
        """Initialize storage and start claiming and executing runs in the background."""
        await self._ready()
        if self._started:
            return
        self._started = True
        dispatcher = self._get_dispatcher()
        self.observers.refresh()
        self._background.append(asyncio.create_task(dispatcher.loop(), name="reflow-dispatch"))
        self._background.append(
            asyncio.create_task(dispatcher.heartbeat_loop(), name="reflow-heartbeat")
        )
        # Its own task, not a run slot: a busy engine still fires its schedules.
        self._background.append(
            asyncio.create_task(self._get_scheduler().loop(), name="reflow-schedules")
        )
        if self.retention is not None:
            self._background.append(
                asyncio.create_task(
                    retention_loop(self.storage, self.retention, self.observers.error),
                    name="reflow-retention",
                )
            )
        if isinstance(self.storage, WorkNotifier):
            self._background.append(
                asyncio.create_task(
                    self.storage.listen_for_work(dispatcher.poke), name="reflow-notify"
                )
            )

    async def stop(self, grace: Duration = 0) -> None:
        """Stop claiming; give running runs ``grace`` seconds to finish; release the rest.

        Runs still executing after the grace period are interrupted and their leases
        released, so any worker can resume them at once. A plain ``def`` step cannot be
        interrupted: its run keeps its lease (and its heartbeat) until the function
        returns, and is released only then, so no other worker runs the same step at the
        same time; ``stop`` returns after that. Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        grace_s = to_seconds(grace, what="grace")
        if self._dispatcher is not None:
            await self._dispatcher.stop(
                grace_s, lambda active: active.abort(EngineStoppedError(active.run_id))
            )
        for task in self._background:
            task.cancel()
        await self._end_background()
        self._background.clear()
        self.observers.close_streams()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._owns_storage:
            await self.storage.close()

    async def _end_background(self) -> None:
        """Wait for the cancelled background tasks to end, cancelling again any that
        swallowed its cancellation (a driver's read loop can); after
        :data:`_BACKGROUND_STOP_S` report what still runs and leave it: ``stop()`` never
        hangs on a task that will not end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _BACKGROUND_STOP_S
        pending = set(self._background)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=_RECANCEL_EVERY_S)
            for task in done:  # retrieved, as gather(return_exceptions=True) would
                if not task.cancelled():
                    task.exception()
            if not pending:
                return
            if loop.time() >= deadline:
                names = ", ".join(sorted(task.get_name() for task in pending))
                await self.observers.error(
                    ReflowError(
                        f"background task(s) {names} did not end within "
                        f"{_BACKGROUND_STOP_S:g}s of being cancelled; stop() leaves them "
                        "behind (a storage driver that swallows cancellation?)"
                    )
                )
                return
            for task in pending:
                task.cancel()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run_until_idle(self) -> int:
        """Execute claimable runs until none is left; return how many were executed.

        For tests and batch jobs: no background task is left behind. Runs that suspend
        (sleep, wait) count once per claim. Due schedules fire before each drain, until
        a drain ends with none due.
        """
        await self._ready()
        dispatcher = self._get_dispatcher()
        scheduler = self._get_scheduler()
        beats = asyncio.create_task(dispatcher.heartbeat_loop())
        try:
            executed = 0
            while True:
                fired = await scheduler.fire_due()
                executed += await dispatcher.drain()
                if not fired:
                    return executed
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)

    # -- execution ------------------------------------------------------------

    def _execute(self, claimed: ClaimedRun, active: ActiveRun) -> Awaitable[None]:
        # A plain function handing back the execution's coroutine: no frame of its own
        # stays on every run's stack.
        if self._runtime is None:
            dispatcher = self._get_dispatcher()
            assert self._threads is not None
            self._runtime = Runtime(
                storage=self.storage,
                clock=self.clock,
                observers=self.observers,
                threads=self._threads,
                lease=self.lease,
                note_wake=dispatcher.note_wake,
                run_finished=self._run_finished,
            )
        runtime = self._runtime
        workflow = self.workflow(claimed.run.workflow)
        return RunExecution(runtime, claimed, workflow, active).execute()

    def _run_finished(self, run_id: str) -> None:
        event = self._finished.pop(run_id, None)
        if event is not None:
            event.set()

    # -- runs -----------------------------------------------------------------

    async def enqueue(
        self,
        workflow: str | Workflow[Any],
        input: Any = None,
        *,
        idempotency_key: str | None = None,
    ) -> WorkflowRun:
        """Create a pending run; nothing is stored if the input is invalid.

        With ``idempotency_key``, a second enqueue with the same key and an equal input
        returns the existing run; with a different input it raises
        :class:`IdempotencyConflictError`.
        """
        wf = self.workflow(workflow)
        if idempotency_key is not None:
            check_identifier(idempotency_key, "idempotency_key")
        plain = wf.validate_input(input)
        codec.check(plain)
        await self._ready()
        now = self.clock()
        run = WorkflowRun(
            id=new_run_id(),
            workflow=wf.name,
            input=plain,
            status=RunStatus.PENDING,
            created_at=now,
            updated_at=now,
            idempotency_key=idempotency_key,
        )
        result = await self.storage.create_run(run)
        if not result.created:
            if codec.canonical(result.run.input) != codec.canonical(plain):
                raise IdempotencyConflictError(wf.name, idempotency_key or "", result.run.id)
            return result.run
        if self._dispatcher is not None:
            self._dispatcher.poke()
        return result.run

    async def get_run(self, run_id: str) -> RunView | None:
        """The run with its step rows, or ``None`` if there is no such run."""
        await self._ready()
        run = await self.storage.get_run(run_id)
        if run is None:
            return None
        return RunView(run=run, steps=await self.storage.get_step_results(run_id))

    async def wait_for(self, run_id: str, *, within: Duration | None = None) -> WorkflowRun:
        """Wait until the run is completed, failed or cancelled; return it.

        Runs finished by this engine wake the waiter at once; runs executed elsewhere are
        seen at the next poll. Raises :class:`TimeoutError` after ``within`` seconds.
        """
        await self._ready()
        limit = None if within is None else to_seconds(within, what="within")
        async with asyncio.timeout(limit):
            while True:
                event = self._finished.setdefault(run_id, asyncio.Event())
                run = await self.storage.get_run(run_id)
                if run is None:
                    raise ConfigError(f"no run with id {run_id!r}")
                if run.status.is_terminal:
                    self._finished.pop(run_id, None)
                    return run
                await wait_set(event, self.poll_interval)

    async def cancel(self, run_id: str) -> bool:
        """Cancel a pending, running, sleeping or waiting run; ``False`` if it had ended.

        The status change is one conditional write, so a run that completes at the same
        moment is never overwritten. A run executing in this engine stops at once; one
        executing elsewhere stops at its worker's next heartbeat.
        """
        await self._ready()
        changed = await self.storage.update_run_status(
            run_id, RunStatus.CANCELLED, expected=_ACTIVE_STATUSES
        )
        if not changed:
            return False
        active = self._dispatcher.active.get(run_id) if self._dispatcher is not None else None
        if active is not None:
            # Its execution stops and says so itself (RunCancelled, executing=True).
            active.abort(RunCancelledError(run_id))
        elif self.observers.listening:
            run = await self.storage.get_run(run_id)
            if run is not None:
                await self.observers.emit(
                    RunCancelled(
                        run_id=run_id, workflow=run.workflow, at=self.clock(), executing=False
                    )
                )
        return True

    async def resume(self, run_id: str) -> bool:
        """Put a failed or cancelled run back to pending; it resumes at the step that
        failed, keeping completed steps. ``False`` if the run is missing or not resumable."""
        await self._ready()
        run = await self.storage.get_run(run_id)
        if run is None:
            return False
        self.workflow(run.workflow)
        resumed = await self.storage.requeue_run(run_id)
        if resumed and self._dispatcher is not None:
            self._dispatcher.poke()
        return resumed

    async def list_runs(
        self,
        *,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        before: int | None = None,
        before_id: str | None = None,
        limit: int = 100,
    ) -> list[WorkflowRun]:
        """Runs newest first. For the next page pass the last run's ``created_at`` and
        ``id`` as ``before`` and ``before_id`` (exact: no run skipped or repeated)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive int, got {limit!r}")
        if before_id is not None and before is None:
            raise ConfigError("before_id needs before (the created_at of that run)")
        try:
            parsed = RunStatus(status) if status is not None else None
        except ValueError:
            known = ", ".join(s.value for s in RunStatus)
            raise ConfigError(f"unknown run status {status!r}; known: {known}") from None
        await self._ready()
        return await self.storage.list_runs(
            RunFilter(
                status=parsed, workflow=workflow, before=before, before_id=before_id, limit=limit
            )
        )

    async def send_event(
        self, run_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> bool:
        """Deliver event ``name`` to a run; it is buffered durably until the run takes it.

        The payload is validated against the wait's declared type now
        (:class:`ValidationError` to the sender). ``True`` only if the event is stored for
        a run that had not ended; ``False`` if the run does not exist or has ended (the
        store checks and writes in one step). With ``key``, sending again with the same
        key delivers nothing more, so a sender may retry safely. :class:`ConfigError` if
        the run's workflow has no wait of that name.
        """
        check_identifier(run_id, "run id")
        check_identifier(name, "event name")
        if key is not None:
            check_identifier(key, "event key")
        await self._ready()
        run = await self.storage.get_run(run_id)
        if run is None or run.status.is_terminal:
            return False
        plain = event_payload(self.workflow(run.workflow), name, payload)
        delivered = await self.storage.deliver_event(run_id, name, plain, key=key)
        if delivered and self._dispatcher is not None:
            self._dispatcher.poke()
        return delivered

    # -- schedules ------------------------------------------------------------

    async def schedule(
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
        """Register a durable schedule (an interval ``every`` or a ``cron`` expression in
        ``timezone``) and return its key; see :mod:`reflow_core.scheduling`.

        Re-registering an unchanged schedule keeps its cadence. A malformed or
        unsatisfiable recurrence raises :class:`ConfigError` and stores nothing.
        """
        wf = self.workflow(workflow)
        await self._ready()
        record = build_schedule(
            wf,
            input,
            every=every,
            cron=cron,
            timezone=timezone,
            key=key,
            catch_up=catch_up,
            now=await self.storage.now(),  # the first firing is judged by the store's clock
        )
        await self.storage.upsert_schedule(record)
        if self._scheduler is not None:
            self._scheduler.poke()
        return record.key

    async def unschedule(self, key: str) -> bool:
        """Remove a schedule for every worker; ``False`` if there was none."""
        await self._ready()
        return await self.storage.delete_schedule(key)

    async def list_schedules(self) -> list[Schedule]:
        """All schedules (of every workflow), ordered by key."""
        await self._ready()
        return await self.storage.list_schedules()

    def events(self, *, buffer: int = 1000) -> EventStream:
        """An async iterator over this engine's events from now on; ends when it stops.

        Never slows a run: with ``buffer`` events waiting, further ones are lost for this
        stream (counted in its ``dropped``, see :class:`EventStream`) until the consumer
        reads. Leaving ``async for`` (or ``aclose()``) unsubscribes the stream.
        """
        return self.observers.subscribe(buffer)
