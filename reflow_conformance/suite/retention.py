"""Retention (contract 2.1): ``purge_runs`` deletes finished runs older than a cutoff,
completely, oldest first, in bounded batches, and never a run that has not finished."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import FAR, ContractViolation, Harness, expect
from reflow_core.errors import ConfigError
from reflow_core.registry import Capability
from reflow_core.storage import StorageAdapter
from reflow_core.types import RunFilter, RunStatus, StepStatus

RACERS = 5
FINISHED = 30
BATCH = 3

_FINISHERS = {
    RunStatus.COMPLETED: "update_claimed_run_status(completed)",
    RunStatus.FAILED: "update_claimed_run_status(failed)",
    RunStatus.CANCELLED: "update_run_status(cancelled)",
}


async def _purge(
    h: Harness,
    finished_before: int,
    limit: int,
    statuses: Collection[RunStatus] | None = None,
    storage: StorageAdapter | None = None,
) -> int:
    __tracebackhide__ = True
    got = await (storage or h.storage).purge_runs(
        finished_before=finished_before, limit=limit, statuses=statuses
    )
    if type(got) is not int:
        raise ContractViolation("purge_runs(...) answer", "an int", got)
    return got


async def _finished(
    h: Harness, status: RunStatus = RunStatus.COMPLETED, workflow: str = "wf", **kw: Any
) -> str:
    """A run of ``workflow`` ended in ``status`` at the store's now (its updated_at)."""
    __tracebackhide__ = True
    run = await h.create(workflow, **kw)
    if status is RunStatus.CANCELLED:
        ok = await h.storage.update_run_status(run.id, status)
    else:
        claimed = await h.claim(run.id, (workflow,))
        ok = await h.storage.update_claimed_run_status(run.id, claimed.lease_id, status)
    expect(ok, True, _FINISHERS[status])
    expect((await h.get(run.id)).updated_at, h.now(), f"updated_at of a run {status.value}")
    return run.id


async def _stored(h: Harness, run_ids: Collection[str]) -> list[Any]:
    """What is stored for these runs alone (a snapshot without the listing, which a purge
    of other runs changes)."""
    return [
        (await h.storage.get_run(run_id), await h.storage.get_step_results(run_id))
        for run_id in run_ids
    ]


async def _gone(h: Harness, run_id: str, what: str) -> None:
    __tracebackhide__ = True
    expect(await h.storage.get_run(run_id), None, f"get_run of {what}")
    expect(await h.storage.get_step_results(run_id), [], f"get_step_results of {what}")
    listed = [r.id for r in await h.storage.list_runs(RunFilter(limit=10_000))]
    expect(run_id in listed, False, f"{what} listed by list_runs")


@case("retention.never_touches_unfinished_runs")
async def never_touches_unfinished_runs(h: Harness) -> None:
    """Pending, running (live or expired), sleeping and waiting runs (with or without a
    deadline, due or not), however old, are never purged, whatever the cutoff."""
    live = await h.created_and_claimed()
    expired = await h.created_and_claimed(lease_ms=10)
    asleep = await h.created_and_claimed()
    due = await h.created_and_claimed()
    waiting = await h.created_and_claimed()
    forever = await h.created_and_claimed()
    await h.storage.sleep_run(asleep.run.id, asleep.lease_id, h.future())
    await h.storage.sleep_run(due.run.id, due.lease_id, h.now() + 1)
    await h.storage.wait_run(waiting.run.id, waiting.lease_id, "go", h.now() + 1)
    await h.storage.wait_run(forever.run.id, forever.lease_id, "go", None)
    ids = [c.run.id for c in (live, expired, asleep, due, waiting, forever)]
    ids.append((await h.create("wf")).id)  # created last: the claims above took no other
    for run_id in ids:
        await h.storage.save_step_result(h.step(run_id, "s"))
        await h.storage.deliver_event(run_id, "ev", "kept", key="k")
    h.advance(1_000)
    before = await h.snapshot(ids)
    expect(await _purge(h, h.future(), 1_000), 0, "purge_runs with only unfinished runs")
    await h.expect_unchanged(before, ids, "after purge_runs over unfinished runs")
    for run_id in ids:
        record = await h.storage.take_event(run_id, "ev")
        expect(record.payload if record else None, "kept", f"event buffered for {run_id}")


