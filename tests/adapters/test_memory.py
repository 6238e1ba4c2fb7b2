"""MemoryStorage: what is specific to the in-memory adapter, plus a smoke of each method group.

The full contract is the conformance kit's job; these tests pin down the claim index
(leases judged by the store's clock), exactness (copies, encode-before-write), the
contract 2.0 rules (lease fields, write-once checkpoints, event delivery), the fake
clock and the plugin registration.
"""

from __future__ import annotations

import asyncio
import math
import warnings
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from reflow_adapters.memory import MemoryStorage
from reflow_adapters.memory.plugin import reflow_adapters
from reflow_core import (
    ClaimedRun,
    ConfigError,
    ConsumeResult,
    ErrorInfo,
    EventRecord,
    LeaseHolder,
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
LEASE = 30_000


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


async def claim(s: MemoryStorage, *names: str, lease_ms: int = LEASE) -> ClaimedRun:
    """Claim, asserting that something was claimable."""
    claimed = await s.claim_next_run(names or ("wf",), lease_ms=lease_ms)
    assert claimed is not None
    return claimed


async def claim_id(s: MemoryStorage, *names: str, lease_ms: int = LEASE) -> str | None:
    claimed = await s.claim_next_run(names or ("wf",), lease_ms=lease_ms)
    return None if claimed is None else claimed.run.id


async def stored(s: MemoryStorage, run_id: str) -> WorkflowRun:
    got = await s.get_run(run_id)
    assert got is not None
    return got


def lease_fields(run: WorkflowRun) -> tuple[Any, ...]:
    return (run.claimed_at, run.lease_ms, run.lease_expires_at, run.holder)


# -- claims -------------------------------------------------------------------


def test_claims_oldest_first_by_created_at_then_id_of_named_workflows_only() -> None:
    async def main() -> list[str | None]:
        s, _ = make()
        for run_id, at, wf in [("c", 5, "wf"), ("b", 3, "other"), ("a", 5, "wf"), ("z", 1, "x")]:
            await s.create_run(new_run(run_id, at, wf))
        assert await s.claim_next_run([], lease_ms=LEASE) is None
        return [await claim_id(s, "wf", "other") for _ in range(4)]

    assert run(main()) == ["b", "a", "c", None]


def test_fifty_concurrent_claimers_take_each_of_twenty_runs_exactly_once() -> None:
    async def main() -> None:
        s, _ = make()
        for i in range(20):
            await s.create_run(new_run(f"r{i:02}", START + i % 3))
        claims = await asyncio.gather(
            *(s.claim_next_run(["wf"], lease_ms=LEASE) for _ in range(50))
        )
        taken = [c for c in claims if c is not None]
        assert sorted(c.run.id for c in taken) == [f"r{i:02}" for i in range(20)]
        assert len({c.lease_id for c in taken}) == 20
        assert all(c.run.attempt == 1 and c.run.status is RunStatus.RUNNING for c in taken)

    run(main())


def test_claim_sets_lease_heartbeat_attempt_and_clears_wait() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        first = await s.claim_next_run(["wf"], lease_ms=LEASE)
        assert first is not None
        assert first.run.heartbeat_at == START
        assert first.run.attempt == 1
        assert await s.wait_run("r", first.lease_id, "go", START + 10)
        waiting = await s.get_run("r")
        assert waiting is not None
        assert waiting.waiting_for == "go"
        assert waiting.wake_at == START + 10
        now[0] = START + 10  # the deadline itself counts as passed
        second = await s.claim_next_run(["wf"], lease_ms=LEASE)
        assert second is not None
        assert second.lease_id != first.lease_id
        assert (second.run.attempt, second.run.wake_at, second.run.waiting_for) == (2, None, None)
        assert second.run.heartbeat_at == START + 10

    run(main())


def test_due_sleeper_and_expired_lease_compete_with_pending_by_age() -> None:
    async def main() -> list[str | None]:
        s, now = make()
        for run_id, at in [("stale", 1), ("sleeper", 2), ("pending", 3)]:
            await s.create_run(new_run(run_id, at))
        await claim(s, lease_ms=100)  # "stale": its lease expires at START + 100
        sleeper = await claim(s)
        assert await s.sleep_run("sleeper", sleeper.lease_id, START + 50)
        now[0] = START + 49
        order = [await claim_id(s)]  # sleeper not due, stale not expired
        assert await s.update_run_status("pending", RunStatus.PENDING)
        now[0] = START + 50
        order.append(await claim_id(s))
        order.append(await claim_id(s))
        now[0] = START + 100
        order.append(await claim_id(s))
        return order

    assert run(main()) == ["pending", "sleeper", "pending", "stale"]


def test_lease_expiry_is_judged_by_the_store_clock_at_lease_expires_at() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        first = await claim(s, lease_ms=1_000)
        assert (first.run.claimed_at, first.run.lease_ms) == (START, 1_000)
        assert first.run.lease_expires_at == START + 1_000
        now[0] = START + 999  # one ms before expiry: still held, whatever the claimer's lease
        assert await claim_id(s, lease_ms=1) is None
        now[0] = START + 1_000  # at expiry: claimable
        second = await claim(s, lease_ms=5)
        assert second.lease_id != first.lease_id
        assert (second.run.attempt, second.run.recoveries) == (2, 1)
        assert (second.run.claimed_at, second.run.heartbeat_at) == (START + 1_000, START + 1_000)
        assert (second.run.lease_ms, second.run.lease_expires_at) == (5, START + 1_005)
        # The old holder's lease is gone: every lease-checked write is refused.
        assert not await s.heartbeat_run("r", first.lease_id)
        assert not await s.save_step_result(step("r", "a"), first.lease_id)
        assert await s.heartbeat_run("r", second.lease_id)

    run(main())


def test_each_claim_stores_its_own_lease_length() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("long", 1))
        await s.create_run(new_run("short", 2))
        await claim(s, lease_ms=60_000)
        await claim(s, lease_ms=50)
        now[0] = START + 10_000
        # A claimer with a short lease never takes the run held under a long one, and a
        # claimer with a long lease still takes the run whose short lease has expired.
        assert await claim_id(s, lease_ms=10) == "short"
        assert await claim_id(s, lease_ms=10) is None
        assert await claim_id(s, lease_ms=3_600_000) is None
        now[0] = START + 60_000
        assert await claim_id(s, lease_ms=3_600_000) == "long"

    run(main())


