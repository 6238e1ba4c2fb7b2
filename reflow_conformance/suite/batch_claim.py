"""Batch claims (contract 2.1): ``claim_runs`` takes up to ``limit`` runs in one call,
each exactly as ``claim_next_run`` would, oldest first, and never one run twice."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import FAR, KIT_HOLDER, LEASE_MS, ContractViolation, Harness, expect
from reflow_core.errors import ConfigError
from reflow_core.registry import Capability
from reflow_core.storage import StorageAdapter
from reflow_core.types import ClaimedRun, LeaseHolder, RunStatus

RACERS = 6
RUNS = 60
BATCH = 4


async def _claim_runs(
    h: Harness,
    names: Collection[str] = ("wf",),
    *,
    limit: int,
    lease_ms: int = LEASE_MS,
    holder: LeaseHolder | None = KIT_HOLDER,
    storage: StorageAdapter | None = None,
) -> list[ClaimedRun]:
    __tracebackhide__ = True
    got = await (storage or h.storage).claim_runs(
        names, lease_ms=lease_ms, holder=holder, limit=limit
    )
    if not isinstance(got, list) or not all(isinstance(c, ClaimedRun) for c in got):
        raise ContractViolation(
            f"claim_runs({list(names)!r}, limit={limit}) answer", "a list of ClaimedRun", got
        )
    return got


def _ids(claimed: list[ClaimedRun]) -> list[str]:
    return [c.run.id for c in claimed]


@case("batch_claim.oldest_first_up_to_limit")
async def oldest_first_up_to_limit(h: Harness) -> None:
    """Up to ``limit`` runs by lowest (created_at, id), whatever the insertion order; the
    rest on the next call; ``[]`` once none is claimable."""
    order = [5_000, 1_000, 4_000, 2_000, 3_000]
    ids = {created: (await h.create("wf", created_at=created)).id for created in order}
    oldest = [ids[c] for c in sorted(order)]
    expect(_ids(await _claim_runs(h, limit=3)), oldest[:3], "claim_runs(limit=3)")
    expect(_ids(await _claim_runs(h, limit=10)), oldest[3:], "claim_runs(limit=10) of 2 left")
    expect(await _claim_runs(h, limit=10), [], "claim_runs with nothing claimable")


@case("batch_claim.ties_broken_by_id")
async def ties_broken_by_id(h: Harness) -> None:
    """Equal created_at: lowest id first, by code point."""
    for run_id in ("run-b", "run-\u00e9", "run-a", "run-B"):
        await h.create("wf", id=run_id, created_at=5)
    got = _ids(await _claim_runs(h, limit=4))
    expect(got, ["run-B", "run-a", "run-b", "run-\u00e9"], "claim order of equal created_at")


@case("batch_claim.fields_as_claim_next_run")
async def fields_as_claim_next_run(h: Harness) -> None:
    """Every run of a batch is running with its own new lease, attempt 1, claimed_at =
    heartbeat_at = now, lease_ms, lease_expires_at = now + lease_ms and the holder; the
    stored run equals the returned one, and each lease is held."""
    for index in range(3):
        await h.create("wf", {"i": index})
    now = h.now()
    claimed = await _claim_runs(h, limit=3, lease_ms=12_345)
    expect(len(claimed), 3, "runs claimed")
    leases = [c.lease_id for c in claimed]
    expect(all(type(x) is str and x != "" for x in leases), True, f"non-empty leases {leases}")
    expect(len(set(leases)), 3, f"distinct leases {leases}")
    for index, item in enumerate(claimed):
        for label, seen in (("returned", item.run), ("stored", await h.get(item.run.id))):
            what = f"{label} run {index} of the batch"
            expect(seen.status, RunStatus.RUNNING, f"{what}: status")
            expect((seen.attempt, seen.recoveries), (1, 0), f"{what}: (attempt, recoveries)")
            expect(
                (seen.claimed_at, seen.heartbeat_at, seen.lease_ms, seen.lease_expires_at),
                (now, now, 12_345, now + 12_345),
                f"{what}: (claimed_at, heartbeat_at, lease_ms, lease_expires_at) at {now}",
            )
            expect(seen.holder, KIT_HOLDER, f"{what}: holder")
        expect(item.run.input, {"i": index}, f"input of run {index}")
        expect(item.run, await h.get(item.run.id), f"returned run {index} equals stored")
        ok = await h.storage.heartbeat_run(item.run.id, item.lease_id)
        expect(ok, True, f"heartbeat_run with the lease of run {index}")


@case("batch_claim.recoveries_and_wake_ups")
async def recoveries_and_wake_ups(h: Harness) -> None:
    """A batch takes expired leases (recoveries + 1), due sleepers and waiters (wake
    fields cleared) and pending runs alike, oldest first; it leaves live leases, future
    wake-ups, waiters without a deadline and finished runs."""
    expired = await h.created_and_claimed()
    sleeper = await h.created_and_claimed()
    waiter = await h.created_and_claimed()
    live = await h.created_and_claimed(lease_ms=10 * LEASE_MS)
    asleep = await h.created_and_claimed()
    forever = await h.created_and_claimed()
    done = await h.created_and_claimed()
    pending = await h.create("wf")
    await h.storage.sleep_run(sleeper.run.id, sleeper.lease_id, h.now() + 10)
    await h.storage.wait_run(waiter.run.id, waiter.lease_id, "go", h.now() + 10)
    await h.storage.sleep_run(asleep.run.id, asleep.lease_id, h.future())
    await h.storage.wait_run(forever.run.id, forever.lease_id, "go", None)
    await h.storage.update_claimed_run_status(done.run.id, done.lease_id, RunStatus.COMPLETED)
    await h.expire(expired.run.id)
    h.advance(10)
    got = await _claim_runs(h, limit=10)
    want = [expired.run.id, sleeper.run.id, waiter.run.id, pending.id]
    expect(_ids(got), want, "claim_runs over every kind of claimable run")
    by_id = {c.run.id: c.run for c in got}
    expect(
        (by_id[expired.run.id].recoveries, by_id[expired.run.id].attempt),
        (1, 2),
        "(recoveries, attempt) of a run taken over from an expired lease",
    )
    for run_id in (sleeper.run.id, waiter.run.id):
        seen = by_id[run_id]
        expect(
            (seen.wake_at, seen.waiting_for, seen.recoveries, seen.attempt),
            (None, None, 0, 2),
            "(wake_at, waiting_for, recoveries, attempt) of a woken run",
        )
    expect((await h.get(live.run.id)).attempt, 1, "the run whose lease is live stays as it was")
    h.advance(LEASE_MS // 2)
    expect(await _claim_runs(h, limit=10), [], "claim_runs with only unclaimable runs left")


@case("batch_claim.only_named_workflows")
async def only_named_workflows(h: Harness) -> None:
    """Only runs of the named workflows are taken, merged across them by (created_at, id);
    a name given twice takes no run twice; the other workflows' runs stay pending."""
    a1 = await h.create("a", created_at=1)
    b2 = await h.create("b", created_at=2)
    other = await h.create("other", created_at=0)
    a3 = await h.create("a", created_at=3)
    b4 = await h.create("b", created_at=4)
    got = await _claim_runs(h, ["b", "a", "b", "absent"], limit=3)
    expect(_ids(got), [a1.id, b2.id, a3.id], "claim_runs(['b', 'a', 'b', 'absent'], limit=3)")
    expect(_ids(await _claim_runs(h, ["a", "b"], limit=5)), [b4.id], "the next batch")
    expect((await h.get(other.id)).status, RunStatus.PENDING, "the other workflow's run")


