"""Leases: heartbeats, and fencing — a lost lease can write nothing, anywhere.

The lease-checked methods are heartbeat_run, sleep_run, wait_run, save_step_result (with
a lease) and update_claimed_run_status. Each must refuse an old lease after a takeover,
and after the run was suspended, finished or cancelled, leaving every readable state as
it was.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from reflow_conformance.cases import case
from reflow_conformance.harness import LEASE_MS, Harness, expect
from reflow_core.types import ClaimedRun, RunStatus

LeaseWrite = Callable[[Harness, str, str], Awaitable[bool]]

LEASE_WRITES: dict[str, LeaseWrite] = {
    "heartbeat_run": lambda h, run_id, lease: h.storage.heartbeat_run(run_id, lease),
    "sleep_run": lambda h, run_id, lease: h.storage.sleep_run(run_id, lease, h.future()),
    "wait_run": lambda h, run_id, lease: h.storage.wait_run(run_id, lease, "ev", h.future()),
    "save_step_result": lambda h, run_id, lease: h.storage.save_step_result(
        h.step(run_id, "fenced", output="written with a lost lease"), lease
    ),
    "update_claimed_run_status": lambda h, run_id, lease: h.storage.update_claimed_run_status(
        run_id, lease, RunStatus.COMPLETED, output="written with a lost lease"
    ),
}
"""Every lease-checked write, with arguments that would visibly change state."""


async def expect_all_refused(h: Harness, run_id: str, lease: str, situation: str) -> None:
    """Every lease-checked write with ``lease`` returns False and changes nothing."""
    for name, write in LEASE_WRITES.items():
        before = await h.snapshot([run_id])
        expect(await write(h, run_id, lease), False, f"{name} with a lease lost by {situation}")
        await h.expect_unchanged(before, [run_id], f"after {name} refused ({situation})")


def _fencing_case(name: str, write: LeaseWrite) -> None:
    @case(
        f"leases.fencing_{name}",
        f"After a stale takeover, {name} with the old lease returns False and changes "
        "nothing; the new holder's lease still works.",
    )
    async def fencing(h: Harness) -> None:
        old = await h.created_and_claimed()
        new = await h.take_over(old.run.id)
        before = await h.snapshot([old.run.id])
        expect(await write(h, old.run.id, old.lease_id), False, f"{name} with the old lease")
        await h.expect_unchanged(before, [old.run.id], f"after {name} with the old lease")
        expect(await write(h, old.run.id, new.lease_id), True, f"{name} with the new lease")


for _name, _write in LEASE_WRITES.items():
    _fencing_case(_name, _write)


@case("leases.heartbeat_held")
async def heartbeat_held(h: Harness) -> None:
    """A heartbeat with the held lease is True and never moves heartbeat_at backwards."""
    claimed = await h.created_and_claimed()
    first = (await h.get(claimed.run.id)).heartbeat_at
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "heartbeat")
    second = (await h.get(claimed.run.id)).heartbeat_at
    assert first is not None, "heartbeat_at must be set by the claim"
    assert second is not None, "heartbeat_at must be set by the heartbeat"
    expect(second >= first, True, f"heartbeat_at moved from {first} to {second}")
    expect((await h.get(claimed.run.id)).status, RunStatus.RUNNING, "status after heartbeat")


@case("leases.heartbeat_foreign_lease")
async def heartbeat_foreign_lease(h: Harness) -> None:
    """A heartbeat with a lease that was never issued is False."""
    claimed = await h.created_and_claimed()
    expect(await h.storage.heartbeat_run(claimed.run.id, "not-a-lease"), False, "heartbeat")


@case("leases.heartbeat_missing_run")
async def heartbeat_missing_run(h: Harness) -> None:
    """Lease-checked writes on a run that does not exist are False."""
    claimed = await h.created_and_claimed()
    for name, write in LEASE_WRITES.items():
        expect(await write(h, "missing", claimed.lease_id), False, f"{name} on a missing run")


@case("leases.heartbeat_other_runs_lease")
async def heartbeat_other_runs_lease(h: Harness) -> None:
    """A lease held on one run is not valid for another run."""
    a = await h.created_and_claimed()
    b = await h.created_and_claimed()
    await expect_all_refused(h, b.run.id, a.lease_id, "belonging to another run")


@case("leases.heartbeat_keeps_run_live")
async def heartbeat_keeps_run_live(h: Harness) -> None:
    """Heartbeats keep a run from going stale: renewed before expiry, again and again, the
    run is never claimed though the time since the claim is far beyond one lease."""
    claimed = await h.created_and_claimed()
    for _ in range(4):
        h.advance(LEASE_MS - 1)
        expect(await h.claim_any(["wf"]), None, "claim of a run 1 ms before its expiry")
        ok = await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id)
        expect(ok, True, "heartbeat of a held lease")
    h.advance(LEASE_MS - 1)
    expect(await h.claim_any(["wf"]), None, "claim of a heartbeating run")


async def _suspended(h: Harness, how: str) -> ClaimedRun:
    claimed = await h.created_and_claimed()
    run_id, lease = claimed.run.id, claimed.lease_id
    if how == "sleep":
        expect(await h.storage.sleep_run(run_id, lease, h.future()), True, "sleep_run")
    elif how == "wait":
        expect(await h.storage.wait_run(run_id, lease, "ev", None), True, "wait_run")
    elif how == "cancel":
        expect(await h.storage.update_run_status(run_id, RunStatus.CANCELLED), True, "cancel")
    elif how == "release":
        ok = await h.storage.update_claimed_run_status(run_id, lease, RunStatus.PENDING)
        expect(ok, True, "update_claimed_run_status(pending)")
    else:
        ok = await h.storage.update_claimed_run_status(run_id, lease, RunStatus(how))
        expect(ok, True, f"update_claimed_run_status({how})")
    return claimed


_RELEASES = {
    "sleep": "sleep_run releases the lease: every lease-checked write with it is refused.",
    "wait": "wait_run releases the lease: every lease-checked write with it is refused.",
    "cancel": "Cancelling (update_run_status) voids the lease: every write with it is refused.",
    "release": "update_claimed_run_status(pending) releases the lease: writes are refused.",
    "completed": "A completed run refuses every lease-checked write with its last lease.",
    "failed": "A failed run refuses every lease-checked write with its last lease.",
}


def _released_case(how: str, description: str) -> None:
    @case(f"leases.released_by_{how}", description)
    async def released(h: Harness) -> None:
        claimed = await _suspended(h, how)
        await expect_all_refused(h, claimed.run.id, claimed.lease_id, how)


for _how, _description in _RELEASES.items():
    _released_case(_how, _description)


@case("leases.new_lease_after_wake_only")
async def new_lease_after_wake_only(h: Harness) -> None:
    """A run woken and claimed again accepts only the new lease."""
    claimed = await _suspended(h, "sleep")
    await h.storage.update_run_status(claimed.run.id, RunStatus.PENDING)
    again = await h.claim(claimed.run.id)
    await expect_all_refused(h, claimed.run.id, claimed.lease_id, "a later claim")
    expect(await h.storage.heartbeat_run(claimed.run.id, again.lease_id), True, "new lease")