def test_heartbeat_extends_the_lease_by_the_stored_length() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        claimed = await claim(s, lease_ms=100)
        now[0] = START + 60
        assert await s.heartbeat_run("r", claimed.lease_id)
        beat = await stored(s, "r")
        assert (beat.heartbeat_at, beat.lease_expires_at) == (START + 60, START + 160)
        assert (beat.claimed_at, beat.lease_ms, beat.updated_at) == (START, 100, START)
        now[0] = START + 159
        assert await claim_id(s) is None
        now[0] = START + 160
        assert await claim_id(s) == "r"

    run(main())


def test_an_expired_lease_not_yet_reclaimed_can_still_be_renewed() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        claimed = await claim(s, lease_ms=100)
        now[0] = START + 150
        # A claim for another workflow moves the expired run into the ready heap;
        # the renewal must then keep it from being taken, without losing track of it.
        assert await claim_id(s, "other") is None
        assert await s.heartbeat_run("r", claimed.lease_id)
        assert await claim_id(s) is None
        now[0] = START + 249
        assert await claim_id(s) is None
        now[0] = START + 250
        taken = await claim(s)
        assert (taken.run.id, taken.run.attempt, taken.run.recoveries) == ("r", 2, 1)

    run(main())


def test_a_clock_moving_back_loses_no_candidate() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("held", 1))
        await s.create_run(new_run("sleeper", 2))
        await claim(s, lease_ms=100)
        sleeper = await claim(s)
        assert await s.sleep_run("sleeper", sleeper.lease_id, START + 100)
        now[0] = START + 100
        assert await claim_id(s, "other") is None  # both are due: moved to the ready heap
        now[0] = START + 50  # the clock steps back: neither is claimable now
        assert await claim_id(s) is None
        now[0] = START + 100
        assert [await claim_id(s), await claim_id(s), await claim_id(s)] == [
            "held",
            "sleeper",
            None,
        ]

    run(main())


