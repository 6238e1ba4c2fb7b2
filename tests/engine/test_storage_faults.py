"""Transient storage errors mid-run: retried within the lease, never a lost run.

A write can fail before it reaches the store (retry it) or after it was applied with
only the answer lost (the retry is then refused by write-once or by the status change,
and the engine must recognise its own effect rather than call the lease lost).
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import run

from reflow_core import Engine, RunStatus, StepContext, StepResult, StorageError, Workflow


class Flaky:
    """Storage proxy: the next ``failures`` calls of ``method`` raise ``StorageError``,
    either before reaching the store or (``applied``) after the store applied them."""

    def __init__(self, inner: Any, method: str, failures: int, *, applied: bool) -> None:
        self._inner = inner
        self.method = method
        self.failures = failures
        self.applied = applied
        self.raised = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._inner, name)
        if name != self.method:
            return real

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            if self.raised < self.failures:
                self.raised += 1
                if self.applied:
                    await real(*args, **kwargs)
                raise StorageError(name, "connection reset by peer")
            return await real(*args, **kwargs)

        return flaky


def _flow(calls: list[str]) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("sturdy")

    @wf.step
    def one(ctx: StepContext[Any]) -> int:
        calls.append("one")
        return 1

    @wf.step
    def two(ctx: StepContext[Any]) -> int:
        calls.append("two")
        return ctx.prev + 1

    return wf


@pytest.mark.parametrize("applied", [False, True], ids=["lost-request", "lost-answer"])
@pytest.mark.parametrize("method", ["save_step_result", "update_claimed_run_status"])
def test_a_transient_write_error_is_retried_within_the_lease(
    storage_factory: Any, method: str, applied: bool
) -> None:
    calls: list[str] = []
    wf = _flow(calls)
    errors: list[BaseException] = []

    async def scenario() -> None:
        inner = storage_factory()
        storage = Flaky(inner, method, failures=2, applied=applied)
        engine = Engine(storage, [wf], on_error=errors.append, use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            assert storage.raised == 2
            done = await inner.get_run(run_.id)
            assert done is not None and done.status is RunStatus.COMPLETED
            assert done.output == 2
            steps: list[StepResult] = await inner.get_step_results(run_.id)
            assert [(s.name, s.output) for s in steps] == [("one", 1), ("two", 2)]
        finally:
            await engine.stop()
            await inner.close()

    run(scenario())
    assert calls == ["one", "two"]  # no step ran twice
    assert errors == []  # retried quietly (logged), never reported as a run's loss
