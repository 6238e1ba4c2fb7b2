"""recoveries: how many claims took a run over from an expired lease.

Only a takeover of a ``running`` run whose lease expired counts. Claiming a pending run
(new, released, requeued, woken by an event) or a sleeping or waiting run whose time
came does not; ``requeue_run`` sets the count back to 0.
"""

from __future__ import annotations

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, expect
from reflow_core.types import ClaimedRun, RunStatus


async def _expect_recoveries(h: Harness, claimed: ClaimedRun, want: int, what: str) -> None:
    expect(claimed.run.recoveries, want, f"recoveries returned by the claim {what}")
    expect((await h.get(claimed.run.id)).recoveries, want, f"stored recoveries {what}")


@case("recoveries.not_on_pending_claim")
async def not_on_pending_claim(h: Harness) -> None:
    """Claiming a new run, and again after it was released to pending, counts nothing."""
    claimed = await h.created_and_claimed()
    await _expect_recoveries(h, claimed, 0, "of a new run")
    ok = await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.PENDING
    )
    expect(ok, True, "release to pending")
    again = await h.claim(claimed.run.id)
    expect(again.run.attempt, 2, "attempt of the second claim")
    await _expect_recoveries(h, again, 0, "after a release to pending")


@case("recoveries.not_on_woken_sleep")
async def not_on_woken_sleep(h: Harness) -> None:
    """Claiming a sleeping run whose wake_at came counts nothing."""
    claimed = await h.created_and_claimed()
    wake = h.now() + 1_000
    expect(await h.storage.sleep_run(claimed.run.id, claimed.lease_id, wake), True, "sleep")
    h.advance(1_000)
    await _expect_recoveries(h, await h.claim(claimed.run.id), 0, "of a woken sleeper")


@case("recoveries.not_on_woken_wait")
async def not_on_woken_wait(h: Harness) -> None:
    """Claiming a waiting run, woken by its deadline or by its event, counts nothing."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    deadline = h.now() + 1_000
    await h.storage.wait_run(run_id, claimed.lease_id, "ev", deadline)
    h.advance(1_000)
    again = await h.claim(run_id)
    await _expect_recoveries(h, again, 0, "after the wait's deadline")
    await h.storage.wait_run(run_id, again.lease_id, "ev", None)
    await h.storage.deliver_event(run_id, "ev", 1)
    await _expect_recoveries(h, await h.claim(run_id), 0, "after the awaited event")


@case("recoveries.counted_on_expired_takeover")
async def counted_on_expired_takeover(h: Harness) -> None:
    """Each takeover from an expired lease adds one (1, 2, 3); a later wake-up claim of the
    same run keeps the count."""
    claimed = await h.created_and_claimed()
    for count in (1, 2, 3):
        claimed = await h.take_over(claimed.run.id)
        await _expect_recoveries(h, claimed, count, f"after takeover {count}")
    expect(claimed.run.attempt, 4, "attempt after three takeovers")
    await h.storage.sleep_run(claimed.run.id, claimed.lease_id, h.now())
    await _expect_recoveries(h, await h.claim(claimed.run.id), 3, "of a woken sleeper")


@case("recoveries.reset_by_requeue")
async def reset_by_requeue(h: Harness) -> None:
    """requeue_run sets recoveries back to 0, for a failed and for a cancelled run; a later
    takeover counts from there."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    for end in (RunStatus.FAILED, RunStatus.CANCELLED):
        claimed = await h.take_over(run_id)
        claimed = await h.take_over(run_id)
        await _expect_recoveries(h, claimed, 2, "after two takeovers")
        if end is RunStatus.FAILED:
            await h.storage.update_claimed_run_status(run_id, claimed.lease_id, end)
        else:
            await h.storage.update_run_status(run_id, end)
        expect((await h.get(run_id)).recoveries, 2, f"recoveries once {end.value}")
        expect(await h.storage.requeue_run(run_id), True, f"requeue_run of a {end.value} run")
        expect((await h.get(run_id)).recoveries, 0, f"recoveries after requeue ({end.value})")
        claimed = await h.claim(run_id)
        await _expect_recoveries(h, claimed, 0, f"of the requeued run ({end.value})")
    await _expect_recoveries(h, await h.take_over(run_id), 1, "after requeue and a takeover")