def test_recoveries_count_only_expired_takeovers_and_requeue_resets_them() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        first = await claim(s, lease_ms=10)
        assert (first.run.attempt, first.run.recoveries) == (1, 0)
        now[0] = START + 10
        second = await claim(s, lease_ms=10)
        now[0] = START + 20
        third = await claim(s, lease_ms=10)
        assert (third.run.attempt, third.run.recoveries) == (3, 2)
        assert await s.sleep_run("r", third.lease_id, START + 20)
        woken = await claim(s, lease_ms=10)  # from sleeping: not a recovery
        assert await s.update_claimed_run_status("r", woken.lease_id, RunStatus.PENDING)
        released = await claim(s, lease_ms=10)  # from pending: not a recovery
        assert (released.run.attempt, released.run.recoveries) == (5, 2)
        assert not await s.heartbeat_run("r", second.lease_id)
        assert await s.update_claimed_run_status("r", released.lease_id, RunStatus.FAILED)
        assert (await stored(s, "r")).recoveries == 2
        assert await s.requeue_run("r")
        assert (await stored(s, "r")).recoveries == 0
        again = await claim(s)
        assert (again.run.attempt, again.run.recoveries) == (6, 0)

    run(main())


def test_holder_is_stored_with_the_claim_and_readable() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("a", 1))
        await s.create_run(new_run("b", 2))
        holder = LeaseHolder(worker="w-1", host="box", pid=4242)
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE, holder=holder)
        assert claimed is not None
        assert claimed.run.holder == holder
        assert (await stored(s, "a")).holder == holder
        assert (await claim(s)).run.holder is None
        running = await s.list_runs(RunFilter(status=RunStatus.RUNNING))
        assert [(r.id, r.holder) for r in running] == [("b", None), ("a", holder)]
        now[0] = START + LEASE
        other = LeaseHolder(worker="w-2", host="other", pid=7)
        taken = await s.claim_next_run(["wf"], lease_ms=LEASE, holder=other)
        assert taken is not None
        assert (taken.run.id, taken.run.holder) == ("a", other)

    run(main())


EXITS = ["sleep", "wait", "wait-buffered", "pending", "completed", "failed", "cancel"]


@pytest.mark.parametrize("exit", EXITS)
def test_every_write_leaving_running_clears_the_lease_fields(exit: str) -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        holder = LeaseHolder(worker="w", host="h", pid=1)
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE, holder=holder)
        assert claimed is not None
        lease = claimed.lease_id
        now[0] = START + 5
        assert await s.heartbeat_run("r", lease)
        now[0] = START + 7
        assert await s.update_claimed_run_status("r", lease, RunStatus.RUNNING, output=1)
        kept = await stored(s, "r")
        assert lease_fields(kept) == (START, LEASE, START + 5 + LEASE, holder)
        if exit == "sleep":
            assert await s.sleep_run("r", lease, START + 100)
        elif exit == "wait":
            assert await s.wait_run("r", lease, "go", None)
        elif exit == "wait-buffered":
            assert await s.deliver_event("r", "go", 1)
            assert await s.wait_run("r", lease, "go", None)
        elif exit == "cancel":
            assert await s.update_run_status("r", RunStatus.CANCELLED)
        else:
            assert await s.update_claimed_run_status("r", lease, RunStatus(exit))
        left = await stored(s, "r")
        assert left.status is not RunStatus.RUNNING
        assert lease_fields(left) == (None, None, None, None)
        assert left.heartbeat_at == START + 5  # kept: when the run was last alive
        assert not await s.heartbeat_run("r", lease)
        assert lease_fields(await stored(s, "r")) == (None, None, None, None)

    run(main())