@case("batch_claim.empty_names_claims_nothing")
async def empty_names_claims_nothing(h: Harness) -> None:
    """An empty name list claims nothing, even with runs of every kind claimable."""
    stale = await h.created_and_claimed()
    run = await h.create("wf")
    await h.expire(stale.run.id)
    before = await h.snapshot([stale.run.id, run.id])
    expect(await _claim_runs(h, [], limit=5), [], "claim_runs([])")
    await h.expect_unchanged(before, [stale.run.id, run.id], "after claim_runs([])")


@case("batch_claim.huge_name_list")
async def huge_name_list(h: Harness) -> None:
    """10,000 workflow names work; matches in several of them come back oldest first."""
    last = await h.create("wf-9999", created_at=1)
    first = await h.create("wf-0", created_at=2)
    names = [f"wf-{i}" for i in range(10_000)]
    expect(_ids(await _claim_runs(h, names, limit=5)), [last.id, first.id], "claimed")


@case("batch_claim.limit_below_one_refused")
async def limit_below_one_refused(h: Harness) -> None:
    """``limit`` 0, negative, a bool or not an int raises ConfigError and claims nothing."""
    run = await h.create("wf")
    bad: list[Any] = [0, -1, True, 2.0, "3", None]
    for limit in bad:
        before = await h.snapshot([run.id])
        try:
            await h.storage.claim_runs(["wf"], lease_ms=LEASE_MS, holder=KIT_HOLDER, limit=limit)
        except ConfigError:
            pass
        except Exception as exc:
            raise ContractViolation(
                f"claim_runs(limit={limit!r})", "ConfigError", f"{type(exc).__name__}: {exc}"
            ) from exc
        else:
            raise ContractViolation(f"claim_runs(limit={limit!r})", "ConfigError", "no error")
        await h.expect_unchanged(before, [run.id], f"after claim_runs(limit={limit!r})")
    await h.claim(run.id)


