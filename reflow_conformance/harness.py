"""What a conformance case works with: a fresh adapter, builders, racers, strict asserts.

A :class:`Harness` is built by :mod:`reflow_conformance.runner` for one case and torn
down after it; every handle it opens is closed then, even when the case failed.

Time is never faked: adapters read their own clock (the conformance factory takes no
clock), so cases use times far from :func:`~reflow_core.storage.system_clock` —
:meth:`Harness.past` and :meth:`Harness.future` — and never sleep.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from reflow_core.registry import AdapterSpec, Capability, open_storage
from reflow_core.storage import StorageAdapter, system_clock
from reflow_core.types import (
    ClaimedRun,
    ErrorInfo,
    Recurrence,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

__all__ = ["ContractViolation", "Harness", "HarnessError", "assert_exact", "expect"]

T = TypeVar("T")

FAR = 10**9
"""Milliseconds (about 11.5 days): far enough that no clock drift makes a case flaky."""

BARRIER_TIMEOUT_S = 60.0
"""A racer that never reaches the barrier is a harness failure, not a hang."""


class ContractViolation(AssertionError):
    """An adapter broke a promise of the contract: says what, what was expected, what came."""

    def __init__(self, what: str, expected: Any = None, got: Any = None) -> None:
        super().__init__(f"{what}\n  expected: {expected!r}\n  got:      {got!r}")
        self.what = what
        self.expected = expected
        self.got = got


class HarnessError(Exception):
    """The kit could not set up what the case needs (not the adapter's contract failing)."""


def expect(got: Any, expected: Any, what: str) -> None:
    """Raise :class:`ContractViolation` unless ``got == expected``."""
    if got != expected:
        raise ContractViolation(what, expected, got)


def assert_exact(got: Any, expected: Any, what: str = "value", path: str = "$") -> None:
    """Equal *and* of the same type at every level: ``True``, ``1`` and ``1.0`` all differ.

    ``-0.0`` and ``0.0`` differ too (a replay must see the sign the step saw); datetimes
    must also keep their UTC offset (equal instants with other offsets differ). ``fold``
    is not compared: ``isoformat`` does not carry it and equal datetimes ignore it.
    """
    if type(got) is not type(expected):
        raise ContractViolation(
            f"{what} at {path}: type changed", type(expected).__name__, type(got).__name__
        )
    if isinstance(expected, dict):
        if list(got) != list(expected) and set(got) != set(expected):
            raise ContractViolation(f"{what} at {path}: keys differ", sorted(expected), sorted(got))
        for key, item in expected.items():
            assert_exact(got[key], item, what, f"{path}[{key!r}]")
    elif isinstance(expected, list):
        if len(got) != len(expected):
            raise ContractViolation(f"{what} at {path}: length differs", len(expected), len(got))
        for index, item in enumerate(expected):
            assert_exact(got[index], item, what, f"{path}[{index}]")
    elif isinstance(expected, float):
        same = got == expected and str(got) == str(expected)  # str tells -0.0 from 0.0
        if not same:
            raise ContractViolation(f"{what} at {path}: float differs", expected, got)
    elif isinstance(expected, datetime):
        if got != expected or got.utcoffset() != expected.utcoffset():
            raise ContractViolation(f"{what} at {path}: datetime differs", expected, got)
    elif got != expected:
        raise ContractViolation(f"{what} at {path}: value differs", expected, got)


RaceFunction = Callable[[StorageAdapter, int], Awaitable[T]]


class Harness:
    """A fresh, initialized adapter plus everything a case needs around it."""

    def __init__(
        self,
        spec: AdapterSpec,
        options: Mapping[str, str],
        tmp_path: Path,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.spec = spec
        self.options = dict(options)
        self.tmp_path = tmp_path
        self.loop = loop
        self._storage: StorageAdapter | None = None
        self._handles: list[StorageAdapter] = []
        self._counter = itertools.count(1)

    # -- lifecycle (driven by the runner) -------------------------------------

    @property
    def storage(self) -> StorageAdapter:
        """The adapter under test: fresh, empty and initialized."""
        if self._storage is None:
            raise HarnessError("the harness has no storage (setup did not run)")
        return self._storage

    async def setup(self) -> None:
        """Build and initialize the adapter under test; raises :class:`HarnessError`."""
        self._storage = await self.fresh_storage()

    async def fresh_storage(self) -> StorageAdapter:
        """Another fresh, empty, initialized adapter from the conformance factory."""
        factory = self.spec.conformance_factory
        if factory is None:
            raise HarnessError(f"adapter {self.spec.name!r} has no conformance_factory")
        directory = self.tmp_path / f"store-{next(self._counter)}"
        directory.mkdir(parents=True, exist_ok=True)
        try:
            storage = factory(directory, self.options)
        except Exception as exc:
            raise HarnessError(f"conformance factory raised {type(exc).__name__}: {exc}") from exc
        self._handles.append(storage)
        await self._initialize(storage)
        return storage

    async def _initialize(self, storage: StorageAdapter) -> None:
        try:
            await storage.initialize()
        except Exception as exc:
            # A store that cannot even be set up (server unreachable, bad option) says
            # nothing about the contract; it is reported as an error, not a failure.
            raise HarnessError(f"initialize() raised {type(exc).__name__}: {exc}") from exc

    async def close_all(self) -> list[BaseException]:
        """Close every handle opened for this case, newest first; return what raised."""
        errors: list[BaseException] = []
        while self._handles:
            handle = self._handles.pop()
            try:
                await handle.close()
            except Exception as exc:
                errors.append(exc)
        return errors

    def sync(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the case's loop; for synchronous (Hypothesis) cases only."""
        return self.loop.run_until_complete(awaitable)

    # -- other handles ----------------------------------------------------------

    @property
    def url(self) -> str:
        """URL of the store under test; :class:`HarnessError` if it cannot be shared."""
        url = self.storage.url
        if not url:
            raise HarnessError(
                f"adapter {self.spec.name!r} declares a sharing capability but its url is "
                f"{url!r}; open_storage() cannot open the same store again"
            )
        return url

    async def open_another(self) -> StorageAdapter:
        """A second initialized handle onto the same store, via ``open_storage(url)``."""
        try:
            handle = open_storage(self.url)
        except Exception as exc:
            raise HarnessError(f"open_storage({self.url!r}) raised {exc!r}") from exc
        self._handles.append(handle)
        await self._initialize(handle)
        return handle

    def has(self, capability: Capability) -> bool:
        """Whether the adapter declares ``capability``."""
        return capability in self.spec.capabilities

    # -- time -------------------------------------------------------------------

    @staticmethod
    def now() -> int:
        """Real wall-clock milliseconds (the adapter's default clock)."""
        return system_clock()

    def past(self) -> int:
        """A time certainly before the adapter's ``now``."""
        return system_clock() - FAR

    def future(self) -> int:
        """A time certainly after the adapter's ``now`` for the whole case."""
        return system_clock() + FAR

    # -- builders ---------------------------------------------------------------

    def new_id(self, prefix: str = "run") -> str:
        """A unique id that sorts after earlier ones from this harness."""
        return f"{prefix}-{next(self._counter):05d}-{uuid.uuid4().hex[:8]}"

    def new_run(
        self,
        workflow: str = "wf",
        input: Any = None,
        *,
        id: str | None = None,
        created_at: int | None = None,
        idempotency_key: str | None = None,
    ) -> WorkflowRun:
        """A ``pending`` run record, ready for ``create_run``."""
        created = self.now() if created_at is None else created_at
        return WorkflowRun(
            id=id or self.new_id(),
            workflow=workflow,
            input=input,
            status=RunStatus.PENDING,
            created_at=created,
            updated_at=created,
            idempotency_key=idempotency_key,
        )

    def step(
        self,
        run_id: str,
        name: str,
        status: StepStatus = StepStatus.COMPLETED,
        output: Any = None,
        *,
        id: str | None = None,
        error: ErrorInfo | None = None,
        created_at: int | None = None,
        wake_at: int | None = None,
        attempts: int = 1,
    ) -> StepResult:
        """A step row; its id defaults to ``"{run_id}/{name}"``."""
        created = self.now() if created_at is None else created_at
        return StepResult(
            id=id or f"{run_id}/{name}",
            run_id=run_id,
            name=name,
            status=status,
            output=output,
            error=error,
            attempts=attempts,
            created_at=created,
            updated_at=created,
            wake_at=wake_at,
        )

    def schedule(
        self,
        key: str,
        workflow: str = "wf",
        input: Any = None,
        *,
        every_ms: int | None = None,
        cron: str | None = None,
        next_run_at: int = 1_000,
        catch_up: bool = False,
    ) -> Schedule:
        """A schedule record (every minute by default)."""
        if every_ms is None and cron is None:
            every_ms = 60_000
        return Schedule(
            key=key,
            workflow=workflow,
            input=input,
            recurrence=Recurrence(every_ms=every_ms, cron=cron, catch_up=catch_up),
            next_run_at=next_run_at,
            created_at=1,
            updated_at=1,
        )

    async def create(self, workflow: str = "wf", input: Any = None, **kwargs: Any) -> WorkflowRun:
        """Create a run and return the stored record, checking ``created``."""
        result = await self.storage.create_run(self.new_run(workflow, input, **kwargs))
        expect(result.created, True, "create_run(...).created for a new run")
        return result.run

    async def get(self, run_id: str, storage: StorageAdapter | None = None) -> WorkflowRun:
        """Read a run that must exist."""
        run = await (storage or self.storage).get_run(run_id)
        if run is None:
            raise ContractViolation(f"get_run({run_id!r}) after it was created", "a run", None)
        return run

    # -- racing -----------------------------------------------------------------

    async def race_coroutines(self, count: int, fn: RaceFunction[T]) -> list[T]:
        """``count`` coroutines on the one handle, released together by a barrier."""
        barrier = asyncio.Barrier(count)

        async def racer(index: int) -> T:
            await barrier.wait()
            return await fn(self.storage, index)

        return list(await asyncio.gather(*(racer(i) for i in range(count))))

    async def race_threads(self, count: int, fn: RaceFunction[T]) -> list[T]:
        """``count`` OS threads, each with its own handle and event loop, barrier-released.

        Each thread opens ``open_storage(url)`` and initializes it *before* the barrier,
        so the race is between the calls under test, not between connection set-ups.
        """
        url = self.url
        barrier = threading.Barrier(count)
        results: list[Any] = [None] * count
        errors: list[BaseException | None] = [None] * count

        async def thread_main(index: int) -> None:
            handle = open_storage(url)
            try:
                await handle.initialize()
                barrier.wait(BARRIER_TIMEOUT_S)
                results[index] = await fn(handle, index)
            finally:
                await handle.close()

        def target(index: int) -> None:
            try:
                asyncio.run(thread_main(index))
            except BaseException as exc:
                errors[index] = exc
                barrier.abort()

        def run_all() -> None:
            threads = [
                threading.Thread(target=target, args=(i,), name=f"reflow-racer-{i}")
                for i in range(count)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        await asyncio.to_thread(run_all)
        for error in errors:
            if isinstance(error, AssertionError):
                raise error
            if isinstance(error, threading.BrokenBarrierError):
                continue  # another racer's error broke the barrier; that one is reported
            if error is not None:
                raise error
        if any(isinstance(e, threading.BrokenBarrierError) for e in errors):
            raise HarnessError("racer threads never all reached the start barrier")
        return results

    # -- shortcuts used by many cases -------------------------------------------

    async def claim(
        self,
        run_id: str,
        names: Collection[str] = ("wf",),
        stale_before: int | None = None,
        storage: StorageAdapter | None = None,
    ) -> ClaimedRun:
        """Claim and check that the claimed run is ``run_id``."""
        claimed = await (storage or self.storage).claim_next_run(names, stale_before)
        if claimed is None or claimed.run.id != run_id:
            raise ContractViolation(
                f"claim_next_run({list(names)!r}, stale_before={stale_before}) should claim "
                f"run {run_id}",
                run_id,
                claimed.run.id if claimed else None,
            )
        return claimed

    async def created_and_claimed(self, workflow: str = "wf", input: Any = None) -> ClaimedRun:
        """A new run of ``workflow``, claimed."""
        run = await self.create(workflow, input)
        return await self.claim(run.id, (workflow,))

    async def snapshot(self, run_ids: Collection[str]) -> Any:
        """Everything readable about these runs and all schedules, to prove "unchanged"."""
        runs = [await self.storage.get_run(run_id) for run_id in run_ids]
        steps = [await self.storage.get_step_results(run_id) for run_id in run_ids]
        listed = await self.storage.list_runs(RunFilter(limit=10_000))
        return runs, steps, listed, await self.storage.list_schedules()

    async def expect_unchanged(self, before: Any, run_ids: Collection[str], what: str) -> None:
        """Fail if anything readable changed since :meth:`snapshot` returned ``before``."""
        after = await self.snapshot(run_ids)
        labels = ("get_run", "get_step_results", "list_runs", "list_schedules")
        for label, old, new in zip(labels, before, after, strict=True):
            expect(new, old, f"{what}: {label} must be unchanged")
