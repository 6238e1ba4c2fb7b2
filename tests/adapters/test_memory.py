"""MemoryStorage: what is specific to the in-memory adapter, plus a smoke of each method group.

The full contract is the conformance kit's job; these tests pin down the claim index,
exactness (copies, encode-before-write), the fake clock and the plugin registration.
"""

from __future__ import annotations

import asyncio
import math
import warnings
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reflow_adapters.memory import MemoryStorage
from reflow_adapters.memory.plugin import reflow_adapters
from reflow_core import (
    ConfigError,
    ErrorInfo,
    Recurrence,
    RunFilter,
    RunStatus,
    Schedule,
    SerializationError,
    StepResult,
    StepStatus,
    StorageError,
    WorkflowRun,
    open_storage,
)
from reflow_core.schedule import next_fire_time

T = TypeVar("T")
START = 1_000_000


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make(now: list[int] | None = None) -> tuple[MemoryStorage, list[int]]:
    """A store whose clock reads ``now[0]``; assign to it to move time."""
    clock = now if now is not None else [START]
    return MemoryStorage(clock=lambda: clock[0]), clock


def new_run(
    run_id: str, created_at: int = START, workflow: str = "wf", input: Any = None, **kw: Any
) -> WorkflowRun:
    return WorkflowRun(
        id=run_id,
        workflow=workflow,
        input=input,
        status=RunStatus.PENDING,
        created_at=created_at,
        updated_at=created_at,
        **kw,
    )


def step(run_id: str, name: str, at: int = START, **kw: Any) -> StepResult:
    fields: dict[str, Any] = {"status": StepStatus.COMPLETED, "created_at": at, "updated_at": at}
    fields.update(kw)
    return StepResult(id=f"{run_id}:{name}", run_id=run_id, name=name, **fields)


async def claim_id(s: MemoryStorage, *names: str, stale_before: int | None = None) -> str | None:
    claimed = await s.claim_next_run(names or ("wf",), stale_before)
    return None if claimed is None else claimed.run.id


# -- claims -------------------------------------------------------------------


def test_claims_oldest_first_by_created_at_then_id_of_named_workflows_only() -> None:
    async def main() -> list[str | None]:
        s, _ = make()
        for run_id, at, wf in [("c", 5, "wf"), ("b", 3, "other"), ("a", 5, "wf"), ("z", 1, "x")]:
            await s.create_run(new_run(run_id, at, wf))
        assert await s.claim_next_run([]) is None
        return [await claim_id(s, "wf", "other") for _ in range(4)]

    assert run(main()) == ["b", "a", "c", None]


def test_fifty_concurrent_claimers_take_each_of_twenty_runs_exactly_once() -> None:
    async def main() -> None:
        s, _ = make()
        for i in range(20):
            await s.create_run(new_run(f"r{i:02}", START + i % 3))
        claims = await asyncio.gather(*(s.claim_next_run(["wf"]) for _ in range(50)))
        taken = [c for c in claims if c is not None]
        assert sorted(c.run.id for c in taken) == [f"r{i:02}" for i in range(20)]
        assert len({c.lease_id for c in taken}) == 20
        assert all(c.run.attempt == 1 and c.run.status is RunStatus.RUNNING for c in taken)

    run(main())


def test_claim_sets_lease_heartbeat_attempt_and_clears_wait() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        first = await s.claim_next_run(["wf"])
        assert first is not None
        assert first.run.heartbeat_at == START
        assert first.run.attempt == 1
        assert await s.wait_run("r", first.lease_id, "go", START + 10)
        waiting = await s.get_run("r")
        assert waiting is not None
        assert waiting.waiting_for == "go"
        assert waiting.wake_at == START + 10
        now[0] = START + 10  # the deadline itself counts as passed
        second = await s.claim_next_run(["wf"])
        assert second is not None
        assert second.lease_id != first.lease_id
        assert (second.run.attempt, second.run.wake_at, second.run.waiting_for) == (2, None, None)
        assert second.run.heartbeat_at == START + 10

    run(main())


