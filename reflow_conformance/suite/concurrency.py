"""Concurrency: real races, released together by a barrier — never timed with sleeps.

Each scenario runs in up to three modes:

* ``coroutines`` — many coroutines on the one handle (``asyncio.gather``). Applies to
  every adapter, including ``memory``, which declares neither threads nor processes:
  for it this is the only race there is, and it proves that no ``await`` splits a
  check from its write.
* ``threads`` — one OS thread, event loop and handle per racer (capability ``threads``).
* ``processes`` — spawned processes, each opening ``open_storage(url)``
  (capability ``cross-process``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
from collections.abc import Awaitable, Callable
from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import ContractViolation, Harness, HarnessError, expect
from reflow_conformance.suite.leases import expect_all_refused
from reflow_core.registry import Capability
from reflow_core.storage import StorageAdapter, system_clock
from reflow_core.types import RunFilter, RunStatus

RACERS = 6
RUNS = 40
MODES: dict[str, frozenset[Capability]] = {
    "coroutines": frozenset(),
    "threads": frozenset({Capability.THREADS}),
}

Racer = Callable[[StorageAdapter, int], Awaitable[Any]]


async def _race(h: Harness, mode: str, fn: Racer) -> list[Any]:
    if mode == "threads":
        return await h.race_threads(RACERS, fn)
    return await h.race_coroutines(RACERS, fn)


async def _claim_all(storage: StorageAdapter, _: int) -> list[tuple[str, str]]:
    claimed = []
    while (run := await storage.claim_next_run(["wf"])) is not None:
        claimed.append((run.run.id, run.lease_id))
        # Bounded: a store that hands the same run out forever must fail, not hang (an
        # in-memory adapter never yields, so the case timeout could not interrupt it).
        if len(claimed) > 2 * RUNS:
            break
    return claimed


def _check_claims(results: list[list[tuple[str, str]]], expected: set[str]) -> None:
    ids = [run_id for batch in results for run_id, _ in batch]
    leases = [lease for batch in results for _, lease in batch]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    expect(duplicates, [], "runs claimed by more than one racer")
    expect(sorted(set(expected) - set(ids)), [], "runs no racer claimed (lost)")
    expect(len(set(leases)), len(leases), "distinct leases")


async def _racing_claims(h: Harness, mode: str) -> None:
    runs = {(await h.create("wf", i)).id for i in range(RUNS)}
    _check_claims(await _race(h, mode, _claim_all), runs)


async def _racing_stale_reclaim(h: Harness, mode: str) -> None:
    claimed = await h.created_and_claimed()
    beat = (await h.get(claimed.run.id)).heartbeat_at
    assert beat is not None
    # Not a race timer: spin (a few ms at most) until the claim's heartbeat is in the past,
    # so stale_before=beat+1 marks it stale while every new claim's heartbeat is not.
    while system_clock() <= beat + 1:  # noqa: ASYNC110
        await asyncio.sleep(0)

    async def reclaim(storage: StorageAdapter, _: int) -> str | None:
        won = await storage.claim_next_run(["wf"], beat + 1)
        return won.lease_id if won else None

    winners = [lease for lease in await _race(h, mode, reclaim) if lease is not None]
    expect(len(winners), 1, f"racers that reclaimed the one stale run (leases {winners})")
    await expect_all_refused(h, claimed.run.id, claimed.lease_id, "a raced reclaim")
    expect(await h.storage.heartbeat_run(claimed.run.id, winners[0]), True, "winner's lease")


async def _racing_schedule(h: Harness, mode: str) -> None:
    await h.storage.upsert_schedule(h.schedule("k", every_ms=10**9, next_run_at=1_000))

    async def fire(storage: StorageAdapter, _: int) -> int | None:
        claimed = await storage.claim_due_schedule(["wf"], 2_000)
        return claimed.slot if claimed else None

    slots = [slot for slot in await _race(h, mode, fire) if slot is not None]
    expect(slots, [1_000], "slots fired across racers")


async def _racing_events(h: Harness, mode: str) -> None:
    run = await h.create()
    for index in range(RUNS):
        await h.storage.deliver_event(run.id, "ev", index)

    async def take_all(storage: StorageAdapter, _: int) -> list[int]:
        taken = []
        while (record := await storage.take_event(run.id, "ev")) is not None:
            taken.append(record.payload)
            if len(taken) > 2 * RUNS:  # bounded, as in _claim_all
                break
        return taken

    taken = sorted(p for batch in await _race(h, mode, take_all) for p in batch)
    expect(taken, list(range(RUNS)), "events taken across racers (each exactly once)")


async def _racing_idempotency(h: Harness, mode: str) -> None:
    async def create(storage: StorageAdapter, index: int) -> tuple[str, bool]:
        result = await storage.create_run(h.new_run("wf", index, idempotency_key="k"))
        return result.run.id, result.created

    results = await _race(h, mode, create)
    expect(sum(created for _, created in results), 1, "racers told created=True")
    expect(len({run_id for run_id, _ in results}), 1, "distinct run ids returned")
    expect(len(await h.storage.list_runs(RunFilter())), 1, "runs stored")


_TAKEOVER_TRIES = 1000


async def _racing_fenced_save(h: Harness, mode: str) -> None:
    old = await h.created_and_claimed()
    run_id, future, taker = old.run.id, h.future(), RACERS // 2

    async def save(storage: StorageAdapter, index: int) -> Any:
        # One racer takes the run over and at once reads the steps; the others each save a
        # step with the lost lease. An old-lease save is either refused or lands before
        # the takeover, so nothing may appear after the taker's read.
        if index != taker:
            step = h.step(run_id, f"old-{index}", output=index)
            return await storage.save_step_result(step, old.lease_id)
        # A claim may skip a run whose row a concurrent write holds at that instant
        # (SKIP LOCKED adapters; see the claim_next_run contract), so retry a bounded
        # number of times: what matters here is what is visible after the takeover.
        for _ in range(_TAKEOVER_TRIES):
            new = await storage.claim_next_run(["wf"], future)
            if new is not None:
                return await storage.get_step_results(run_id)
        return None

    results = await _race(h, mode, save)
    at_takeover = results[taker]
    if at_takeover is None:
        raise ContractViolation("claim_next_run with stale_before in the future", run_id, None)
    expect(
        [s.name for s in await h.storage.get_step_results(run_id)],
        [s.name for s in at_takeover],
        "steps after the race vs. at the takeover (an old-lease save landed after it)",
    )


async def _racing_cancel_vs_complete(h: Harness, mode: str) -> None:
    claimed = await h.created_and_claimed()
    run_id, finisher = claimed.run.id, RACERS // 2
    live = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SLEEPING, RunStatus.WAITING]

    async def act(storage: StorageAdapter, index: int) -> tuple[str, bool]:
        if index == finisher:
            done = await storage.update_claimed_run_status(
                run_id, claimed.lease_id, RunStatus.COMPLETED, output="done"
            )
            return "completed", done
        cancelled = await storage.update_run_status(run_id, RunStatus.CANCELLED, expected=live)
        return "cancelled", cancelled

    winners = [what for what, ok in await _race(h, mode, act) if ok]
    expect(len(winners), 1, f"calls that reported success ({winners}): exactly one may win")
    expect((await h.get(run_id)).status, RunStatus(winners[0]), "final status is the winner's")


SCENARIOS = {
    "claim": (
        "Racing claim_next_run over the same runs: each claimed once, none lost.",
        _racing_claims,
    ),
    "stale_reclaim": (
        "Racing reclaims of one stale run: exactly one winner; the old lease is fenced.",
        _racing_stale_reclaim,
    ),
    "schedule_once": ("Racing claim_due_schedule: one occurrence fires once.", _racing_schedule),
    "event_once": (
        "Racing take_event over buffered events: each taken exactly once.",
        _racing_events,
    ),
    "idempotency": (
        "Racing create_run with one idempotency key: one run, one creator.",
        _racing_idempotency,
    ),
    "fenced_save": (
        "Racing a takeover against saves with the old lease: no old-lease write lands "
        "after the takeover.",
        _racing_fenced_save,
    ),
    "cancel_vs_complete": (
        "Racing a conditional cancel against completion: exactly one wins, and the run "
        "ends in the winner's status.",
        _racing_cancel_vs_complete,
    ),
}


def _register(name: str, mode: str, description: str, scenario: Any) -> None:
    @case(f"concurrency.{name}_{mode}", f"{description} ({mode})", requires=MODES[mode])
    async def race(h: Harness) -> None:
        await scenario(h, mode)


for _name, (_description, _scenario) in SCENARIOS.items():
    for _mode in MODES:
        _register(_name, _mode, _description, _scenario)


@case("concurrency.fencing_across_handles", requires=[Capability.THREADS])
async def fencing_across_handles(h: Harness) -> None:
    """A takeover through another handle fences the old holder's handle."""
    claimed = await h.created_and_claimed()
    other = await h.open_another()
    taken = await other.claim_next_run(["wf"], h.future())
    expect(taken is not None and taken.run.id == claimed.run.id, True, "takeover via handle 2")
    await expect_all_refused(h, claimed.run.id, claimed.lease_id, "a takeover elsewhere")