def test_update_run_status_to_running_leaves_it_claimable_at_once() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        claimed = await claim(s, lease_ms=60_000)
        assert await s.update_run_status("r", RunStatus.RUNNING)
        left = await stored(s, "r")
        assert (left.status, lease_fields(left)) == (RunStatus.RUNNING, (None, None, now[0], None))
        assert not await s.heartbeat_run("r", claimed.lease_id)
        taken = await claim(s, lease_ms=60_000)
        assert taken is not None and taken.run.id == "r" and taken.run.recoveries == 1

    run(main())


def test_time_heaps_stay_bounded_under_many_heartbeats() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        claimed = await claim(s, lease_ms=1)
        for i in range(5_000):
            now[0] = START + i
            assert await s.heartbeat_run("r", claimed.lease_id)
        assert len(s._claims._leases) <= 2 * 1 + 65
        assert await claim_id(s) is None
        now[0] = START + 5_000
        assert await claim_id(s) == "r"

    run(main())


def test_now_is_the_store_clock() -> None:
    async def main() -> None:
        s, now = make()
        assert await s.now() == START
        now[0] = START + 123
        assert await s.now() == START + 123
        await s.close()
        with pytest.raises(StorageError, match="storage is closed") as info:
            await s.now()
        assert info.value.operation == "now"

    run(main())


# -- status writes -------------------------------------------------------------


def test_lease_checked_writes_are_no_ops_once_released() -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE)
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
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE)
        assert claimed is not None
        lease = claimed.lease_id
        assert await s.update_claimed_run_status("r", lease, RunStatus.RUNNING)
        assert await s.heartbeat_run("r", lease)
        assert await s.update_claimed_run_status("r", lease, RunStatus.PENDING)
        assert not await s.heartbeat_run("r", lease)
        again = await s.claim_next_run(["wf"], lease_ms=LEASE)
        assert again is not None
        error = ErrorInfo(type="ValueError", message="boom", step="a")
        assert await s.update_claimed_run_status(
            "r", again.lease_id, RunStatus.FAILED, output=[1, 2.5], error=error
        )
        stored = await s.get_run("r")
        assert stored is not None
        assert (stored.status, stored.output, stored.error) == (RunStatus.FAILED, [1, 2.5], error)
        assert await s.claim_next_run(["wf"], lease_ms=LEASE) is None

    run(main())


def test_update_run_status_with_expected_is_conditional() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        assert not await s.update_run_status("missing", RunStatus.CANCELLED)
        terminal = [RunStatus.PENDING, RunStatus.RUNNING]
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE)
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
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE)
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
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE)
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
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE)
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


ENDINGS = [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED]


@pytest.mark.parametrize("ending", ENDINGS)
def test_deliver_event_to_an_ended_run_stores_nothing(ending: RunStatus) -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        claimed = await claim(s)
        if ending is RunStatus.CANCELLED:
            assert await s.update_run_status("r", ending)
        else:
            assert await s.update_claimed_run_status("r", claimed.lease_id, ending)
        assert not await s.deliver_event("r", "go", 1)
        assert not await s.deliver_event("r", "go", 2, key="k")
        assert await s.take_event("r", "go") is None
        if ending is not RunStatus.COMPLETED:
            # Resumed, the run takes events again: the refused ones were never stored,
            # and the refused key was not remembered.
            assert await s.requeue_run("r")
            assert await s.take_event("r", "go") is None
            assert await s.deliver_event("r", "go", 3, key="k")
            event = await s.take_event("r", "go")
            assert event is not None
            assert event.payload == 3

    run(main())


