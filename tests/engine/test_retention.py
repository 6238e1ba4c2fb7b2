"""Retention on every adapter: finished runs older than the policy's age go, with their
steps and events; unfinished runs stay whatever their age; driven by a fake clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from flow_support import open_engine
from helpers import FakeClock, run

from reflow_core import ConfigError, Engine, RunStatus, StepContext, Workflow
from reflow_core.retention import RetentionPolicy, purge_finished

HOUR_MS = 3_600_000


def _workflows() -> list[Workflow[Any]]:
    quick: Workflow[Any] = Workflow("quick")

    @quick.step
    def only(ctx: StepContext[Any]) -> int:
        return 1

    failing: Workflow[Any] = Workflow("failing")

    @failing.step
    def boom(ctx: StepContext[Any]) -> int:
        raise ValueError("boom")

    napper: Workflow[Any] = Workflow("napper")

    @napper.step
    def first(ctx: StepContext[Any]) -> int:
        return 2

    napper.sleep("nap", "10h")
    return [quick, failing, napper]


async def _populate(engine: Engine) -> dict[str, list[str]]:
    """Runs in every state: finished ones (completed, failed, cancelled), a sleeping
    one, a pending one of a workflow no engine here claims."""
    done = [(await engine.enqueue("quick", None, idempotency_key=f"k{i}")).id for i in range(3)]
    failed = [(await engine.enqueue("failing", None)).id]
    cancelled = (await engine.enqueue("quick", None)).id
    assert await engine.cancel(cancelled)
    sleeping = [(await engine.enqueue("napper", None)).id]
    await engine.run_until_idle()
    pending = (await engine.enqueue("quick", None)).id
    return {
        "finished": [*done, *failed, cancelled],
        "kept": [*sleeping, pending],
        "pending": [pending],
    }


def test_purge_finished_deletes_only_old_finished_runs_completely(
    storage_factory: Any, clock: FakeClock
) -> None:
    async def scenario() -> None:
        async with open_engine(storage_factory, _workflows(), clock) as engine:
            ids = await _populate(engine)
            storage = engine.storage
            statuses = {run_id: (await storage.get_run(run_id)) for run_id in ids["finished"]}
            assert {run.status for run in statuses.values() if run} == {
                RunStatus.COMPLETED,
                RunStatus.FAILED,
                RunStatus.CANCELLED,
            }
            # Younger than the age: nothing goes.
            assert await purge_finished(storage, older_than_ms=HOUR_MS, batch=2) == 0
            clock.advance(2 * 3600)
            # Older: every finished run goes, two per storage call.
            assert await purge_finished(storage, older_than_ms=HOUR_MS, batch=2) == 5
            for run_id in ids["finished"]:
                assert await storage.get_run(run_id) is None
                assert await storage.get_step_results(run_id) == []
            for run_id in ids["kept"]:
                kept = await storage.get_run(run_id)
                assert kept is not None and not kept.status.is_terminal
            # The idempotency key of a purged run is free again.
            again = await engine.enqueue("quick", None, idempotency_key="k0")
            assert again.id not in ids["finished"]
            assert await purge_finished(storage, older_than_ms=HOUR_MS) == 0

    run(scenario())


def test_an_engine_with_retention_purges_in_the_background(
    storage_factory: Any, clock: FakeClock
) -> None:
    policy = RetentionPolicy(keep_ms=HOUR_MS, every_s=0.01, batch=2)

    async def scenario() -> None:
        async with open_engine(
            storage_factory, _workflows(), clock, retention=policy
        ) as engine:
            ids = await _populate(engine)
            clock.advance(2 * 3600)
            await engine.start()
            storage = engine.storage
            for _ in range(2000):  # bounded: the loop purges every 10 ms
                remaining = [r for r in ids["finished"] if await storage.get_run(r) is not None]
                if not remaining:
                    break
                await asyncio.sleep(0.01)
            assert remaining == []
            for run_id in ids["kept"]:
                assert await storage.get_run(run_id) is not None

    run(scenario())


@pytest.mark.parametrize("bad", ["soon", 0, -1, True])
def test_a_bad_retention_is_refused_at_construction(bad: Any) -> None:
    with pytest.raises(ConfigError, match="retention"):
        Engine("memory://", retention=bad)


def test_a_policy_refuses_unfinished_statuses_and_bad_batches() -> None:
    with pytest.raises(ConfigError, match="only finished runs"):
        RetentionPolicy(keep_ms=1000, statuses=frozenset({RunStatus.PENDING}))
    with pytest.raises(ConfigError, match="batch"):
        RetentionPolicy(keep_ms=1000, batch=0)
