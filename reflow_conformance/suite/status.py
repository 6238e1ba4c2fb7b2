"""Status updates: update_claimed_run_status (lease-checked) and update_run_status."""

from __future__ import annotations

from reflow_conformance.cases import case
from reflow_conformance.harness import LEASE_MS, Harness, assert_exact, expect
from reflow_core.types import ErrorInfo, RunStatus

ERROR = ErrorInfo(
    type="builtins.ValueError",
    message="bad input ü 🚀",
    code="STEP_FAILED",
    traceback="Traceback (most recent call last):\n  ...\nValueError: bad input",
    step="charge",
)


@case("status.update_claimed_respects_lease")
async def update_claimed_respects_lease(h: Harness) -> None:
    """A wrong lease is refused; the held lease completes the run."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    ok = await h.storage.update_claimed_run_status(run_id, "wrong", RunStatus.COMPLETED)
    expect(ok, False, "update_claimed_run_status with a wrong lease")
    expect((await h.get(run_id)).status, RunStatus.RUNNING, "status after a refused update")
    ok = await h.storage.update_claimed_run_status(run_id, claimed.lease_id, RunStatus.COMPLETED)
    expect(ok, True, "update_claimed_run_status with the held lease")
    expect((await h.get(run_id)).status, RunStatus.COMPLETED, "status after completing")


@case("status.completed_stores_output")
async def completed_stores_output(h: Harness) -> None:
    """Completing stores the output exactly and releases the lease."""
    claimed = await h.created_and_claimed()
    output = {"total": 12.5, "items": [1, "two", None], "ok": True}
    await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output=output
    )
    stored = await h.get(claimed.run.id)
    assert_exact(stored.output, output, "run output")
    expect(stored.error, None, "error of a completed run")
    heartbeat = await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id)
    expect(heartbeat, False, "heartbeat after completing")


@case("status.failed_stores_error")
async def failed_stores_error(h: Harness) -> None:
    """Failing stores the ErrorInfo with every field exactly."""
    claimed = await h.created_and_claimed()
    await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.FAILED, error=ERROR
    )
    stored = await h.get(claimed.run.id)
    expect((stored.status, stored.error), (RunStatus.FAILED, ERROR), "failed run")


@case("status.running_keeps_lease")
async def running_keeps_lease(h: Harness) -> None:
    """update_claimed_run_status(running) keeps the lease."""
    claimed = await h.created_and_claimed()
    ok = await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.RUNNING
    )
    expect(ok, True, "update to running")
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "heartbeat")


@case("status.pending_releases_at_once")
async def pending_releases_at_once(h: Harness) -> None:
    """update_claimed_run_status(pending) makes the run claimable at once (no expiry wait)."""
    claimed = await h.created_and_claimed()
    await h.storage.update_claimed_run_status(claimed.run.id, claimed.lease_id, RunStatus.PENDING)
    expect((await h.get(claimed.run.id)).status, RunStatus.PENDING, "status after release")
    again = await h.claim(claimed.run.id)
    expect(again.lease_id != claimed.lease_id, True, "a new lease after release")


@case("status.update_claimed_missing_run")
async def update_claimed_missing_run(h: Harness) -> None:
    """update_claimed_run_status of a missing run is False."""
    ok = await h.storage.update_claimed_run_status("missing", "lease", RunStatus.COMPLETED)
    expect(ok, False, "update_claimed_run_status('missing')")


@case("status.update_run_status_reports_existence")
async def update_run_status_reports_existence(h: Harness) -> None:
    """update_run_status is True for an existing run, False for a missing one."""
    run = await h.create()
    expect(await h.storage.update_run_status(run.id, RunStatus.CANCELLED), True, "existing")
    expect((await h.get(run.id)).status, RunStatus.CANCELLED, "status after cancel")
    expect(await h.storage.update_run_status("missing", RunStatus.CANCELLED), False, "missing")


@case("status.cancel_running_clears_lease")
async def cancel_running_clears_lease(h: Harness) -> None:
    """Cancelling a running run voids its lease; it is never reclaimed."""
    claimed = await h.created_and_claimed()
    await h.storage.update_run_status(claimed.run.id, RunStatus.CANCELLED)
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), False, "heartbeat")
    h.advance(10 * LEASE_MS)
    expect(await h.claim_any(["wf"]), None, "claim after cancel, long after the lease")


@case("status.cancel_sleeping_clears_wake")
async def cancel_sleeping_clears_wake(h: Harness) -> None:
    """Cancelling a sleeping run clears wake_at; it does not wake up later."""
    claimed = await h.created_and_claimed()
    await h.storage.sleep_run(claimed.run.id, claimed.lease_id, h.past())
    await h.storage.update_run_status(claimed.run.id, RunStatus.CANCELLED)
    stored = await h.get(claimed.run.id)
    expect((stored.status, stored.wake_at), (RunStatus.CANCELLED, None), "cancelled sleeper")
    h.advance(10 * LEASE_MS)
    expect(await h.claim_any(["wf"]), None, "claim after cancel")


@case("status.expected_matches")
async def expected_matches(h: Harness) -> None:
    """With expected containing the current status, the update happens."""
    run = await h.create()
    expected = [RunStatus.PENDING, RunStatus.RUNNING]
    ok = await h.storage.update_run_status(run.id, RunStatus.CANCELLED, expected=expected)
    expect(ok, True, "update_run_status with a matching expected")
    expect((await h.get(run.id)).status, RunStatus.CANCELLED, "status")


@case("status.expected_mismatch_refused")
async def expected_mismatch_refused(h: Harness) -> None:
    """A run that completed is not overwritten by a cancel expecting a live status."""
    claimed = await h.created_and_claimed()
    await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output="done"
    )
    before = await h.snapshot([claimed.run.id])
    live = {RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SLEEPING, RunStatus.WAITING}
    ok = await h.storage.update_run_status(claimed.run.id, RunStatus.CANCELLED, expected=live)
    expect(ok, False, "cancel of a completed run with expected=live statuses")
    await h.expect_unchanged(before, [claimed.run.id], "after a refused cancel")


@case("status.expected_missing_run")
async def expected_missing_run(h: Harness) -> None:
    """update_run_status with expected on a missing run is False."""
    ok = await h.storage.update_run_status(
        "missing", RunStatus.CANCELLED, expected=[RunStatus.PENDING]
    )
    expect(ok, False, "update_run_status('missing', expected=...)")


@case("status.expected_empty_refuses")
async def expected_empty_refuses(h: Harness) -> None:
    """expected=[] matches no status: nothing changes (distinct from expected=None)."""
    run = await h.create()
    ok = await h.storage.update_run_status(run.id, RunStatus.CANCELLED, expected=[])
    expect(ok, False, "update_run_status(expected=[])")
    expect((await h.get(run.id)).status, RunStatus.PENDING, "status")


@case("status.unconditional_overwrites")
async def unconditional_overwrites(h: Harness) -> None:
    """Without expected, update_run_status changes any status (an operator override)."""
    claimed = await h.created_and_claimed()
    await h.storage.update_claimed_run_status(claimed.run.id, claimed.lease_id, RunStatus.FAILED)
    expect(await h.storage.update_run_status(claimed.run.id, RunStatus.CANCELLED), True, "update")
    expect((await h.get(claimed.run.id)).status, RunStatus.CANCELLED, "status")


@case("status.refused_on_cancelled")
async def refused_on_cancelled(h: Harness) -> None:
    """update_claimed_run_status on a cancelled run (old lease) is refused; stays cancelled."""
    claimed = await h.created_and_claimed()
    await h.storage.update_run_status(claimed.run.id, RunStatus.CANCELLED)
    ok = await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output="late"
    )
    expect(ok, False, "completing a cancelled run")
    stored = await h.get(claimed.run.id)
    expect((stored.status, stored.output), (RunStatus.CANCELLED, None), "cancelled run")


@case("status.refused_on_completed")
async def refused_on_completed(h: Harness) -> None:
    """A completed run cannot be failed afterwards with its old lease; output kept."""
    claimed = await h.created_and_claimed()
    run_id, lease = claimed.run.id, claimed.lease_id
    await h.storage.update_claimed_run_status(run_id, lease, RunStatus.COMPLETED, output=1)
    ok = await h.storage.update_claimed_run_status(run_id, lease, RunStatus.FAILED, error=ERROR)
    expect(ok, False, "failing a completed run")
    stored = await h.get(run_id)
    expect((stored.status, stored.output, stored.error), (RunStatus.COMPLETED, 1, None), "run")


@case("status.refused_on_pending")
async def refused_on_pending(h: Harness) -> None:
    """A pending run (never claimed) refuses update_claimed_run_status with any lease."""
    run = await h.create()
    ok = await h.storage.update_claimed_run_status(run.id, "", RunStatus.COMPLETED)
    expect(ok, False, "update_claimed_run_status on a pending run with an empty lease")
    expect((await h.get(run.id)).status, RunStatus.PENDING, "status")