def test_deliver_event_to_every_live_status_is_stored() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        assert await s.deliver_event("r", "e", "pending")
        claimed = await claim(s)
        assert await s.deliver_event("r", "e", "running")
        assert await s.sleep_run("r", claimed.lease_id, START + 10)
        assert await s.deliver_event("r", "e", "sleeping")
        assert [(await s.take_event("r", "e") or EventRecord(None, 0)).payload for _ in "123"] == [
            "pending",
            "running",
            "sleeping",
        ]

    run(main())


def test_deliver_event_with_a_repeated_key_stores_it_once() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        await s.create_run(new_run("other-run", START + 1))
        claimed = await claim(s)
        assert await s.wait_run("r", claimed.lease_id, "go", None)
        assert await s.deliver_event("r", "go", 1, key="k")
        assert (await stored(s, "r")).status is RunStatus.PENDING
        assert await s.deliver_event("r", "go", 2, key="k")  # a retry: True, nothing stored
        assert await s.deliver_event("r", "other", 3, key="k")  # the key is the run's
        assert await s.deliver_event("other-run", "go", 4, key="k")  # another run's key
        again = await claim(s)
        assert again.run.id == "r"
        consumed = await s.consume_event("go", step("r", "wait"), again.lease_id)
        assert consumed.event is not None
        assert consumed.event.payload == 1
        assert await s.take_event("r", "go") is None
        assert await s.take_event("r", "other") is None
        # Consumed since, the key still answers True and stores nothing.
        assert await s.deliver_event("r", "go", 5, key="k")
        assert await s.take_event("r", "go") is None
        # Without a key, or with a new one, every delivery is stored.
        assert await s.deliver_event("r", "go", 6)
        assert await s.deliver_event("r", "go", 6)
        assert await s.deliver_event("r", "go", 7, key="k2")
        payloads = [await s.take_event("r", "go") for _ in range(4)]
        assert [e.payload if e is not None else "none" for e in payloads] == [6, 6, 7, "none"]
        event = await s.take_event("other-run", "go")
        assert event is not None
        assert event.payload == 4

    run(main())


def test_a_repeated_key_after_the_run_ended_still_answers_true() -> None:
    # This adapter's reading of the contract: a retry of a delivery that was stored
    # answers as the first delivery did, even if the run has ended since.
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        assert await s.deliver_event("r", "go", 1, key="k")
        claimed = await claim(s)
        assert await s.update_claimed_run_status("r", claimed.lease_id, RunStatus.COMPLETED)
        assert await s.deliver_event("r", "go", 2, key="k")
        assert not await s.deliver_event("r", "go", 3, key="new")
        event = await s.take_event("r", "go")
        assert event is not None
        assert event.payload == 1
        assert await s.take_event("r", "go") is None

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


FINAL = [StepStatus.COMPLETED, StepStatus.COMPLETED_EARLY, StepStatus.SKIPPED]


@pytest.mark.parametrize("final", FINAL)
def test_a_final_step_row_is_never_written_again(final: StepStatus) -> None:
    async def main() -> None:
        s, now = make()
        await s.create_run(new_run("r"))
        claimed = await claim(s)
        lease = claimed.lease_id
        assert await s.save_step_result(step("r", "a", status=final, output="first"), lease)
        now[0] = START + 5
        for status in StepStatus:
            again = step("r", "a", START + 5, status=status, output="second")
            assert not await s.save_step_result(again, lease)
            assert not await s.save_step_result(again)
        # An identity clash is still an error, final row or not.
        clash = msgspec.structs.replace(step("r", "a"), id="x")
        with pytest.raises(StorageError, match="already has id"):
            await s.save_step_result(clash)
        # consume_event refuses too, as a lost lease, and consumes nothing.
        assert await s.deliver_event("r", "go", "payload")
        refused = await s.consume_event("go", step("r", "a", START + 5), lease)
        assert refused == ConsumeResult(held=False)
        (row,) = await s.get_step_results("r")
        assert (row.status, row.output, row.updated_at) == (final, "first", START)
        event = await s.take_event("r", "go")
        assert event is not None
        assert event.payload == "payload"
        assert await s.heartbeat_run("r", lease)  # the lease itself is untouched

    run(main())