@case("retention.deletes_completely")
async def deletes_completely(h: Harness) -> None:
    """A purged run is gone with its step rows, buffered events and event keys; its
    idempotency key is free again; a run created later with the same id starts empty.
    Runs newer than the cutoff keep everything."""
    run_id = (await h.create("wf", {"big": "input"}, idempotency_key="once")).id
    claimed = await h.claim(run_id)
    for name in ("a", "b"):
        row = h.step(run_id, name, output=name)
        expect(await h.storage.save_step_result(row, claimed.lease_id), True, f"step {name}")
    expect(await h.storage.deliver_event(run_id, "ev", "never taken", key="k1"), True, "event")
    ok = await h.storage.update_claimed_run_status(
        run_id, claimed.lease_id, RunStatus.COMPLETED, output={"out": 1}
    )
    expect(ok, True, "complete the run")
    h.advance(1)
    kept = await _finished(h)
    await h.storage.save_step_result(h.step(kept, "a", StepStatus.FAILED))
    kept_before = await _stored(h, [kept])
    expect(await _purge(h, h.now(), 10), 1, "purge_runs of the one older finished run")
    await _gone(h, run_id, "a purged run")
    expect(await _stored(h, [kept]), kept_before, "run and steps newer than the cutoff")
    again = await h.storage.create_run(h.new_run("wf", idempotency_key="once"))
    expect(again.created, True, "create_run with the idempotency key of a purged run")
    expect(again.run.id != run_id, True, "a new run for the freed key")
    reborn = await h.create("other", id=run_id)
    expect(await h.storage.get_step_results(reborn.id), [], "steps of a new run with the id")
    expect(await h.storage.take_event(run_id, "ev"), None, "events of a new run with the id")
    expect(await h.storage.deliver_event(run_id, "ev", "fresh", key="k1"), True, "reuse key k1")
    record = await h.storage.take_event(run_id, "ev")
    expect(record.payload if record else None, "fresh", "a delivery with a purged run's key")


@case("retention.cutoff_is_strict")
async def cutoff_is_strict(h: Harness) -> None:
    """Only ``updated_at < finished_before`` goes: a run that finished at the cutoff stays."""
    run_id = await _finished(h)
    at = h.now()
    expect(await _purge(h, at, 10), 0, "purge_runs(finished_before=updated_at)")
    expect((await h.get(run_id)).status, RunStatus.COMPLETED, "the run finished at the cutoff")
    expect(await _purge(h, at + 1, 10), 1, "purge_runs(finished_before=updated_at + 1)")
    await _gone(h, run_id, "the purged run")


@case("retention.oldest_first_in_bounded_batches")
async def oldest_first_in_bounded_batches(h: Harness) -> None:
    """Each call deletes at most ``limit`` runs, the oldest by (updated_at, id) first,
    whatever their creation order; callers loop until the answer is 0."""
    finished = []
    for index in range(5):
        created = 10_000 - index  # created newest first, finished oldest first
        finished.append(await _finished(h, created_at=created))
        h.advance(10)
    tied = [await _finished(h, id=f"tie-{c}") for c in "ba"]  # equal updated_at
    order = finished + sorted(tied)
    cutoff = h.now() + 1
    remaining = list(order)
    for batch in (2, 2, 2, 1):
        expect(await _purge(h, cutoff, 2), batch, f"purge_runs(limit=2) with {len(remaining)}")
        for run_id in remaining[:batch]:
            await _gone(h, run_id, f"run {order.index(run_id)} in finishing order")
        for run_id in remaining[batch:]:
            expect((await h.get(run_id)).id, run_id, "a newer run left for the next batch")
        remaining = remaining[batch:]
    expect(await _purge(h, cutoff, 2), 0, "purge_runs once all are gone")


@case("retention.statuses_narrow_the_purge")
async def statuses_narrow_the_purge(h: Harness) -> None:
    """``statuses`` limits the purge to those finished statuses (RunStatus or its string
    value); an empty collection purges nothing; ``None`` means all three."""
    ids = {status: await _finished(h, status) for status in _FINISHERS}
    cutoff = h.now() + 1
    expect(await _purge(h, cutoff, 10, []), 0, "purge_runs(statuses=[])")
    expect(await _purge(h, cutoff, 10, [RunStatus.FAILED]), 1, "purge_runs(statuses=[failed])")
    await _gone(h, ids[RunStatus.FAILED], "the failed run")
    for status in (RunStatus.COMPLETED, RunStatus.CANCELLED):
        expect((await h.get(ids[status])).status, status, f"the {status.value} run is kept")
    narrowed: Any = ("cancelled",)
    expect(await _purge(h, cutoff, 10, narrowed), 1, "purge_runs(statuses=('cancelled',))")
    await _gone(h, ids[RunStatus.CANCELLED], "the cancelled run")
    expect(await _purge(h, cutoff, 10, None), 1, "purge_runs(statuses=None)")
    await _gone(h, ids[RunStatus.COMPLETED], "the completed run")