def test_due_sleeper_and_stale_run_compete_with_pending_by_age() -> None:
    async def main() -> list[str | None]:
        s, now = make()
        for run_id, at in [("stale", 1), ("sleeper", 2), ("pending", 3)]:
            await s.create_run(new_run(run_id, at))
        stale = await s.claim_next_run(["wf"])
        sleeper = await s.claim_next_run(["wf"])
        assert stale is not None
        assert sleeper is not None
        assert await s.sleep_run("sleeper", sleeper.lease_id, START + 50)
        now[0] = START + 49
        order = [await claim_id(s)]  # sleeper not due, stale not asked for
        assert await s.update_run_status("pending", RunStatus.PENDING)
        now[0] = START + 50
        order.append(await claim_id(s))
        order.append(await claim_id(s, stale_before=START))  # strictly before: not yet stale
        order.append(await claim_id(s, stale_before=START + 1))
        return order

    assert run(main()) == ["pending", "sleeper", "pending", "stale"]


def test_stale_candidate_survives_a_claim_that_does_not_consider_staleness() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        old = await s.claim_next_run(["wf"])
        assert old is not None
        now[0] = START + 100
        # A claim for another workflow moves the stale run into the ready heap;
        # a claim without stale_before must pass it over without losing it.
        assert await claim_id(s, "other", stale_before=START + 50) is None
        assert await claim_id(s) is None
        new = await s.claim_next_run(["wf"], stale_before=START + 50)
        assert new is not None
        assert new.run.attempt == 2
        assert not await s.heartbeat_run("r", old.lease_id)
        assert not await s.save_step_result(step("r", "a"), old.lease_id)
        assert await s.heartbeat_run("r", new.lease_id)

    run(main())


def test_time_heaps_stay_bounded_under_many_heartbeats() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        claimed = await s.claim_next_run(["wf"])
        assert claimed is not None
        for i in range(5_000):
            now[0] = START + i
            assert await s.heartbeat_run("r", claimed.lease_id)
        assert len(s._claims._beats) <= 2 * 1 + 65
        assert await claim_id(s, stale_before=START + 4_999) is None
        assert await claim_id(s, stale_before=START + 5_000) == "r"

    run(main())


# -- status writes -------------------------------------------------------------


def test_lease_checked_writes_are_no_ops_once_released() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        claimed = await s.claim_next_run(["wf"])
        assert claimed is not None
        assert await s.sleep_run("r", claimed.lease_id, START + 5)
        now[0] = START + 1
        assert not await s.heartbeat_run("r", claimed.lease_id)
        assert not await s.update_claimed_run_status(
            "r", claimed.lease_id, RunStatus.COMPLETED, output={"x": 1}
        )
        assert not await s.wait_run("r", claimed.lease_id, "e", None)
        stored = await s.get_run("r")
        assert stored is not None
        assert (stored.status, stored.output, stored.wake_at) == (
            RunStatus.SLEEPING,
            None,
            START + 5,
        )

    run(main())


def test_update_claimed_run_status_stores_values_and_keeps_lease_only_when_running() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        claimed = await s.claim_next_run(["wf"])
        assert claimed is not None
        lease = claimed.lease_id
        assert await s.update_claimed_run_status("r", lease, RunStatus.RUNNING)
        assert await s.heartbeat_run("r", lease)
        assert await s.update_claimed_run_status("r", lease, RunStatus.PENDING)
        assert not await s.heartbeat_run("r", lease)
        again = await s.claim_next_run(["wf"])
        assert again is not None
        error = ErrorInfo(type="ValueError", message="boom", step="a")
        assert await s.update_claimed_run_status(
            "r", again.lease_id, RunStatus.FAILED, output=[1, 2.5], error=error
        )
        stored = await s.get_run("r")
        assert stored is not None
        assert (stored.status, stored.output, stored.error) == (RunStatus.FAILED, [1, 2.5], error)
        assert await s.claim_next_run(["wf"]) is None

    run(main())