def test_a_final_row_written_with_a_plain_string_status_is_final_too() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        assert await s.save_step_result(step("r", "a", status="skipped"))
        assert not await s.save_step_result(step("r", "a", status=StepStatus.FAILED))
        (row,) = await s.get_step_results("r")
        assert row.status == StepStatus.SKIPPED

    run(main())


def test_rows_not_yet_final_stay_writable_until_they_are() -> None:
    async def main() -> None:
        s, _ = make()
        await s.create_run(new_run("r"))
        claimed = await claim(s)
        lease = claimed.lease_id
        for i, status in enumerate(
            [StepStatus.RUNNING, StepStatus.FAILED, StepStatus.SLEEPING, StepStatus.WAITING]
        ):
            assert await s.save_step_result(step("r", "a", START + i, status=status), lease)
        assert await s.deliver_event("r", "go", {"ok": True})
        consumed = await s.consume_event("go", step("r", "a", START + 9), lease)
        assert consumed.held
        assert consumed.event is not None
        (row,) = await s.get_step_results("r")
        assert (row.status, row.output, row.created_at) == (
            StepStatus.COMPLETED,
            {"ok": True},
            START,
        )
        assert not await s.save_step_result(step("r", "a", START + 10, output="late"), lease)
        assert await s.deliver_event("r", "go", "again")
        assert await s.consume_event("go", step("r", "a", START + 11), lease) == ConsumeResult(
            held=False
        )

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
        claimed = await s.claim_next_run(["wf"], lease_ms=LEASE)
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
        s, now = make([9])
        await s.upsert_schedule(schedule("b", at=10))
        await s.upsert_schedule(schedule("a", at=10))
        await s.upsert_schedule(schedule("x", workflow="other", at=0))
        kept = await s.upsert_schedule(schedule("b", at=500))  # same recurrence: keep cadence
        assert (kept.created_at, kept.next_run_at, kept.updated_at) == (10, 10, 500)
        changed = await s.upsert_schedule(schedule("a", every=50, at=700))
        assert (changed.created_at, changed.next_run_at) == (10, 700)

        assert await s.claim_due_schedule(["wf"]) is None  # the store's clock reads 9
        now[0] = 1_000
        claimed = await s.claim_due_schedule(["wf"])  # b is due; a is not yet
        assert claimed is not None
        assert claimed.schedule.key == "b"
        assert claimed.slot == 10
        expected_next = next_fire_time(Recurrence(every_ms=100), 10, 1_000)
        assert claimed.schedule.next_run_at == expected_next == 1_010
        assert (claimed.schedule.input, claimed.schedule.updated_at) == ({"k": "b"}, 1_000)
        now[0] = 1_010
        tie = await s.claim_due_schedule(["wf"])
        assert tie is not None
        assert (tie.schedule.key, tie.slot) == ("a", 700)
        assert [x.key for x in await s.list_schedules()] == ["a", "b", "x"]
        assert await s.delete_schedule("x")
        assert not await s.delete_schedule("x")
        now[0] = 10_000
        assert await s.claim_due_schedule(["other"]) is None

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
            await s.claim_next_run(["wf"], lease_ms=LEASE)
        with pytest.raises(StorageError, match="create_run"):
            await s.create_run(new_run("r2"))
        with pytest.raises(StorageError, match="initialize"):
            await s.initialize()

    run(main())


def test_plugin_registers_the_memory_adapter(tmp_path: Path) -> None:
    (spec,) = reflow_adapters()
    assert (spec.name, spec.schemes, spec.capabilities) == ("memory", ("memory",), frozenset())
    assert spec.conformance_factory is not None
    fresh = spec.conformance_factory(tmp_path, {}, clock=lambda: 42)
    assert isinstance(fresh, MemoryStorage)
    assert run(fresh.now()) == 42  # the kit's clock is the store's clock
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