@case("retention.bad_arguments_refused")
async def bad_arguments_refused(h: Harness) -> None:
    """A limit below 1 (or not an int), a status that has not finished (or is no status,
    or a bare string) and a cutoff that is not an int raise ConfigError, deleting nothing."""
    run_id = await _finished(h)
    cutoff = h.future()
    bad: list[tuple[str, dict[str, Any]]] = [
        ("limit=0", {"finished_before": cutoff, "limit": 0}),
        ("limit=-5", {"finished_before": cutoff, "limit": -5}),
        ("limit=True", {"finished_before": cutoff, "limit": True}),
        ("limit=1.5", {"finished_before": cutoff, "limit": 1.5}),
        ("finished_before=None", {"finished_before": None, "limit": 5}),
        ("finished_before='1'", {"finished_before": "1", "limit": 5}),
    ]
    for status in ("pending", "running", "sleeping", "waiting"):
        bad.append((f"statuses=[{status!r}, 'completed']", {"statuses": [status, "completed"]}))
        bad.append((f"statuses=[RunStatus.{status.upper()}]", {"statuses": [RunStatus(status)]}))
    bad.append(("statuses=['finished']", {"statuses": ["finished"]}))
    bad.append(("statuses='completed'", {"statuses": "completed"}))
    for label, given in bad:
        kwargs = {"finished_before": cutoff, "limit": 5, **given}
        before = await h.snapshot([run_id])
        try:
            await h.storage.purge_runs(**kwargs)
        except ConfigError:
            pass
        except Exception as exc:
            raise ContractViolation(
                f"purge_runs({label})", "ConfigError", f"{type(exc).__name__}: {exc}"
            ) from exc
        else:
            raise ContractViolation(f"purge_runs({label})", "ConfigError", "no error")
        await h.expect_unchanged(before, [run_id], f"after purge_runs({label})")


@case("retention.requeued_run_is_not_purged")
async def requeued_run_is_not_purged(h: Harness) -> None:
    """A failed run requeued before the purge is pending again and is kept, steps and
    all; schedules are never touched."""
    run_id = await _finished(h, RunStatus.FAILED)
    await h.storage.save_step_result(h.step(run_id, "done"))
    await h.storage.upsert_schedule(h.schedule("nightly"))
    expect(await h.storage.requeue_run(run_id), True, "requeue_run")
    before = await h.snapshot([run_id])
    expect(await _purge(h, h.future(), 10), 0, "purge_runs after the requeue")
    await h.expect_unchanged(before, [run_id], "after purge_runs of a requeued run")


async def _purge_race(h: Harness, mode: str) -> None:
    base = h.now()
    finished = [await _finished(h, workflow=f"wf-{i % 3}") for i in range(FINISHED)]
    alive = [(await h.create("wf", created_at=base - FAR)).id for _ in range(3)]
    before = await _stored(h, alive)

    async def purge_all(storage: StorageAdapter, _: int) -> list[int]:
        counts: list[int] = []
        while len(counts) <= FINISHED:  # bounded: a purge that never ends must fail
            count = await storage.purge_runs(finished_before=base + 1, limit=BATCH)
            expect(0 <= count <= BATCH, True, f"a batch of at most {BATCH} runs: {count}")
            if count == 0:
                break
            counts.append(count)
        return counts

    if mode == "threads":
        results = await h.race_threads(RACERS, purge_all)
    else:
        results = await h.race_coroutines(RACERS, purge_all)
    expect(sum(sum(counts) for counts in results), FINISHED, f"runs purged by {results}")
    for run_id in finished:
        expect(await h.storage.get_run(run_id), None, f"get_run({run_id!r}) after the purge")
    expect(await _stored(h, alive), before, "pending runs after racing purges")


@case(
    "retention.concurrent_purges_coroutines",
    "Racing purges on one handle delete each finished run once, and only those",
    race=True,
)
async def concurrent_purges_coroutines(h: Harness) -> None:
    await _purge_race(h, "coroutines")


@case(
    "retention.concurrent_purges_threads",
    "Racing purges, a handle per thread, delete each finished run once, and only those",
    requires=[Capability.THREADS],
    race=True,
)
async def concurrent_purges_threads(h: Harness) -> None:
    await _purge_race(h, "threads")