def _race_processes(url: str, task: str, args: tuple[Any, ...], count: int = 3) -> list[Any]:
    from reflow_conformance._workers import race_process

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    results = context.Queue()
    processes = [
        context.Process(target=race_process, args=(url, barrier, results, i, task, args))
        for i in range(count)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    try:
        for _ in range(count):
            index, status, value = results.get(timeout=120)
            if status != "ok":
                raise AssertionError(f"racer process {index} raised:\n{value}")
            collected[index] = value
    except queue.Empty:
        raise HarnessError("racer processes did not report within 120 s") from None
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
        results.join_thread()
    return [collected[i] for i in range(count)]


@case("concurrency.claim_processes", requires=[Capability.CROSS_PROCESS])
async def claim_processes(h: Harness) -> None:
    """Spawned processes race claim_next_run over the same runs: each once, none lost."""
    runs = {(await h.create("wf", i)).id for i in range(RUNS)}
    results = await asyncio.to_thread(_race_processes, h.url, "claim_all", (["wf"],))
    _check_claims([[tuple(pair) for pair in batch] for batch in results], runs)


@case("concurrency.schedule_once_processes", requires=[Capability.CROSS_PROCESS])
async def schedule_once_processes(h: Harness) -> None:
    """Spawned processes race claim_due_schedule: one occurrence fires once."""
    await h.storage.upsert_schedule(h.schedule("k", every_ms=10**9, next_run_at=1_000))
    results = await asyncio.to_thread(_race_processes, h.url, "claim_schedule", (["wf"], 2_000))
    expect(sorted(s for batch in results for s in batch), [1_000], "slots fired")
