"""Retry, backoff and per-attempt timeout as the engine applies them."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

from helpers import FakeClock, run

from reflow_core import (
    Engine,
    LeaseOptions,
    RetryPolicy,
    RunStatus,
    StepContext,
    StepStatus,
    StorageAdapter,
    Workflow,
)


async def _execute(storage: StorageAdapter, wf: Workflow[Any], **options: Any) -> Any:
    engine = Engine(storage, [wf], **options)
    try:
        run_ = await engine.enqueue(wf)
        await engine.run_until_idle()
        return await engine.get_run(run_.id)
    finally:
        await engine.stop()
        await storage.close()


def test_retries_until_success_and_records_attempts(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("flaky")
    attempts: list[int] = []

    @wf.step(retry=RetryPolicy(max_attempts=4, backoff="fixed", initial_delay=0.001))
    def call_api(ctx: StepContext[Any]) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")
        return "ok"

    view = run(_execute(storage_factory(), wf))
    assert attempts == [1, 2, 3]
    assert view.run.status is RunStatus.COMPLETED
    assert view.steps[0].attempts == 3


def test_gives_up_after_max_attempts_with_last_error(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("hopeless")

    @wf.step(retry=RetryPolicy(max_attempts=3, initial_delay=0.001))
    def call_api(ctx: StepContext[Any]) -> str:
        raise ConnectionError(f"attempt {ctx.attempt} failed")

    view = run(_execute(storage_factory(), wf))
    assert view.run.status is RunStatus.FAILED
    assert view.run.error.message == "attempt 3 failed"
    assert view.steps[0].status is StepStatus.FAILED
    assert view.steps[0].attempts == 3


def test_non_retryable_errors_fail_at_once(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("picky")
    attempts: list[int] = []

    @wf.step(retry=RetryPolicy(max_attempts=5, initial_delay=0.001, retry_on=(ConnectionError,)))
    def call_api(ctx: StepContext[Any]) -> str:
        attempts.append(ctx.attempt)
        raise ValueError("bad request: retrying will not help")

    view = run(_execute(storage_factory(), wf))
    assert attempts == [1]
    assert view.run.error.type == "ValueError"


def test_backoff_delays_are_applied(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("backoff")
    stamps: list[float] = []

    @wf.step(retry=RetryPolicy(max_attempts=3, backoff="exponential", initial_delay=0.05))
    async def call_api(ctx: StepContext[Any]) -> str:
        stamps.append(asyncio.get_running_loop().time())
        if ctx.attempt < 3:
            raise ConnectionError("later")
        return "ok"

    run(_execute(storage_factory(), wf))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # At least the policy's delays (0.05 then 0.1); the loop clock never runs early.
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1


def test_async_attempt_timeout_is_retried_then_fails_with_step_timeout(
    storage_factory: Any,
) -> None:
    wf: Workflow[Any] = Workflow("slow-async")
    attempts: list[int] = []

    @wf.step(timeout=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0))
    async def hang(ctx: StepContext[Any]) -> str:
        attempts.append(ctx.attempt)
        await asyncio.Event().wait()
        return "never"

    view = run(_execute(storage_factory(), wf))
    assert attempts == [1, 2]
    assert view.run.status is RunStatus.FAILED
    assert view.run.error.code == "STEP_TIMEOUT"
    assert view.steps[0].attempts == 2


def test_sync_attempt_timeout_signals_the_thread(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("slow-sync")
    noticed = threading.Event()

    @wf.step(timeout=0.05)
    def hang(ctx: StepContext[Any]) -> str:
        # A cooperative blocking step: it watches its cancel signal.
        if ctx.cancel.wait(10):
            noticed.set()
        return "late"

    view = run(_execute(storage_factory(), wf))
    assert view.run.error.code == "STEP_TIMEOUT"
    assert noticed.wait(10)


def test_own_timeout_error_is_an_ordinary_failure(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("own-timeout")

    @wf.step(timeout=30)
    async def upstream(ctx: StepContext[Any]) -> str:
        raise TimeoutError("upstream gateway timed out")

    view = run(_execute(storage_factory(), wf))
    assert view.run.error.type == "TimeoutError"
    assert view.run.error.code is None


class FlakyHeartbeats:
    """Wraps an adapter so that heartbeats raise (a database hiccup), all else works."""

    def __init__(self, inner: StorageAdapter) -> None:
        self._inner = inner
        self.failed_beats = 0
        self.three_failed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        self.failed_beats += 1
        if self.failed_beats == 3:
            self.three_failed.set()
        from reflow_core import StorageError

        raise StorageError("heartbeat_run", "connection reset by peer")


def test_heartbeat_errors_do_not_fail_a_run_within_its_lease(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("beating")
    storage = FlakyHeartbeats(storage_factory())
    errors: list[BaseException] = []

    @wf.step
    async def work(ctx: StepContext[Any]) -> str:
        await storage.three_failed.wait()  # several heartbeats fail while the step runs
        return "done"

    view = run(
        _execute(
            storage,  # type: ignore[arg-type]
            wf,
            lease=LeaseOptions(duration=30, heartbeat_interval=0.01),
            on_error=errors.append,
        )
    )
    assert view.run.status is RunStatus.COMPLETED
    assert len(errors) >= 3


def test_a_long_backoff_is_spent_asleep_in_storage_and_the_count_survives(
    storage_factory: Any, clock: FakeClock
) -> None:
    """A retry wait longer than DURABLE_BACKOFF_S releases the lease; the step's row keeps
    the attempt count, the last error and when the next attempt is due; a different
    engine (another worker, after a crash) makes the next attempt with the next number."""
    wf: Workflow[Any] = Workflow("patient")
    attempts: list[int] = []

    @wf.step(retry=RetryPolicy(max_attempts=3, backoff="fixed", initial_delay=60))
    def call_api(ctx: StepContext[Any]) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return "finally"

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        engines = [Engine(storage, [wf], clock=clock, use_plugins=False) for _ in range(3)]
        try:
            run_ = await engines[0].enqueue(wf)
            for number, engine in enumerate(engines, start=1):
                await engine.run_until_idle()
                view = await engine.get_run(run_.id)
                assert view is not None
                [row] = view.steps
                if number < 3:
                    assert view.run.status is RunStatus.SLEEPING  # no lease, no slot held
                    assert view.run.holder is None
                    assert (row.status, row.attempts) == (StepStatus.RUNNING, number)
                    assert row.error is not None and f"attempt {number} failed" in row.error.message
                    assert row.wake_at == view.run.wake_at == clock() + 60_000
                    assert await engine.run_until_idle() == 0  # not due yet
                    clock.advance(60)
            assert view.run.status is RunStatus.COMPLETED
            assert (row.status, row.attempts, row.error) == (StepStatus.COMPLETED, 3, None)
        finally:
            for engine in engines:
                await engine.stop()
            await storage.close()

    run(scenario())
    assert attempts == [1, 2, 3]