def test_update_run_status_with_expected_is_conditional() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        assert not await s.update_run_status("missing", RunStatus.CANCELLED)
        terminal = [RunStatus.PENDING, RunStatus.RUNNING]
        claimed = await s.claim_next_run(["wf"])
        assert claimed is not None
        assert await s.update_claimed_run_status("r", claimed.lease_id, RunStatus.COMPLETED)
        assert not await s.update_run_status("r", RunStatus.CANCELLED, expected=terminal)
        stored = await s.get_run("r")
        assert stored is not None
        assert stored.status is RunStatus.COMPLETED
        assert await s.update_run_status("r", RunStatus.CANCELLED)
        stored = await s.get_run("r")
        assert stored is not None
        assert stored.status is RunStatus.CANCELLED

    run(main())


def test_requeue_drops_only_failed_steps_and_clears_output_and_error() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        assert not await s.requeue_run("r")  # pending is not requeueable
        claimed = await s.claim_next_run(["wf"])
        assert claimed is not None
        await s.save_step_result(step("r", "a", 1, output={"done": True}), claimed.lease_id)
        await s.save_step_result(step("r", "b", 2, status=StepStatus.SKIPPED), claimed.lease_id)
        await s.save_step_result(step("r", "c", 3, status=StepStatus.FAILED), claimed.lease_id)
        err = ErrorInfo(type="E", message="m")
        await s.update_claimed_run_status("r", claimed.lease_id, RunStatus.FAILED, error=err)
        assert await s.requeue_run("r")
        stored = await s.get_run("r")
        assert stored is not None
        assert (stored.status, stored.error, stored.output) == (RunStatus.PENDING, None, None)
        assert [r.name for r in await s.get_step_results("r")] == ["a", "b"]
        assert await claim_id(s) == "r"
        # The failed step's id is free again for a fresh row.
        assert await s.save_step_result(step("r", "c", 9))

    run(main())


# -- events --------------------------------------------------------------------


def test_events_wake_only_a_run_waiting_for_that_name_and_are_taken_fifo() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        assert not await s.deliver_event("missing", "go", 1)
        claimed = await s.claim_next_run(["wf"])
        assert claimed is not None
        assert await s.wait_run("r", claimed.lease_id, "go", None)
        assert await s.deliver_event("r", "other", "x")
        assert await claim_id(s) is None
        assert await s.deliver_event("r", "go", None)
        assert await s.deliver_event("r", "go", {"n": 2})
        assert await claim_id(s) == "r"
        first = await s.take_event("r", "go")
        assert first is not None
        assert first.payload is None
        assert first.delivered_at == START
        second = await s.take_event("r", "go")
        assert second is not None
        assert second.payload == {"n": 2}
        assert await s.take_event("r", "go") is None

    run(main())


def test_wait_with_an_event_already_buffered_goes_straight_to_pending() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        await s.deliver_event("r", "go", "early")
        claimed = await s.claim_next_run(["wf"])
        assert claimed is not None
        assert await s.wait_run("r", claimed.lease_id, "go", START + 1_000)
        stored = await s.get_run("r")
        assert stored is not None
        assert (stored.status, stored.waiting_for, stored.wake_at) == (
            RunStatus.PENDING,
            None,
            None,
        )
        assert await claim_id(s) == "r"

    run(main())


# -- reads and steps -------------------------------------------------------------


def test_list_runs_pages_exactly_newest_first_with_filters() -> None:
    async def main() -> None:
        s, _ = make()
        specs = [("a", 1), ("b", 2), ("c", 2), ("d", 2), ("e", 3), ("f", 4), ("g", 4)]
        for run_id, at in specs:
            await s.create_run(new_run(run_id, at, "odd" if run_id in "aceg" else "even"))
        seen: list[str] = []
        page = await s.list_runs(RunFilter(limit=3))
        while page:
            seen += [r.id for r in page]
            last = page[-1]
            page = await s.list_runs(RunFilter(limit=3, before=last.created_at, before_id=last.id))
        assert seen == ["g", "f", "e", "d", "c", "b", "a"]
        assert [r.id for r in await s.list_runs(RunFilter(before=4))] == ["e", "d", "c", "b", "a"]
        odd = await s.list_runs(RunFilter(workflow="odd", before=4, before_id="g"))
        assert [r.id for r in odd] == ["e", "c", "a"]
        await claim_id(s, "even")
        running = await s.list_runs(RunFilter(status=RunStatus.RUNNING))
        assert [r.id for r in running] == ["b"]

    run(main())


