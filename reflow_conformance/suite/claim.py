"""Claiming: which run claim_next_run picks, and what a claim writes."""

from __future__ import annotations

from collections.abc import Callable, Collection

from reflow_conformance.cases import case
from reflow_conformance.harness import FAR, KIT_HOLDER, LEASE_MS, Harness, expect
from reflow_core.types import RunStatus


@case("claim.marks_running_with_lease")
async def marks_running_with_lease(h: Harness) -> None:
    """A claim sets running, a non-empty lease, attempt 1, and claimed_at = heartbeat_at =
    the store's now, lease_ms and lease_expires_at = now + lease_ms, the holder given."""
    run = await h.create("wf", {"x": 1})
    now = h.now()
    claimed = await h.claim(run.id, lease_ms=12_345)
    expect(type(claimed.lease_id) is str and claimed.lease_id != "", True, "a non-empty lease")
    for label, seen in (("returned", claimed.run), ("stored", await h.get(run.id))):
        expect(seen.status, RunStatus.RUNNING, f"{label} status after a claim")
        expect(seen.attempt, 1, f"{label} attempt after the first claim")
        expect(
            (seen.claimed_at, seen.heartbeat_at, seen.lease_ms, seen.lease_expires_at),
            (now, now, 12_345, now + 12_345),
            f"{label} (claimed_at, heartbeat_at, lease_ms, lease_expires_at) of a claim at {now}",
        )
        expect(seen.holder, KIT_HOLDER, f"{label} holder")
        expect(seen.recoveries, 0, f"{label} recoveries after claiming a pending run")
    expect(claimed.run.input, {"x": 1}, "claimed run input")


@case("claim.not_twice")
async def not_twice(h: Harness) -> None:
    """A claimed run is not claimed again while its lease lasts."""
    await h.created_and_claimed()
    expect(await h.claim_any(["wf"]), None, "second claim")


@case("claim.only_named_workflows")
async def only_named_workflows(h: Harness) -> None:
    """Runs of other workflows are not claimed."""
    run = await h.create("other")
    expect(await h.claim_any(["wf"]), None, "claim of ['wf'] with only 'other'")
    await h.claim(run.id, ["other"])


@case("claim.empty_names_claims_nothing")
async def empty_names_claims_nothing(h: Harness) -> None:
    """An empty workflow-name list claims nothing, not even a run whose lease expired."""
    stale = await h.created_and_claimed()
    run = await h.create("wf")
    await h.expire(stale.run.id)
    expect(await h.claim_any([]), None, "claim_next_run([])")
    expect((await h.get(run.id)).status, RunStatus.PENDING, "run left pending")


@case("claim.huge_name_list")
async def huge_name_list(h: Harness) -> None:
    """10,000 workflow names (beyond SQL parameter limits) work; the match is the last."""
    run = await h.create("wf-9999")
    names = [f"wf-{i}" for i in range(10_000)]
    await h.claim(run.id, names)


@case("claim.name_collection_types")
async def name_collection_types(h: Harness) -> None:
    """Any Collection of names works: list, tuple, set, frozenset, dict keys."""
    forms: list[Callable[[list[str]], Collection[str]]] = [
        list,
        tuple,
        set,
        frozenset,
        lambda names: dict.fromkeys(names).keys(),
    ]
    for index, form in enumerate(forms):
        run = await h.create(f"w{index}")
        await h.claim(run.id, form([f"w{index}", "nothing"]))


@case("claim.oldest_first")
async def oldest_first(h: Harness) -> None:
    """Runs are claimed by lowest created_at, whatever the insertion order."""
    ids = {}
    for created in (3_000, 1_000, 2_000):
        ids[created] = (await h.create("wf", created_at=created)).id
    for created in (1_000, 2_000, 3_000):
        await h.claim(ids[created])


@case("claim.ties_broken_by_id")
async def ties_broken_by_id(h: Harness) -> None:
    """Equal created_at: lowest id first."""
    for run_id in ("run-b", "run-c", "run-a"):
        await h.create("wf", id=run_id, created_at=5)
    for run_id in ("run-a", "run-b", "run-c"):
        await h.claim(run_id)


@case("claim.oldest_across_statuses")
async def oldest_across_statuses(h: Harness) -> None:
    """Oldest claimable wins whatever its status: a woken sleeper before a newer pending run."""
    old = await h.create("wf", created_at=1)
    claimed = await h.claim(old.id)
    expect(await h.storage.sleep_run(old.id, claimed.lease_id, h.past()), True, "sleep_run")
    await h.create("wf", created_at=2)
    await h.claim(old.id)


@case("claim.unique_leases")
async def unique_leases(h: Harness) -> None:
    """Every claim issues a new lease, also when the same run is reclaimed."""
    leases = []
    for _ in range(5):
        leases.append((await h.created_and_claimed()).lease_id)
    run = await h.create("again")
    leases.append((await h.claim(run.id, ["again"])).lease_id)
    for _ in range(3):
        leases.append((await h.take_over(run.id, ["again"])).lease_id)
    expect(len(set(leases)), len(leases), f"distinct leases among {leases}")


