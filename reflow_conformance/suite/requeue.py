"""requeue_run: failed or cancelled back to pending, keeping completed work."""

from __future__ import annotations

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, expect
from reflow_core.types import ClaimedRun, ErrorInfo, RunStatus, StepStatus

KEPT = (
    StepStatus.COMPLETED,
    StepStatus.COMPLETED_EARLY,
    StepStatus.SKIPPED,
    StepStatus.SLEEPING,
    StepStatus.WAITING,
)


async def _failed_run(h: Harness) -> ClaimedRun:
    claimed = await h.created_and_claimed()
    error = ErrorInfo(type="E", message="boom", step="s-failed")
    await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.FAILED, output="partial", error=error
    )
    return claimed


@case("requeue.failed_discards_only_failed_steps")
async def failed_discards_only_failed_steps(h: Harness) -> None:
    """A failed run goes to pending; only its failed step rows are deleted."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    kept = [
        h.step(run_id, f"s-{status.value}", status, created_at=index)
        for index, status in enumerate(KEPT)
    ]
    for step in [*kept, h.step(run_id, "s-failed", StepStatus.FAILED, created_at=99)]:
        await h.storage.save_step_result(step, claimed.lease_id)
    await h.storage.update_claimed_run_status(run_id, claimed.lease_id, RunStatus.FAILED)
    expect(await h.storage.requeue_run(run_id), True, "requeue_run of a failed run")
    expect((await h.get(run_id)).status, RunStatus.PENDING, "status after requeue")
    expect(await h.storage.get_step_results(run_id), kept, "steps after requeue")


@case("requeue.cancelled_to_pending")
async def cancelled_to_pending(h: Harness) -> None:
    """A cancelled run goes back to pending and is claimable."""
    run = await h.create()
    await h.storage.update_run_status(run.id, RunStatus.CANCELLED)
    expect(await h.storage.requeue_run(run.id), True, "requeue_run of a cancelled run")
    await h.claim(run.id)


@case("requeue.clears_error_and_output")
async def clears_error_and_output(h: Harness) -> None:
    """Requeue clears error and output."""
    claimed = await _failed_run(h)
    await h.storage.requeue_run(claimed.run.id)
    stored = await h.get(claimed.run.id)
    expect((stored.error, stored.output), (None, None), "(error, output) after requeue")


@case("requeue.old_lease_stays_dead")
async def old_lease_stays_dead(h: Harness) -> None:
    """After requeue and a new claim, the lease from before the failure is refused."""
    claimed = await _failed_run(h)
    await h.storage.requeue_run(claimed.run.id)
    again = await h.claim(claimed.run.id)
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), False, "old lease")
    expect(await h.storage.heartbeat_run(claimed.run.id, again.lease_id), True, "new lease")


@case("requeue.refuses_missing")
async def refuses_missing(h: Harness) -> None:
    """requeue_run of a missing run is False."""
    expect(await h.storage.requeue_run("missing"), False, "requeue_run('missing')")


def _refusal_case(status: str) -> None:
    @case(
        f"requeue.refuses_{status}",
        f"A {status} run is not requeued: False, and nothing (status, steps) changes.",
    )
    async def refuses(h: Harness) -> None:
        run = await h.create()
        if status != "pending":
            claimed = await h.claim(run.id)
            await h.storage.save_step_result(
                h.step(run.id, "s", StepStatus.FAILED), claimed.lease_id
            )
            if status == "sleeping":
                await h.storage.sleep_run(run.id, claimed.lease_id, h.future())
            elif status == "waiting":
                await h.storage.wait_run(run.id, claimed.lease_id, "ev", None)
            elif status == "completed":
                await h.storage.update_claimed_run_status(
                    run.id, claimed.lease_id, RunStatus.COMPLETED
                )
        expect((await h.get(run.id)).status, RunStatus(status), "status before requeue")
        before = await h.snapshot([run.id])
        expect(await h.storage.requeue_run(run.id), False, f"requeue_run of a {status} run")
        await h.expect_unchanged(before, [run.id], f"after a refused requeue ({status})")


for _status in ("pending", "running", "sleeping", "waiting", "completed"):
    _refusal_case(_status)