def test_idempotency_key_is_per_workflow() -> None:
    async def main() -> None:
        s, _ = make()
        first = await s.create_run(new_run("r1", input=1, idempotency_key="k"))
        again = await s.create_run(new_run("r2", input=2, idempotency_key="k"))
        other = await s.create_run(new_run("r3", workflow="other", idempotency_key="k"))
        assert first.created
        assert not again.created
        assert other.created
        assert again.run.id == "r1"
        assert again.run.input == 1
        assert await s.get_run("r2") is None
        with pytest.raises(StorageError, match="already exists"):
            await s.create_run(new_run("r1"))

    run(main())


def test_step_upsert_keeps_created_at_orders_rows_and_guards_the_name() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        await s.save_step_result(step("r", "b", 5, status=StepStatus.RUNNING))
        await s.save_step_result(step("r", "a", 7))
        await s.save_step_result(step("r", "b", 9, output="done"))
        rows = await s.get_step_results("r")
        assert [(r.name, r.created_at, r.updated_at, r.output) for r in rows] == [
            ("b", 5, 9, "done"),
            ("a", 7, 7, None),
        ]
        clash = StepResult(
            id="other-id", run_id="r", name="a", status=StepStatus.COMPLETED,
            created_at=1, updated_at=1,
        )  # fmt: skip
        with pytest.raises(StorageError) as info:
            await s.save_step_result(clash)
        assert info.value.operation == "save_step_result"
        assert [r.id for r in await s.get_step_results("r")] == ["r:b", "r:a"]

    run(main())


# -- exactness -------------------------------------------------------------------


def test_values_are_copied_in_and_out() -> None:
    async def main() -> None:
        s, _ = make()
        value: dict[str, Any] = {"when": datetime(2024, 5, 1, tzinfo=UTC), "$dict": [1, 2.0]}
        await s.create_run(new_run("r", input=value))
        value["$dict"].append("mutated")
        got = await s.get_run("r")
        assert got is not None
        assert got.input == {"when": value["when"], "$dict": [1, 2.0]}
        assert type(got.input["$dict"][1]) is float
        got.input["$dict"].clear()
        again = await s.get_run("r")
        assert again is not None
        assert again.input["$dict"] == [1, 2.0]

        out = {"list": [1]}
        await s.save_step_result(step("r", "a", output=out))
        out["list"].append(2)
        (row,) = await s.get_step_results("r")
        row.output["list"].append(3)
        assert (await s.get_step_results("r"))[0].output == {"list": [1]}

        payload = {"k": ["v"]}
        await s.deliver_event("r", "e", payload)
        payload["k"].append("x")
        event = await s.take_event("r", "e")
        assert event is not None
        assert event.payload == {"k": ["v"]}

    run(main())


def test_serialization_error_leaves_state_unchanged() -> None:
    async def main() -> None:
        s, _ = make()
        with pytest.raises(SerializationError):
            await s.create_run(new_run("bad", input={"n": math.nan}))
        assert await s.get_run("bad") is None
        assert await s.list_runs(RunFilter()) == []

        await s.create_run(new_run("r"))
        claimed = await s.claim_next_run(["wf"])
        assert claimed is not None
        with pytest.raises(SerializationError):
            await s.update_claimed_run_status(
                "r", claimed.lease_id, RunStatus.COMPLETED, output={1}
            )
        with pytest.raises(SerializationError):
            await s.save_step_result(step("r", "a", output=(1, 2)), claimed.lease_id)
        assert await s.wait_run("r", claimed.lease_id, "e", None)
        with pytest.raises(SerializationError):
            await s.deliver_event("r", "e", {1: "non-str key"})
        schedule = Schedule(
            key="k", workflow="wf", input=object(), recurrence=Recurrence(every_ms=10),
            next_run_at=0, created_at=0, updated_at=0,
        )  # fmt: skip
        with pytest.raises(SerializationError):
            await s.upsert_schedule(schedule)

        stored = await s.get_run("r")
        assert stored is not None
        assert (stored.status, stored.output, stored.waiting_for) == (RunStatus.WAITING, None, "e")
        assert await s.get_step_results("r") == []
        assert await s.take_event("r", "e") is None
        assert await s.list_schedules() == []

    run(main())


