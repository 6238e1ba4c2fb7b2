"""Checkpoints are written once: a final step row is never changed again.

A step row whose status is final (``completed``, ``completed-early``, ``skipped``) is the
result every replay reads; if a second writer could replace it, two executions of the
same step could each believe their own result is the one that counts. So
``save_step_result`` over a final row writes nothing and answers ``False`` (with or
without a lease, even from the run's current holder), and ``consume_event`` over one
answers ``ConsumeResult(held=False)`` and consumes nothing: the first writer wins. Rows
that are not final (``running``, ``sleeping``, ``waiting``, ``failed``) stay updatable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from reflow_conformance.cases import case
from reflow_conformance.harness import ContractViolation, Harness, expect
from reflow_core.errors import StorageError
from reflow_core.types import ClaimedRun, ConsumeResult, ErrorInfo, StepResult, StepStatus

FINAL = (StepStatus.COMPLETED, StepStatus.COMPLETED_EARLY, StepStatus.SKIPPED)
NOT_FINAL = (StepStatus.RUNNING, StepStatus.SLEEPING, StepStatus.WAITING, StepStatus.FAILED)


def _rewrites(h: Harness, row: StepResult) -> list[StepResult]:
    """Every kind of second write to ``row``'s step: same row, other output, other status."""
    error = ErrorInfo(type="E", message="second writer")
    rewrites = [row]
    for status in StepStatus:
        rewrites.append(
            h.step(
                row.run_id,
                row.name,
                status,
                output=f"second writer ({status.value})",
                error=error if status is StepStatus.FAILED else None,
                created_at=row.created_at + 1,
                wake_at=h.future() if status in (StepStatus.SLEEPING, StepStatus.WAITING) else None,
                attempts=row.attempts + 1,
            )
        )
    return rewrites


async def _expect_kept(
    h: Harness,
    row: StepResult,
    write: Callable[[StepResult], Awaitable[bool]],
    situation: str,
) -> None:
    """Every rewrite of the final ``row`` answers False and leaves storage unchanged."""
    for rewrite in _rewrites(h, row):
        before = await h.snapshot([row.run_id])
        try:
            ok = await write(rewrite)
        except StorageError as exc:
            raise ContractViolation(
                f"save_step_result over a final row ({situation}) raised",
                "False",
                f"StorageError: {exc}",
            ) from exc
        expect(
            ok,
            False,
            f"save_step_result of a {rewrite.status.value} row over a final "
            f"{row.status.value} row ({situation})",
        )
        await h.expect_unchanged(before, [row.run_id], f"after a refused rewrite ({situation})")
    expect(await h.storage.get_step_results(row.run_id), [row], f"the final row ({situation})")


def _slug(status: StepStatus) -> str:
    return status.value.replace("-", "_")


def _without_lease_case(status: StepStatus) -> None:
    @case(
        f"checkpoints.{_slug(status)}_kept_without_lease",
        f"A {status.value} row is never rewritten by save_step_result without a lease "
        "(same row, other output, any status): False, nothing changes.",
    )
    async def kept(h: Harness) -> None:
        run = await h.create()
        row = h.step(run.id, "charge", status, output={"charged": 42}, created_at=1_000)
        expect(await h.storage.save_step_result(row), True, "the first write")
        await _expect_kept(h, row, h.storage.save_step_result, "no lease")


def _held_lease_case(status: StepStatus) -> None:
    @case(
        f"checkpoints.{_slug(status)}_kept_with_held_lease",
        f"A {status.value} row is never rewritten, even by the run's current holder with its "
        "held lease: False, nothing changes, and the lease stays held.",
    )
    async def kept(h: Harness) -> None:
        claimed = await h.created_and_claimed()
        row = h.step(claimed.run.id, "charge", status, output={"charged": 42}, created_at=1_000)
        expect(await h.storage.save_step_result(row, claimed.lease_id), True, "the first write")

        async def write(rewrite: StepResult) -> bool:
            return await h.storage.save_step_result(rewrite, claimed.lease_id)

        await _expect_kept(h, row, write, "the held lease")
        ok = await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id)
        expect(ok, True, "the lease is still held")


