"""What a conformance case works with: a fresh adapter, builders, racers, strict asserts.

A :class:`Harness` is built by :mod:`reflow_conformance.runner` for one case and torn
down after it; every handle it opens is closed then, even when the case failed.

Time is the kit's: every case gets a :class:`KitClock`, a manual clock that starts near
real time and moves only when the case calls :meth:`Harness.advance`. The conformance
factory receives it as ``clock=`` and the adapter must use it as the store's "now"
(:meth:`~reflow_core.storage.StorageAdapter.now`), so a case can put a lease exactly one
millisecond before or at its expiry, and never sleeps. Every handle the harness opens in
this process (another handle from ``url``, one per racer thread) shares that clock.
Handles in other processes cannot: they use the store's own clock, and the cases that
race them wait (a bounded poll of ``now()``) for that clock to pass an expiry instead.
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
    LeaseHolder,
    Recurrence,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

__all__ = [
    "KIT_HOLDER",
    "LEASE_MS",
    "ContractViolation",
    "Harness",
    "HarnessError",
    "KitClock",
    "assert_exact",
    "expect",
]

T = TypeVar("T")

FAR = 10**9
"""Milliseconds (about 11.5 days): :meth:`Harness.past` and :meth:`Harness.future` are this
far from the kit clock, so no case's own advances reach them."""

LEASE_MS = 20_000
"""The lease length :meth:`Harness.claim` asks for unless told otherwise. Deliberately not
a round default such as 30 s, so an adapter that ignores ``lease_ms`` is caught."""

KIT_HOLDER = LeaseHolder(worker="kit-worker-\u00e9-1", host="kit-host.example", pid=4242)
"""The holder :meth:`Harness.claim` presents unless told otherwise."""

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

_DEFAULT: Any = object()


