"""Lease fields: set by a claim, exactly; present only while running; cleared by every exit.

``claimed_at``, ``lease_ms``, ``lease_expires_at`` and ``holder`` describe the current
lease. A claim sets them from the store's clock and the claimer's arguments; every
write that moves a run out of ``running`` (sleep, wait, a status update with or without
the lease, requeue) clears them, while ``heartbeat_at`` keeps its last value so an
operator can tell how long ago the run was last alive. They are read through
``get_run`` and ``list_runs`` alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import KIT_HOLDER, LEASE_MS, Harness, expect
from reflow_core.types import ClaimedRun, LeaseHolder, RunFilter, RunStatus, WorkflowRun

CLEARED = (None, None, None, None)

HOLDER = LeaseHolder(
    worker="worker-7f3a-ünï-🚀", host="node-12.eu-west.example.internal", pid=2**31 - 1
)


def fields(run: WorkflowRun) -> tuple[Any, ...]:
    """``(claimed_at, lease_ms, lease_expires_at, holder)``."""
    return (run.claimed_at, run.lease_ms, run.lease_expires_at, run.holder)


async def _views(h: Harness, run_id: str) -> list[tuple[str, WorkflowRun]]:
    """The run as get_run and list_runs show it."""
    listed = [r for r in await h.storage.list_runs(RunFilter(limit=10_000)) if r.id == run_id]
    if len(listed) != 1:
        expect(len(listed), 1, f"list_runs rows for run {run_id}")
    return [("get_run", await h.get(run_id)), ("list_runs", listed[0])]


async def expect_cleared(h: Harness, run_id: str, beat: int, what: str) -> None:
    """Lease fields gone, heartbeat_at kept at ``beat``, in get_run and list_runs."""
    for label, seen in await _views(h, run_id):
        expect(
            fields(seen),
            CLEARED,
            f"{label} (claimed_at, lease_ms, lease_expires_at, holder) after {what}",
        )
        expect(seen.heartbeat_at, beat, f"{label} heartbeat_at after {what} (keeps its value)")


@case("lease_fields.none_before_first_claim")
async def none_before_first_claim(h: Harness) -> None:
    """A new run has no lease fields, no heartbeat_at and recoveries 0."""
    run = await h.create()
    for label, seen in [("create_run", run), *await _views(h, run.id)]:
        expect(fields(seen), CLEARED, f"{label} lease fields of a new run")
        expect((seen.heartbeat_at, seen.recoveries), (None, 0), f"{label} of a new run")


@case("lease_fields.set_by_claim")
async def set_by_claim(h: Harness) -> None:
    """A claim stores claimed_at = now, lease_ms, lease_expires_at = now + lease_ms and the
    holder; the claim's answer, get_run and list_runs all show them."""
    h.advance(17)
    now = h.now()
    claimed = await h.created_and_claimed(lease_ms=54_321, holder=HOLDER)
    want = (now, 54_321, now + 54_321, HOLDER)
    for label, seen in [("claim_next_run", claimed.run), *await _views(h, claimed.run.id)]:
        expect(fields(seen), want, f"{label} (claimed_at, lease_ms, lease_expires_at, holder)")


@case("lease_fields.holder_roundtrip")
async def holder_roundtrip(h: Harness) -> None:
    """The holder comes back exactly (unicode, a large pid, of type LeaseHolder) through
    claim_next_run, get_run, list_runs and a status-filtered list_runs."""
    claimed = await h.created_and_claimed(holder=HOLDER)
    running = await h.storage.list_runs(RunFilter(status=RunStatus.RUNNING))
    views = [("claim_next_run", claimed.run), *await _views(h, claimed.run.id)]
    views += [("list_runs(status=running)", r) for r in running]
    expect(len(running), 1, "running runs listed")
    for label, seen in views:
        expect(type(seen.holder), LeaseHolder, f"{label} type of holder")
        expect(seen.holder, HOLDER, f"{label} holder")


@case("lease_fields.no_holder")
async def no_holder(h: Harness) -> None:
    """A claim without a holder stores holder None (the other lease fields still set)."""
    claimed = await h.created_and_claimed(holder=None)
    for label, seen in [("claim_next_run", claimed.run), *await _views(h, claimed.run.id)]:
        expect(seen.holder, None, f"{label} holder of a claim without one")
        expect(seen.lease_ms, LEASE_MS, f"{label} lease_ms")