def _after_takeover_case(status: StepStatus) -> None:
    @case(
        f"checkpoints.{_slug(status)}_kept_after_takeover",
        f"A {status.value} row written by a holder whose run was then taken over is not "
        "rewritten by the new holder (it replays it instead).",
    )
    async def kept(h: Harness) -> None:
        old = await h.created_and_claimed()
        row = h.step(old.run.id, "charge", status, output={"charged": 42}, created_at=1_000)
        expect(await h.storage.save_step_result(row, old.lease_id), True, "the first write")
        new = await h.take_over(old.run.id)

        async def write(rewrite: StepResult) -> bool:
            return await h.storage.save_step_result(rewrite, new.lease_id)

        await _expect_kept(h, row, write, "the new holder's lease")


def _consume_case(status: StepStatus) -> None:
    @case(
        f"checkpoints.consume_over_{_slug(status)}_refused",
        f"consume_event whose checkpoint already stands as a {status.value} row answers "
        "held=False and consumes nothing: the event stays buffered, the row unchanged.",
    )
    async def refused(h: Harness) -> None:
        claimed = await h.created_and_claimed()
        run_id = claimed.run.id
        row = h.step(run_id, "ev", status, output="first", created_at=1_000)
        expect(await h.storage.save_step_result(row, claimed.lease_id), True, "the first write")
        await h.storage.deliver_event(run_id, "ev", "buffered")
        before = await h.snapshot([run_id])
        checkpoint = h.step(run_id, "ev", StepStatus.COMPLETED, output=None, created_at=2_000)
        result = await h.storage.consume_event("ev", checkpoint, claimed.lease_id)
        expect(result, ConsumeResult(held=False), f"consume_event over a final {status} row")
        await h.expect_unchanged(before, [run_id], "after consume_event over a final row")
        record = await h.storage.take_event(run_id, "ev")
        expect(record.payload if record else None, "buffered", "the event is still buffered")


for _status in FINAL:
    _without_lease_case(_status)
    _held_lease_case(_status)
    _after_takeover_case(_status)
    _consume_case(_status)


@case("checkpoints.not_final_rows_updatable")
async def not_final_rows_updatable(h: Harness) -> None:
    """Rows that are not final (running, sleeping, waiting, failed) are updated in place,
    with and without a lease, and may become final."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    for index, status in enumerate(NOT_FINAL):
        name = f"s{index}"
        first = h.step(run_id, name, status, output="first", created_at=index)
        expect(await h.storage.save_step_result(first, claimed.lease_id), True, f"{status} row")
        for other in NOT_FINAL:
            again = h.step(run_id, name, other, output=f"again {other}", created_at=index)
            lease = claimed.lease_id if index % 2 else None
            ok = await h.storage.save_step_result(again, lease)
            expect(ok, True, f"update of a {status} row to {other}")
        done = h.step(run_id, name, StepStatus.COMPLETED, output="done", created_at=index)
        ok = await h.storage.save_step_result(done, claimed.lease_id)
        expect(ok, True, f"completing a step whose row was {status}")
    rows = await h.storage.get_step_results(run_id)
    expect(
        [(r.status, r.output) for r in rows],
        [(StepStatus.COMPLETED, "done")] * len(NOT_FINAL),
        "rows after their updates",
    )


@case("checkpoints.consume_over_waiting_row")
async def consume_over_waiting_row(h: Harness) -> None:
    """consume_event over the wait's own (not final) row consumes and completes it; a second
    consume for the same checkpoint is then refused, the next event left buffered."""
    claimed: ClaimedRun = await h.created_and_claimed()
    run_id = claimed.run.id
    waiting = h.step(run_id, "ev", StepStatus.WAITING, created_at=1_000, wake_at=h.future())
    await h.storage.save_step_result(waiting, claimed.lease_id)
    await h.storage.deliver_event(run_id, "ev", "first")
    await h.storage.deliver_event(run_id, "ev", "second")
    checkpoint = h.step(run_id, "ev", StepStatus.COMPLETED, created_at=1_000)
    result = await h.storage.consume_event("ev", checkpoint, claimed.lease_id)
    expect(result.event.payload if result.event else None, "first", "the first consume")
    result = await h.storage.consume_event("ev", checkpoint, claimed.lease_id)
    expect(result, ConsumeResult(held=False), "a second consume for the same checkpoint")
    [row] = await h.storage.get_step_results(run_id)
    expect((row.status, row.output), (StepStatus.COMPLETED, "first"), "the checkpoint")
    record = await h.storage.take_event(run_id, "ev")
    expect(record.payload if record else None, "second", "the second event stays buffered")