class KitClock:
    """A manual clock in epoch milliseconds: starts near real time, moves only by hand.

    Callable (it is a :data:`~reflow_core.storage.Clock`), safe to read and advance from
    several threads, and never moves backwards.
    """

    def __init__(self, start: int | None = None) -> None:
        self._now = system_clock() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return self._now

    def advance(self, ms: int) -> int:
        """Move forward by ``ms`` (>= 0) milliseconds; return the new time."""
        if ms < 0:
            raise HarnessError(f"the kit clock never moves backwards (advance({ms}))")
        with self._lock:
            self._now += ms
            return self._now

    def advance_to(self, at: int) -> int:
        """Move forward to ``at`` if it is later than now; return the new time."""
        with self._lock:
            self._now = max(self._now, at)
            return self._now

    def __repr__(self) -> str:
        return f"KitClock({self._now})"


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
        self.clock = KitClock()
        """The case's clock: the store's "now" for every handle opened in this process."""
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
        """Another fresh, empty, initialized adapter from the conformance factory, called
        as ``factory(tmp_path, options, clock=self.clock)``."""
        factory = self.spec.conformance_factory
        if factory is None:
            raise HarnessError(f"adapter {self.spec.name!r} has no conformance_factory")
        directory = self.tmp_path / f"store-{next(self._counter)}"
        directory.mkdir(parents=True, exist_ok=True)
        try:
            storage = factory(directory, self.options, clock=self.clock)
        except TypeError as exc:
            if "clock" not in str(exc):
                raise HarnessError(f"conformance factory raised TypeError: {exc}") from exc
            raise HarnessError(
                f"conformance factory raised TypeError: {exc}; since storage contract 2.0 "
                "it is called as factory(tmp_path, options, clock=clock) and the adapter "
                "must use that clock as the store's now"
            ) from exc
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

    def open_url(self, url: str, *, shared_clock: bool = True) -> StorageAdapter:
        """``open_storage(url, clock=self.clock)`` (or without the clock), not initialized.

        The adapter's URL factory must accept ``clock=`` for the kit to share its clock
        with handles it opens in this process; a factory that refuses is a harness error
        naming the requirement.
        """
        options: dict[str, Any] = {"clock": self.clock} if shared_clock else {}
        try:
            return open_storage(url, **options)
        except Exception as exc:
            raise HarnessError(
                f"open_storage({url!r}{', clock=<kit clock>' if shared_clock else ''}) "
                f"raised {exc!r}; the URL factory must accept clock= (the store's 'now' "
                "for tests)"
            ) from exc

    async def open_another(self, *, shared_clock: bool = True) -> StorageAdapter:
        """A second initialized handle onto the same store, via ``open_storage(url)``,
        sharing the kit clock unless ``shared_clock=False`` (then it reads the store's own
        clock, as a handle in another process would)."""
        handle = self.open_url(self.url, shared_clock=shared_clock)
        self._handles.append(handle)
        await self._initialize(handle)
        return handle

    def has(self, capability: Capability) -> bool:
        """Whether the adapter declares ``capability``."""
        return capability in self.spec.capabilities

    # -- time -------------------------------------------------------------------

    def now(self) -> int:
        """The kit clock's time: what the adapter's ``now()`` must answer."""
        return self.clock()

    def advance(self, ms: int) -> int:
        """Move the kit clock (the store's "now") forward by ``ms``; return the new time."""
        return self.clock.advance(ms)

    def past(self) -> int:
        """A time certainly before the store's ``now`` for the whole case."""
        return self.clock() - FAR

    def future(self) -> int:
        """A time certainly after the store's ``now`` for the whole case."""
        return self.clock() + FAR

    async def expire(self, run_id: str, storage: StorageAdapter | None = None) -> int:
        """Advance the clock exactly to the run's ``lease_expires_at`` (when it is later),
        so its lease has just expired; return the new time.

        If the adapter reports no expiry, advance by :data:`LEASE_MS` (what
        :meth:`claim` asks for), so the cases that need a takeover still get one.
        """
        run = await self.get(run_id, storage)
        target = run.lease_expires_at
        if target is None:
            target = self.now() + LEASE_MS
        return self.clock.advance_to(target)

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

        Each thread opens ``open_storage(url, clock=<kit clock>)`` and initializes it
        *before* the barrier, so the race is between the calls under test, not between
        connection set-ups. All share the kit clock.
        """
        url = self.url
        barrier = threading.Barrier(count)
        results: list[Any] = [None] * count
        errors: list[BaseException | None] = [None] * count

        async def thread_main(index: int) -> None:
            handle = self.open_url(url)
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

    async def claim_any(
        self,
        names: Collection[str] = ("wf",),
        *,
        lease_ms: int = LEASE_MS,
        holder: LeaseHolder | None = _DEFAULT,
        storage: StorageAdapter | None = None,
    ) -> ClaimedRun | None:
        """``claim_next_run(names, lease_ms=..., holder=...)``: whatever it claims, or None."""
        who = KIT_HOLDER if holder is _DEFAULT else holder
        return await (storage or self.storage).claim_next_run(names, lease_ms=lease_ms, holder=who)

    async def claim(
        self,
        run_id: str,
        names: Collection[str] = ("wf",),
        *,
        lease_ms: int = LEASE_MS,
        holder: LeaseHolder | None = _DEFAULT,
        storage: StorageAdapter | None = None,
    ) -> ClaimedRun:
        """Claim and check that the claimed run is ``run_id``."""
        claimed = await self.claim_any(names, lease_ms=lease_ms, holder=holder, storage=storage)
        if claimed is None or claimed.run.id != run_id:
            raise ContractViolation(
                f"claim_next_run({list(names)!r}, lease_ms={lease_ms}) at {self.now()} should "
                f"claim run {run_id}",
                run_id,
                claimed.run.id if claimed else None,
            )
        return claimed

    async def take_over(
        self,
        run_id: str,
        names: Collection[str] = ("wf",),
        *,
        lease_ms: int = LEASE_MS,
        holder: LeaseHolder | None = _DEFAULT,
        storage: StorageAdapter | None = None,
    ) -> ClaimedRun:
        """Let the run's lease expire (:meth:`expire`), then claim it: a stale takeover."""
        await self.expire(run_id, storage)
        return await self.claim(run_id, names, lease_ms=lease_ms, holder=holder, storage=storage)

    async def created_and_claimed(
        self,
        workflow: str = "wf",
        input: Any = None,
        *,
        lease_ms: int = LEASE_MS,
        holder: LeaseHolder | None = _DEFAULT,
    ) -> ClaimedRun:
        """A new run of ``workflow``, claimed (with ``lease_ms`` and ``holder``)."""
        run = await self.create(workflow, input)
        return await self.claim(run.id, (workflow,), lease_ms=lease_ms, holder=holder)

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
