"""Engine-level cases: the real engine, on the adapter under test.

The storage cases prove each promise alone; these prove the promises compose into what
users rely on: a workflow completes, an abandoned run resumes on another engine without
re-running completed steps, enqueue is idempotent, and a bad step value fails the run
cleanly. Staleness is forced without sleeping by moving the kit clock (the store's
"now") to the abandoned lease's expiry.
"""

from __future__ import annotations

from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, expect
from reflow_core.types import RunFilter, RunStatus, StepResult, StepStatus


def _engine(h: Harness, workflows: list[Any], **options: Any) -> Any:
    from reflow_core import Engine

    options.setdefault("concurrency", 2)
    return Engine(h.storage, workflows, poll_interval=0.05, use_plugins=False, **options)


def _counting_workflow(name: str, calls: dict[str, int]) -> Any:
    from reflow_core import StepContext, Workflow

    wf: Workflow[Any] = Workflow(name)

    def fetch(ctx: StepContext[Any]) -> dict[str, Any]:
        calls["fetch"] = calls.get("fetch", 0) + 1
        return {"n": ctx.input["n"], "fetched": True}

    async def double(ctx: StepContext[Any]) -> int:
        calls["double"] = calls.get("double", 0) + 1
        return int(ctx.prev["n"]) * 2 + int(ctx.steps["fetch"]["fetched"])

    wf.step(fetch)
    wf.step(double)
    return wf


@case("engine.workflow_completes")
async def workflow_completes(h: Harness) -> None:
    """A two-step workflow (sync and async steps) completes with the last step's output."""
    calls: dict[str, int] = {}
    engine = _engine(h, [_counting_workflow("wf", calls)])
    try:
        run = await engine.enqueue("wf", {"n": 20})
        await engine.run_until_idle()
        view = await engine.get_run(run.id)
    finally:
        await engine.stop()
    expect((view.run.status, view.run.output), (RunStatus.COMPLETED, 41), "run outcome")
    outputs = {s.name: (s.status, s.output) for s in view.steps}
    expect(
        outputs,
        {
            "fetch": (StepStatus.COMPLETED, {"n": 20, "fetched": True}),
            "double": (StepStatus.COMPLETED, 41),
        },
        "step rows",
    )
    expect(calls, {"fetch": 1, "double": 1}, "step calls")


@case("engine.abandoned_run_resumes_elsewhere")
async def abandoned_run_resumes_elsewhere(h: Harness) -> None:
    """A run abandoned after its first checkpoint is taken over by another engine once its
    lease expired (by the store's clock), and resumes at the second step: the completed
    step is not run again, and the takeover counts as one recovery."""
    from reflow_core.execution.run import step_id

    calls: dict[str, int] = {}
    first = _engine(h, [_counting_workflow("wf", calls)])
    try:
        run = await first.enqueue("wf", {"n": 5})
    finally:
        await first.stop()
    # A worker claims the run, checkpoints "fetch", then dies (never heartbeats again).
    claimed = await h.claim(run.id)
    now = h.now()
    checkpoint = StepResult(
        id=step_id(run.id, "fetch"),
        run_id=run.id,
        name="fetch",
        status=StepStatus.COMPLETED,
        output={"n": 5, "fetched": True},
        attempts=1,
        created_at=now,
        updated_at=now,
    )
    expect(await h.storage.save_step_result(checkpoint, claimed.lease_id), True, "checkpoint")
    # The dead worker's lease expires; the kit clock then stands still, so the second
    # engine's own lease (judged by the same clock) cannot expire while it works.
    await h.expire(run.id)
    second = _engine(h, [_counting_workflow("wf", calls)])
    try:
        await second.run_until_idle()
        view = await second.get_run(run.id)
    finally:
        await second.stop()
    expect((view.run.status, view.run.output), (RunStatus.COMPLETED, 11), "resumed run")
    expect(calls, {"double": 1}, "steps executed by the second engine (fetch must not rerun)")
    expect((view.run.attempt, view.run.recoveries), (2, 1), "(attempt, recoveries) after it")
    heartbeat = await h.storage.heartbeat_run(run.id, claimed.lease_id)
    expect(heartbeat, False, "the dead worker's lease")


@case("engine.idempotent_enqueue")
async def idempotent_enqueue(h: Harness) -> None:
    """Enqueueing twice with one key and equal input yields one run, executed once."""
    calls: dict[str, int] = {}
    engine = _engine(h, [_counting_workflow("wf", calls)])
    try:
        first = await engine.enqueue("wf", {"n": 1}, idempotency_key="order-1")
        second = await engine.enqueue("wf", {"n": 1}, idempotency_key="order-1")
        await engine.run_until_idle()
        third = await engine.enqueue("wf", {"n": 1}, idempotency_key="order-1")
    finally:
        await engine.stop()
    expect({first.id, second.id, third.id}, {first.id}, "run ids for one key")
    expect(len(await h.storage.list_runs(RunFilter())), 1, "runs stored")
    expect(calls, {"fetch": 1, "double": 1}, "step calls")


@case("engine.serialization_error_fails_cleanly")
async def serialization_error_fails_cleanly(h: Harness) -> None:
    """A step returning a non-persistable value fails the run with code SERIALIZATION;
    earlier checkpoints stay intact and nothing half-written remains."""
    from reflow_core import StepContext, Workflow

    wf: Workflow[Any] = Workflow("wf")

    def good(ctx: StepContext[Any]) -> list[int]:
        return [1, 2]

    def bad(ctx: StepContext[Any]) -> Any:
        return {"tags": {"a", "b"}}  # a set: not persistable

    wf.step(good)
    wf.step(bad)

    engine = _engine(h, [wf])
    try:
        run = await engine.enqueue("wf", None)
        await engine.run_until_idle()
        view = await engine.get_run(run.id)
    finally:
        await engine.stop()
    expect(view.run.status, RunStatus.FAILED, "run status")
    expect(view.run.error.code if view.run.error else None, "SERIALIZATION", "error code")
    rows = {s.name: s for s in view.steps}
    expect((rows["good"].status, rows["good"].output), (StepStatus.COMPLETED, [1, 2]), "good")
    expect(
        rows.get("bad") is None or rows["bad"].status is StepStatus.FAILED,
        True,
        f"the bad step is absent or failed, got {rows.get('bad')!r}",
    )
