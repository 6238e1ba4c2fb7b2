"""Claiming: which run claim_next_run picks, and what a claim writes."""

from __future__ import annotations

from collections.abc import Callable, Collection

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, expect
from reflow_core.types import RunStatus


@case("claim.marks_running_with_lease")
async def marks_running_with_lease(h: Harness) -> None:
    """A claim sets running, a non-empty lease, attempt 1 and heartbeat_at."""
    run = await h.create("wf", {"x": 1})
    before = h.now()
    claimed = await h.claim(run.id)
    expect(type(claimed.lease_id) is str and claimed.lease_id != "", True, "a non-empty lease")
    for label, seen in (("returned", claimed.run), ("stored", await h.get(run.id))):
        expect(seen.status, RunStatus.RUNNING, f"{label} status after a claim")
        expect(seen.attempt, 1, f"{label} attempt after the first claim")
        expect(
            seen.heartbeat_at is not None and seen.heartbeat_at >= before - 1_000,
            True,
            f"{label} heartbeat_at set to the claim time (got {seen.heartbeat_at})",
        )
    expect(claimed.run.input, {"x": 1}, "claimed run input")


@case("claim.not_twice")
async def not_twice(h: Harness) -> None:
    """A claimed run is not claimed again (no stale_before)."""
    await h.created_and_claimed()
    expect(await h.storage.claim_next_run(["wf"]), None, "second claim")


@case("claim.only_named_workflows")
async def only_named_workflows(h: Harness) -> None:
    """Runs of other workflows are not claimed."""
    run = await h.create("other")
    expect(await h.storage.claim_next_run(["wf"]), None, "claim of ['wf'] with only 'other'")
    await h.claim(run.id, ["other"])


@case("claim.empty_names_claims_nothing")
async def empty_names_claims_nothing(h: Harness) -> None:
    """An empty workflow-name list claims nothing, even with stale_before."""
    run = await h.create("wf")
    expect(await h.storage.claim_next_run([], h.future()), None, "claim_next_run([])")
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
    for _ in range(3):
        leases.append((await h.claim(run.id, ["again"], h.future())).lease_id)
    expect(len(set(leases)), len(leases), f"distinct leases among {leases}")


@case("claim.stale_reclaim")
async def stale_reclaim(h: Harness) -> None:
    """A running run whose heartbeat is before stale_before is reclaimed with a new lease."""
    first = await h.created_and_claimed()
    second = await h.claim(first.run.id, stale_before=h.future())
    expect(second.lease_id != first.lease_id, True, "a new lease on reclaim")
    expect(second.run.attempt, 2, "attempt after a reclaim")
    expect((await h.get(first.run.id)).attempt, 2, "stored attempt after a reclaim")


@case("claim.live_run_not_reclaimed")
async def live_run_not_reclaimed(h: Harness) -> None:
    """A running run with a recent heartbeat is not reclaimed (stale_before in the past)."""
    await h.created_and_claimed()
    expect(await h.storage.claim_next_run(["wf"], h.past()), None, "claim of a live run")


@case("claim.stale_is_strictly_before")
async def stale_is_strictly_before(h: Harness) -> None:
    """stale_before equal to heartbeat_at does not make the run stale (strictly before)."""
    claimed = await h.created_and_claimed()
    beat = (await h.get(claimed.run.id)).heartbeat_at
    assert beat is not None
    expect(await h.storage.claim_next_run(["wf"], beat), None, "claim with stale_before == beat")
    await h.claim(claimed.run.id, stale_before=beat + 1)


@case("claim.terminal_never_claimed")
async def terminal_never_claimed(h: Harness) -> None:
    """Completed, failed and cancelled runs are never claimed, even with stale_before."""
    for status in (RunStatus.COMPLETED, RunStatus.FAILED):
        claimed = await h.created_and_claimed()
        await h.storage.update_claimed_run_status(claimed.run.id, claimed.lease_id, status)
    run = await h.create("wf")
    await h.storage.update_run_status(run.id, RunStatus.CANCELLED)
    expect(await h.storage.claim_next_run(["wf"], h.future()), None, "claim of terminal runs")


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
    """A sleeping run is not claimable before wake_at, even with stale_before."""
    claimed = await h.created_and_claimed()
    await h.storage.sleep_run(claimed.run.id, claimed.lease_id, h.future())
    expect(await h.storage.claim_next_run(["wf"], h.future()), None, "claim of a sleeper")
    expect((await h.get(claimed.run.id)).wake_at is not None, True, "wake_at stored")


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
    expect(await h.storage.claim_next_run(["wf"], h.future()), None, "claim of a waiter")


@case("claim.waiting_before_deadline")
async def waiting_before_deadline(h: Harness) -> None:
    """A run waiting with a future deadline is not claimable yet."""
    claimed = await h.created_and_claimed()
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "go", h.future())
    expect(await h.storage.claim_next_run(["wf"], h.future()), None, "claim of a waiter")


@case("claim.none_when_empty")
async def none_when_empty(h: Harness) -> None:
    """An empty store claims nothing."""
    expect(await h.storage.claim_next_run(["wf"], h.future()), None, "claim on an empty store")


@case("claim.mixed_workflows_oldest_of_named")
async def mixed_workflows(h: Harness) -> None:
    """With several names, the oldest run among all named workflows is claimed first."""
    b = await h.create("b", created_at=1)
    a = await h.create("a", created_at=2)
    await h.create("c", created_at=0)
    await h.claim(b.id, ["a", "b"])
    await h.claim(a.id, ["a", "b"])
    expect(await h.storage.claim_next_run(["a", "b"]), None, "claim after both")