@case("claim.stale_reclaim")
async def stale_reclaim(h: Harness) -> None:
    """A running run whose lease expired is reclaimed with a new lease and attempt 2."""
    first = await h.created_and_claimed()
    second = await h.take_over(first.run.id)
    expect(second.lease_id != first.lease_id, True, "a new lease on reclaim")
    expect(second.run.attempt, 2, "attempt after a reclaim")
    expect((await h.get(first.run.id)).attempt, 2, "stored attempt after a reclaim")


@case("claim.live_run_not_reclaimed")
async def live_run_not_reclaimed(h: Harness) -> None:
    """A running run whose lease has not expired is not reclaimed."""
    await h.created_and_claimed()
    expect(await h.claim_any(["wf"]), None, "claim of a live run")
    h.advance(LEASE_MS // 2)
    expect(await h.claim_any(["wf"]), None, "claim of a live run half-way through its lease")


@case("claim.terminal_never_claimed")
async def terminal_never_claimed(h: Harness) -> None:
    """Completed, failed and cancelled runs are never claimed, however late it is."""
    for status in (RunStatus.COMPLETED, RunStatus.FAILED):
        claimed = await h.created_and_claimed()
        await h.storage.update_claimed_run_status(claimed.run.id, claimed.lease_id, status)
    run = await h.create("wf")
    await h.storage.update_run_status(run.id, RunStatus.CANCELLED)
    h.advance(10 * LEASE_MS)
    expect(await h.claim_any(["wf"]), None, "claim of terminal runs")


@case("claim.sleeping_woken_by_time")
async def sleeping_woken_by_time(h: Harness) -> None:
    """A sleeping run whose wake_at passed is claimed with a new lease; wake_at cleared."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    expect(await h.storage.sleep_run(run_id, claimed.lease_id, h.past()), True, "sleep_run")
    expect((await h.get(run_id)).status, RunStatus.SLEEPING, "status after sleep_run")
    again = await h.claim(run_id)
    expect(again.lease_id != claimed.lease_id, True, "a new lease after waking")
    stored = await h.get(run_id)
    expect((stored.status, stored.wake_at, stored.attempt), (RunStatus.RUNNING, None, 2), "woken")


@case("claim.sleeping_not_before_wake")
async def sleeping_not_before_wake(h: Harness) -> None:
    """A sleeping run is not claimable before wake_at (by the store's clock), at wake_at it is."""
    claimed = await h.created_and_claimed()
    wake = h.now() + 5_000
    await h.storage.sleep_run(claimed.run.id, claimed.lease_id, wake)
    h.advance(4_999)
    expect(await h.claim_any(["wf"]), None, "claim of a sleeper 1 ms before wake_at")
    expect((await h.get(claimed.run.id)).wake_at, wake, "wake_at stored")
    h.advance(1)
    await h.claim(claimed.run.id)


@case("claim.waiting_deadline_passed")
async def waiting_deadline_passed(h: Harness) -> None:
    """A waiting run whose deadline passed is claimable; waiting_for and wake_at cleared."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.wait_run(run_id, claimed.lease_id, "go", h.past())
    await h.claim(run_id)
    stored = await h.get(run_id)
    expect((stored.wake_at, stored.waiting_for), (None, None), "(wake_at, waiting_for)")


@case("claim.waiting_without_deadline_never_by_time")
async def waiting_without_deadline(h: Harness) -> None:
    """A run waiting with no deadline is not claimable until its event arrives."""
    claimed = await h.created_and_claimed()
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "go", None)
    h.advance(FAR)
    expect(await h.claim_any(["wf"]), None, "claim of a waiter")


@case("claim.waiting_before_deadline")
async def waiting_before_deadline(h: Harness) -> None:
    """A run waiting with a deadline is not claimable 1 ms before it, and is at it."""
    claimed = await h.created_and_claimed()
    deadline = h.now() + 7_000
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "go", deadline)
    h.advance(6_999)
    expect(await h.claim_any(["wf"]), None, "claim of a waiter 1 ms before its deadline")
    h.advance(1)
    await h.claim(claimed.run.id)


@case("claim.none_when_empty")
async def none_when_empty(h: Harness) -> None:
    """An empty store claims nothing."""
    expect(await h.claim_any(["wf"]), None, "claim on an empty store")


@case("claim.mixed_workflows_oldest_of_named")
async def mixed_workflows(h: Harness) -> None:
    """With several names, the oldest run among all named workflows is claimed first."""
    b = await h.create("b", created_at=1)
    a = await h.create("a", created_at=2)
    await h.create("c", created_at=0)
    await h.claim(b.id, ["a", "b"])
    await h.claim(a.id, ["a", "b"])
    expect(await h.claim_any(["a", "b"]), None, "claim after both")