# -- schedules -------------------------------------------------------------------


def test_schedules_upsert_claim_advance_and_delete() -> None:
    def schedule(key: str, workflow: str = "wf", every: int = 100, at: int = 0) -> Schedule:
        return Schedule(
            key=key, workflow=workflow, input={"k": key}, recurrence=Recurrence(every_ms=every),
            next_run_at=at, created_at=at, updated_at=at,
        )  # fmt: skip

    async def main() -> None:
        s, _ = make()
        await s.upsert_schedule(schedule("b", at=10))
        await s.upsert_schedule(schedule("a", at=10))
        await s.upsert_schedule(schedule("x", workflow="other", at=0))
        kept = await s.upsert_schedule(schedule("b", at=500))  # same recurrence: keep cadence
        assert (kept.created_at, kept.next_run_at, kept.updated_at) == (10, 10, 500)
        changed = await s.upsert_schedule(schedule("a", every=50, at=700))
        assert (changed.created_at, changed.next_run_at) == (10, 700)

        assert await s.claim_due_schedule(["wf"], 9) is None
        claimed = await s.claim_due_schedule(["wf"], 1_000)  # b is due; a is not yet
        assert claimed is not None
        assert claimed.schedule.key == "b"
        assert claimed.slot == 10
        expected_next = next_fire_time(Recurrence(every_ms=100), 10, 1_000)
        assert claimed.schedule.next_run_at == expected_next == 1_010
        assert claimed.schedule.input == {"k": "b"}
        tie = await s.claim_due_schedule(["wf"], 1_010)
        assert tie is not None
        assert (tie.schedule.key, tie.slot) == ("a", 700)
        assert [x.key for x in await s.list_schedules()] == ["a", "b", "x"]
        assert await s.delete_schedule("x")
        assert not await s.delete_schedule("x")
        assert await s.claim_due_schedule(["other"], 10_000) is None

    run(main())


# -- lifecycle and registration ---------------------------------------------------


def test_closed_storage_raises_storage_error_naming_the_operation() -> None:
    async def main() -> None:
        s, _ = make()
        await s.initialize()
        await s.initialize()
        await s.create_run(new_run("r"))
        await s.close()
        await s.close()
        with pytest.raises(StorageError, match="storage is closed") as info:
            await s.get_run("r")
        assert info.value.operation == "get_run"
        with pytest.raises(StorageError, match="claim_next_run"):
            await s.claim_next_run(["wf"])
        with pytest.raises(StorageError, match="create_run"):
            await s.create_run(new_run("r2"))
        with pytest.raises(StorageError, match="initialize"):
            await s.initialize()

    run(main())


def test_plugin_registers_the_memory_adapter(tmp_path: Path) -> None:
    (spec,) = reflow_adapters()
    assert (spec.name, spec.schemes, spec.capabilities) == ("memory", ("memory",), frozenset())
    assert spec.conformance_factory is not None
    assert isinstance(spec.conformance_factory(tmp_path, {}), MemoryStorage)
    assert list(tmp_path.iterdir()) == []
    assert spec.factory(url=None).url is None
    with pytest.raises(ConfigError, match="memory://"):
        spec.factory(url="memory://somewhere")
    with pytest.raises(ConfigError, match="unknown option"):
        spec.factory(url="memory://", path="x")
    with warnings.catch_warnings():
        # Sibling adapters not yet installed in this checkout warn while loading.
        warnings.simplefilter("ignore", RuntimeWarning)
        first, second = open_storage("memory://"), open_storage("memory")
    assert isinstance(first, MemoryStorage)
    assert isinstance(second, MemoryStorage)
    assert first is not second