@case("lease_fields.replaced_by_takeover")
async def replaced_by_takeover(h: Harness) -> None:
    """A takeover replaces every lease field with the new claim's."""
    first = await h.created_and_claimed(holder=HOLDER)
    second = await h.take_over(first.run.id, lease_ms=3_333, holder=KIT_HOLDER)
    now = h.now()
    want = (now, 3_333, now + 3_333, KIT_HOLDER)
    for label, seen in [("claim_next_run", second.run), *await _views(h, first.run.id)]:
        expect(fields(seen), want, f"{label} lease fields after a takeover")


@case("lease_fields.kept_by_update_claimed_running")
async def kept_by_update_claimed_running(h: Harness) -> None:
    """update_claimed_run_status(running) keeps the lease and its fields unchanged (only a
    heartbeat renews the expiry)."""
    claimed = await h.created_and_claimed(lease_ms=9_000, holder=HOLDER)
    start = h.now()
    h.advance(100)
    ok = await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.RUNNING
    )
    expect(ok, True, "update_claimed_run_status(running)")
    for label, seen in await _views(h, claimed.run.id):
        expect(
            fields(seen),
            (start, 9_000, start + 9_000, HOLDER),
            f"{label} (claimed_at, lease_ms, lease_expires_at, holder) after an update to running",
        )
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "still held")


Exit = Callable[[Harness, ClaimedRun], Awaitable[Any]]


def _claimed_status(status: RunStatus) -> Exit:
    return lambda h, c: h.storage.update_claimed_run_status(c.run.id, c.lease_id, status)


def _status(status: RunStatus) -> Exit:
    return lambda h, c: h.storage.update_run_status(c.run.id, status)


async def _wait_with_event_buffered(h: Harness, c: ClaimedRun) -> bool:
    await h.storage.deliver_event(c.run.id, "ev", 1)
    return await h.storage.wait_run(c.run.id, c.lease_id, "ev", None)


async def _requeue(h: Harness, c: ClaimedRun) -> bool:
    ok = await h.storage.update_claimed_run_status(c.run.id, c.lease_id, RunStatus.FAILED)
    expect(ok, True, "update_claimed_run_status(failed) before requeue")
    return await h.storage.requeue_run(c.run.id)


EXITS: dict[str, tuple[Exit, RunStatus]] = {
    "sleep_run": (
        lambda h, c: h.storage.sleep_run(c.run.id, c.lease_id, h.future()),
        RunStatus.SLEEPING,
    ),
    "wait_run": (
        lambda h, c: h.storage.wait_run(c.run.id, c.lease_id, "ev", h.future()),
        RunStatus.WAITING,
    ),
    "wait_run_event_buffered": (_wait_with_event_buffered, RunStatus.PENDING),
    "wait_run_no_deadline": (
        lambda h, c: h.storage.wait_run(c.run.id, c.lease_id, "ev", None),
        RunStatus.WAITING,
    ),
    **{
        f"update_claimed_{s.value}": (_claimed_status(s), s)
        for s in RunStatus
        if s is not RunStatus.RUNNING
    },
    **{
        f"update_run_status_{s.value}": (_status(s), s)
        for s in RunStatus
        if s is not RunStatus.RUNNING
    },
    "update_run_status_expected": (
        lambda h, c: h.storage.update_run_status(
            c.run.id, RunStatus.CANCELLED, expected=[RunStatus.RUNNING]
        ),
        RunStatus.CANCELLED,
    ),
    "requeue_run": (_requeue, RunStatus.PENDING),
}
"""Every write that moves a running run out of running, and the status it leads to."""


def _exit_case(name: str, exit: Exit, status: RunStatus) -> None:
    @case(
        f"lease_fields.cleared_by_{name}",
        f"{name.replace('_', ' ')} moves the run to {status.value} and clears claimed_at, "
        "lease_ms, lease_expires_at and holder; heartbeat_at keeps its last value.",
    )
    async def cleared(h: Harness) -> None:
        claimed = await h.created_and_claimed(holder=HOLDER)
        h.advance(1_000)
        expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "heartbeat")
        beat = h.now()
        h.advance(1_000)
        expect(await exit(h, claimed), True, name)
        expect((await h.get(claimed.run.id)).status, status, f"status after {name}")
        await expect_cleared(h, claimed.run.id, beat, name)


for _name, (_exit, _status_after) in EXITS.items():
    _exit_case(_name, _exit, _status_after)