@case("batch_claim.limit_one_matches_claim_next_run")
async def limit_one_matches_claim_next_run(h: Harness) -> None:
    """Alternating claim_runs(limit=1) and claim_next_run takes the runs in one order."""
    ids = [(await h.create("wf", created_at=100 - i)).id for i in range(6)]
    got = []
    for turn in range(6):
        if turn % 2:
            one = await h.claim_any(["wf"])
            got.append(one.run.id if one else None)
        else:
            got.extend(_ids(await _claim_runs(h, limit=1)))
    expect(got, list(reversed(ids)), "claim order")
    expect(await _claim_runs(h, limit=1), [], "claim_runs(limit=1) with nothing left")


async def _batch_race(h: Harness, mode: str) -> None:
    runs = {(await h.create("wf", i, created_at=h.now() - FAR + i)).id for i in range(RUNS)}

    async def claim_all(storage: StorageAdapter, racer: int) -> list[tuple[str, str]]:
        taken: list[tuple[str, str]] = []
        while len(taken) <= 2 * RUNS:  # bounded: a store handing runs out twice must fail
            if racer == 0:  # one racer claims one at a time, the others in batches
                one = await storage.claim_next_run(["wf"], lease_ms=LEASE_MS)
                batch = [] if one is None else [one]
            else:
                batch = await storage.claim_runs(["wf"], lease_ms=LEASE_MS, limit=BATCH)
            if not batch:
                break
            expect(len(batch) <= BATCH, True, f"a batch of at most {BATCH}: {len(batch)}")
            taken.extend((c.run.id, c.lease_id) for c in batch)
        return taken

    if mode == "threads":
        results = await h.race_threads(RACERS, claim_all)
    else:
        results = await h.race_coroutines(RACERS, claim_all)
    ids = [run_id for batch in results for run_id, _ in batch]
    leases = [lease for batch in results for _, lease in batch]
    expect(sorted({i for i in ids if ids.count(i) > 1}), [], "runs claimed by two racers")
    expect(sorted(runs - set(ids)), [], "runs no racer claimed (lost)")
    expect(len(set(leases)), len(leases), "distinct leases")
    for run_id in runs:
        expect((await h.get(run_id)).attempt, 1, f"attempt of {run_id}: claimed once")


@case(
    "batch_claim.concurrent_callers_coroutines",
    "Racing coroutines on one handle, claiming in batches (and one by one), never get "
    "the same run, and none is lost",
    race=True,
)
async def concurrent_callers_coroutines(h: Harness) -> None:
    await _batch_race(h, "coroutines")


@case(
    "batch_claim.concurrent_callers_threads",
    "Racing threads with a handle each, claiming in batches (and one by one), never get "
    "the same run, and none is lost",
    requires=[Capability.THREADS],
    race=True,
)
async def concurrent_callers_threads(h: Harness) -> None:
    await _batch_race(h, "threads")
