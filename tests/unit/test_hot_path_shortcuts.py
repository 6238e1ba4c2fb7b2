"""Issue 13's hot-path shortcuts keep their meaning: lease ids stay unique (also across a
fork), ``to_stored`` is ``to_plain`` then ``encode``, a step's context reads ``steps`` and
``prev`` as of its start, the memory adapter's one-walk checkpoint keeps every rule, the
dispatcher's slot count hands every released slot to a waiter, and the fence reads the
loop's own clock."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from reflow_adapters.memory import MemoryStorage
from reflow_core import Engine, Workflow, codec
from reflow_core.dispatcher import _Slots
from reflow_core.errors import (
    InvalidIdentifierError,
    SerializationError,
    StorageError,
)
from reflow_core.execution.active import ActiveRun
from reflow_core.identifiers import check_identifier
from reflow_core.lease import new_lease_id
from reflow_core.types import RunStatus, StepResult, StepStatus, WorkflowRun


def test_lease_ids_are_distinct_valid_identifiers() -> None:
    ids = [new_lease_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for lease_id in (ids[0], ids[-1]):
        assert check_identifier(lease_id, "lease id") == lease_id
        assert len(lease_id) <= 64
    assert len({lease_id.rsplit("-", 1)[0] for lease_id in ids}) == 1  # one prefix per process


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_issues_lease_ids_of_its_own() -> None:
    parent = [new_lease_id() for _ in range(3)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, back through the pipe, then leave at once
        try:
            os.write(write, " ".join(new_lease_id() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split()
    os.waitpid(pid, 0)
    after = new_lease_id()
    assert len(child) == 3
    assert {c.rsplit("-", 1)[0] for c in child} != {p.rsplit("-", 1)[0] for p in parent}
    assert not set(child) & {*parent, after}


class _Point(msgspec.Struct):
    x: int
    at: datetime


@pytest.mark.parametrize(
    ("value", "declared"),
    [
        ({"i": 1, "n": [1.5, None, True]}, None),
        ({"$k": {"when": datetime(2024, 5, 1, tzinfo=UTC)}}, None),
        ([datetime(2024, 5, 1)], Any),
        ("text", None),
        (None, None),
        (_Point(x=1, at=datetime(2024, 5, 1, tzinfo=UTC)), _Point),
    ],
)
def test_to_stored_is_to_plain_then_encode(value: Any, declared: Any) -> None:
    plain = codec.to_plain(value, declared)
    assert codec.to_stored(value, declared) == (plain, codec.encode(plain))


@pytest.mark.parametrize(
    "value", [{"n": float("nan")}, {"t": (1, 2)}, _Point(x=1, at=datetime.now())]
)
def test_to_stored_refuses_what_encode_refuses(value: Any) -> None:
    with pytest.raises(SerializationError) as expected:
        codec.encode(codec.to_plain(value))
    with pytest.raises(SerializationError) as got:
        codec.to_stored(value)
    assert str(got.value) == str(expected.value)


def test_a_kept_context_still_shows_the_steps_and_prev_of_its_own_start() -> None:
    kept: list[Any] = []
    seen: list[Any] = []
    wf: Workflow[Any] = Workflow("kept")

    @wf.step
    async def first(ctx: Any) -> int:
        return 1

    @wf.step
    async def second(ctx: Any) -> int:
        kept.append(ctx)  # read only later, once third has been recorded
        return 2

    @wf.step
    async def third(ctx: Any) -> int:
        old = kept[0]
        seen.append((dict(old.steps), old.prev, "second" in old.steps, dict(ctx.steps)))
        return 3

    async def scenario() -> None:
        engine = Engine("memory://", [wf], use_plugins=False)
        try:
            await engine.enqueue(wf, None)
            await engine.run_until_idle()
        finally:
            await engine.storage.close()

    asyncio.run(scenario())
    assert seen == [({"first": 1}, 1, False, {"first": 1, "second": 2})]


def _row(run_id: str, name: str, status: StepStatus, *, at: int, step_id: str = "") -> StepResult:
    return StepResult(
        id=step_id or f"{run_id}/{name}",
        run_id=run_id,
        name=name,
        status=status,
        output={"at": at} if status is StepStatus.COMPLETED else None,
        created_at=at,
        updated_at=at,
    )


async def _held_memory_run() -> tuple[MemoryStorage, str]:
    """A memory store with run ``r`` of workflow ``w`` claimed; its lease id."""
    storage = MemoryStorage(clock=lambda: 1_000)
    run = WorkflowRun(
        id="r", workflow="w", input=None, status=RunStatus.PENDING, created_at=1, updated_at=1
    )
    await storage.create_run(run)
    claimed = await storage.claim_next_run(["w"], lease_ms=10_000)
    assert claimed is not None
    return storage, claimed.lease_id


def test_memory_checkpoint_keeps_identity_write_once_and_name_checks() -> None:
    async def scenario() -> None:
        storage, lease = await _held_memory_run()
        assert await storage.save_step_result(_row("r", "a", StepStatus.RUNNING, at=5), lease)
        # A known row again: created_at kept, the output stored, then final for good.
        assert await storage.save_step_result(_row("r", "a", StepStatus.COMPLETED, at=9), lease)
        assert not await storage.save_step_result(_row("r", "a", StepStatus.RUNNING, at=12), lease)
        (stored,) = await storage.get_step_results("r")
        assert (stored.status, stored.created_at, stored.updated_at) == (
            StepStatus.COMPLETED,
            5,
            9,
        )
        assert stored.output == {"at": 9}
        # Identity clashes still raise, before anything is written.
        with pytest.raises(StorageError):
            await storage.save_step_result(_row("r", "b", StepStatus.RUNNING, at=13, step_id="r/a"))
        with pytest.raises(StorageError):
            await storage.save_step_result(_row("r", "a", StepStatus.RUNNING, at=13, step_id="x"))
        # A name already seen valid does not make an invalid one pass.
        with pytest.raises(InvalidIdentifierError):
            await storage.save_step_result(_row("r", "bad\x00", StepStatus.RUNNING, at=14), lease)
        # Not held: refused.
        assert not await storage.save_step_result(_row("r", "c", StepStatus.RUNNING, at=15), "x")
        assert [s.name for s in await storage.get_step_results("r")] == ["a"]
        await storage.close()

    asyncio.run(scenario())


def test_slots_are_taken_in_batches_and_every_release_reaches_a_waiter() -> None:
    async def scenario() -> None:
        slots = _Slots(3)
        assert await slots.take(2) == 2
        assert await slots.take(5) == 1  # what is left, without waiting
        first = asyncio.create_task(slots.take(4))
        second = asyncio.create_task(slots.take(4))
        await asyncio.sleep(0)  # let both start waiting
        assert not first.done() and not second.done()
        slots.release()
        done, pending = await asyncio.wait([first, second], return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and done.pop().result() == 1
        slots.release()
        slots.release()
        (last,) = pending
        assert await last == 2
        assert slots.free == 0

    asyncio.run(scenario())


def test_a_cancelled_slot_waiter_takes_nothing() -> None:
    async def scenario() -> None:
        slots = _Slots(1)
        assert await slots.take(1) == 1
        waiter = asyncio.create_task(slots.take(1))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        slots.release()
        assert slots.free == 1
        assert await slots.take(1) == 1

    asyncio.run(scenario())


def test_the_fence_reads_the_loops_own_clock() -> None:
    class Shifted(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return super().time() + 1000.0

    async def check(shifted: bool) -> None:
        loop = asyncio.get_running_loop()
        run = ActiveRun(
            run_id="r", workflow="w", lease_id="l", attempt=1, deadline=loop.time() + 60
        )
        run.arm()
        assert run.clock == (loop.time if shifted else time.monotonic)
        assert not run.fenced()
        run.deadline = loop.time() - 1  # passed, on the loop's own clock
        assert run.fenced()
        if shifted:
            run.deadline = time.monotonic() + 60  # still ahead on the process clock only
            assert run.fenced()
        run.disarm()

    asyncio.run(check(shifted=False))
    loop = Shifted()
    try:
        loop.run_until_complete(check(shifted=True))
    finally:
        loop.close()


def test_memory_checkpoint_skips_the_id_scan_only_for_the_engines_own_id() -> None:
    # Only ``<run id>/<name>`` of a stored run and a name already found valid skips the
    # character scan of the step id; every other id is still checked in full.
    async def scenario() -> None:
        storage, lease = await _held_memory_run()
        assert await storage.save_step_result(_row("r", "a", StepStatus.RUNNING, at=1), lease)
        # Known name, but an id of another form: scanned, and refused when invalid.
        for bad in ("r/a\x00", "r\x00a", "x" * 601, "\ud800"):
            with pytest.raises(InvalidIdentifierError, match="step id"):
                await storage.save_step_result(
                    _row("r", "a", StepStatus.RUNNING, at=2, step_id=bad), lease
                )
        # Another valid form is fine (ids are the caller's), as is the engine's own.
        custom = _row("r", "b", StepStatus.RUNNING, at=3, step_id="custom:1")
        assert await storage.save_step_result(custom, lease)
        assert await storage.save_step_result(_row("r", "c", StepStatus.RUNNING, at=4), lease)

        class Name(str):
            pass

        # A str subclass equal to a known name is still checked (and passes when valid).
        subclassed = _row("r", Name("d"), StepStatus.RUNNING, at=5, step_id="r/d")
        assert await storage.save_step_result(subclassed, lease)
        names = sorted(step.name for step in await storage.get_step_results("r"))
        assert names == ["a", "b", "c", "d"]
        await storage.close()

    asyncio.run(scenario())
