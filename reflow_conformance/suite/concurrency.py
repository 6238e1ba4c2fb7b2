"""Concurrency: real races, released together by a barrier — never timed with sleeps.

Each scenario runs in up to three modes, and the coroutine and thread races in
:data:`ROUNDS` rounds (see there):

* ``coroutines`` — many coroutines on the one handle (``asyncio.gather``). Applies to
  every adapter, including ``memory``, which declares neither threads nor processes:
  for it this is the only race there is, and it proves that no ``await`` splits a
  check from its write.
* ``threads`` — one OS thread, event loop and handle per racer (capability ``threads``);
  every handle shares the kit clock, so a lease the case let expire is expired for all.
* ``processes`` — spawned processes, each opening ``open_storage(url)``
  (capability ``cross-process``). They cannot share the kit clock; a takeover race
  claims with a 1 ms lease and each racer polls its own ``now()`` (bounded) until the
  store's clock has passed the expiry, then waits at the barrier.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import queue
from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import LEASE_MS, ContractViolation, Harness, HarnessError, expect
from reflow_conformance.suite.leases import expect_all_refused
from reflow_conformance.suite.rules import Racers
from reflow_core.registry import Capability
from reflow_core.storage import StorageAdapter
from reflow_core.types import RunFilter, RunStatus, StepStatus

RACERS = 6
RUNS = 40
ROUNDS = 12
"""Each coroutine and thread race is played this many times per case, on fresh runs of a
workflow of its own (``wf-<round>``), with the odd role (taker, finisher) moving from
racer to racer (each racer twice), and the racers (threads and their handles) kept
between rounds. One throw of a thread race catches a split check-then-write about half
the time; measured on the 26 split check/write adapters of ``tests/conformance/faults``
(``bench/kit_kill_rate.py --races-only``), twelve rounds catch every one of them in
every default run (520 of 520; the split fenced save on SQLite in 100 of 100).
``--reflow-stress=N`` plays each race case N times over, each time on a fresh store."""
MODES: dict[str, frozenset[Capability]] = {
    "coroutines": frozenset(),
    "threads": frozenset({Capability.THREADS}),
}


def _wf(round_: int) -> str:
    return f"wf-{round_}"


def _odd_one(round_: int) -> int:
    """The racer playing the odd role (taker, finisher) in ``round_``: each in turn."""
    return (RACERS // 2 + round_) % RACERS


async def _claim_all(names: list[str], storage: StorageAdapter, _: int) -> list[tuple[str, str]]:
    claimed = []
    while (run := await storage.claim_next_run(names, lease_ms=LEASE_MS)) is not None:
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


async def _racing_claims(h: Harness, racers: Racers, round_: int) -> None:
    wf = _wf(round_)
    runs = {(await h.create(wf, i)).id for i in range(RUNS)}
    _check_claims(await racers.race(functools.partial(_claim_all, [wf])), runs)


async def _racing_stale_reclaim(h: Harness, racers: Racers, round_: int) -> None:
    wf = _wf(round_)
    claimed = await h.created_and_claimed(wf)
    await h.expire(claimed.run.id)  # every racer shares the kit clock: all see it expired

    async def reclaim(storage: StorageAdapter, _: int) -> Any:
        return await storage.claim_next_run([wf], lease_ms=LEASE_MS)

    won = [c for c in await racers.race(reclaim) if c is not None]
    winners = [c.lease_id for c in won]
    expect(len(winners), 1, f"racers that reclaimed the one stale run (leases {winners})")
    expect(won[0].run.recoveries, 1, "recoveries returned to the one winner")
    stored = await h.get(claimed.run.id)
    expect((stored.recoveries, stored.attempt), (1, 2), "stored (recoveries, attempt)")
    await expect_all_refused(h, claimed.run.id, claimed.lease_id, "a raced reclaim")
    expect(await h.storage.heartbeat_run(claimed.run.id, winners[0]), True, "winner's lease")


async def _racing_schedule(h: Harness, racers: Racers, round_: int) -> None:
    wf = _wf(round_)
    due = h.now() - 1_000
    await h.storage.upsert_schedule(h.schedule(f"k-{round_}", wf, every_ms=10**9, next_run_at=due))

    async def fire(storage: StorageAdapter, _: int) -> int | None:
        claimed = await storage.claim_due_schedule([wf])
        return claimed.slot if claimed else None

    slots = [slot for slot in await racers.race(fire) if slot is not None]
    expect(slots, [due], "slots fired across racers")


async def _racing_events(h: Harness, racers: Racers, round_: int) -> None:
    run = await h.create(_wf(round_))
    for index in range(RUNS):
        await h.storage.deliver_event(run.id, "ev", index)

    async def take_all(storage: StorageAdapter, _: int) -> list[int]:
        taken = []
        while (record := await storage.take_event(run.id, "ev")) is not None:
            taken.append(record.payload)
            if len(taken) > 2 * RUNS:  # bounded, as in _claim_all
                break
        return taken

    taken = sorted(p for batch in await racers.race(take_all) for p in batch)
    expect(taken, list(range(RUNS)), "events taken across racers (each exactly once)")


async def _racing_idempotency(h: Harness, racers: Racers, round_: int) -> None:
    wf = _wf(round_)

    async def create(storage: StorageAdapter, index: int) -> tuple[str, bool]:
        result = await storage.create_run(h.new_run(wf, index, idempotency_key="k"))
        return result.run.id, result.created

    results = await racers.race(create)
    expect(sum(created for _, created in results), 1, "racers told created=True")
    expect(len({run_id for run_id, _ in results}), 1, "distinct run ids returned")
    expect(len(await h.storage.list_runs(RunFilter(workflow=wf))), 1, "runs stored")


_TAKEOVER_TRIES = 1000
_OLD_SAVES = 30
"""Saves each old-lease racer makes, one after another, until one is refused."""
_SETTLE_POLLS = 1000


async def _racing_fenced_save(h: Harness, racers: Racers, round_: int) -> None:
    wf = _wf(round_)
    old = await h.created_and_claimed(wf)
    run_id, taker = old.run.id, _odd_one(round_)
    await h.expire(run_id)  # the old lease has just expired: the taker may take the run

    async def save(storage: StorageAdapter, index: int) -> Any:
        # One racer takes the run over and at once reads the steps; the others keep saving
        # steps with the old lease, one after another, until one is refused, so that saves
        # are in flight whenever the takeover lands. An old-lease save is either refused or
        # lands before the takeover, so nothing may appear after the taker's read.
        if index != taker:
            for k in range(_OLD_SAVES):
                step = h.step(run_id, f"old-{index}-{k:03d}", output=index)
                if not await storage.save_step_result(step, old.lease_id):
                    break
            return None
        for _ in range(_SETTLE_POLLS):  # let the old holder's saves get going
            if await storage.get_step_results(run_id):
                break
        # A claim may skip a run whose row a concurrent write holds at that instant
        # (SKIP LOCKED adapters; see the claim_next_run contract), so retry a bounded
        # number of times: what matters here is what is visible after the takeover.
        for _ in range(_TAKEOVER_TRIES):
            new = await storage.claim_next_run([wf], lease_ms=LEASE_MS)
            if new is not None:
                return await storage.get_step_results(run_id)
        return None

    results = await racers.race(save)
    at_takeover = results[taker]
    if at_takeover is None:
        raise ContractViolation("claim_next_run of a run whose lease expired", run_id, None)
    expect(
        [s.name for s in await h.storage.get_step_results(run_id)],
        [s.name for s in at_takeover],
        "steps after the race vs. at the takeover (an old-lease save landed after it)",
    )


async def _racing_cancel_vs_complete(h: Harness, racers: Racers, round_: int) -> None:
    claimed = await h.created_and_claimed(_wf(round_))
    run_id, finisher = claimed.run.id, _odd_one(round_)
    live = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SLEEPING, RunStatus.WAITING]

    async def act(storage: StorageAdapter, index: int) -> tuple[str, bool]:
        if index == finisher:
            done = await storage.update_claimed_run_status(
                run_id, claimed.lease_id, RunStatus.COMPLETED, output="done"
            )
            return "completed", done
        cancelled = await storage.update_run_status(run_id, RunStatus.CANCELLED, expected=live)
        return "cancelled", cancelled

    winners = [what for what, ok in await racers.race(act) if ok]
    expect(len(winners), 1, f"calls that reported success ({winners}): exactly one may win")
    expect((await h.get(run_id)).status, RunStatus(winners[0]), "final status is the winner's")


async def _racing_event_key(h: Harness, racers: Racers, round_: int) -> None:
    run = await h.create(_wf(round_))

    async def deliver(storage: StorageAdapter, index: int) -> bool:
        return await storage.deliver_event(run.id, "ev", index, key="one-delivery")

    answers = await racers.race(deliver)
    expect(answers, [True] * RACERS, "every racer delivering the same key is told True")
    events = []
    while (record := await h.storage.take_event(run.id, "ev")) is not None:
        events.append(record.payload)
        if len(events) > RACERS:
            break
    expect(len(events), 1, f"events stored for one key delivered by {RACERS} racers: {events}")


async def _racing_write_once(h: Harness, racers: Racers, round_: int) -> None:
    claimed = await h.created_and_claimed(_wf(round_))
    run_id = claimed.run.id

    async def save(storage: StorageAdapter, index: int) -> bool:
        # Half present the held lease, half none: the first writer wins either way.
        step = h.step(run_id, "charge", StepStatus.COMPLETED, output=f"racer-{index}")
        return await storage.save_step_result(step, claimed.lease_id if index % 2 else None)

    answers = await racers.race(save)
    winners = [index for index, ok in enumerate(answers) if ok]
    expect(len(winners), 1, f"racers told their final checkpoint was written: {winners}")
    rows = await h.storage.get_step_results(run_id)
    expect([r.output for r in rows], [f"racer-{winners[0]}"], "the checkpoint is the winner's")


_MIXED_ORDERS = (
    ("held save", "stranger save", "late save", "stranger end", "held end", "end stranger"),
    ("stranger save", "held save", "late save", "held end", "stranger end", "end stranger"),
)
"""The two orders racers make their writes in (even racers the first, odd the second).
Racers move in step, so a batching adapter groups each racer's n-th write with the
others' n-th: the orders make the n-th saves and the n-th endings differ in answer."""
_MIXED_ANSWERS = {
    "held save": True,  # a checkpoint under the run's own lease
    "stranger save": False,  # a checkpoint for a run held by another lease
    "late save": False,  # the same final checkpoint again: written once
    "stranger end": False,  # ending the run under another run's lease
    "held end": True,  # ending it under its own
    "end stranger": False,  # ending a run this lease does not hold
}


async def _racing_mixed_writes(h: Harness, racers: Racers, round_: int) -> None:
    # Racers make the same six writes at once, on runs of their own: an adapter that
    # batches concurrent writes (one statement for many callers) must still give each
    # caller its own write's answer, never its batch's.
    wf = _wf(round_)
    mine = [await h.created_and_claimed(wf, index) for index in range(RACERS)]
    other = [await h.created_and_claimed(wf, -index) for index in range(RACERS)]

    async def write(storage: StorageAdapter, index: int) -> list[tuple[str, bool]]:
        held, stranger = mine[index], other[index]
        run_id, lease = held.run.id, held.lease_id
        end = storage.update_claimed_run_status
        save = storage.save_step_result
        calls = {
            "held save": lambda: save(h.step(run_id, "s", output=f"first-{index}"), lease),
            "stranger save": lambda: save(h.step(stranger.run.id, "s"), lease),
            "late save": lambda: save(h.step(run_id, "s", output=f"late-{index}"), lease),
            "stranger end": lambda: end(run_id, stranger.lease_id, RunStatus.FAILED),
            "held end": lambda: end(run_id, lease, RunStatus.COMPLETED, output=f"done-{index}"),
            "end stranger": lambda: end(stranger.run.id, lease, RunStatus.FAILED),
        }
        return [(name, await calls[name]()) for name in _MIXED_ORDERS[index % 2]]

    answers = await racers.race(write)
    expect(
        answers,
        [[(name, _MIXED_ANSWERS[name]) for name in _MIXED_ORDERS[i % 2]] for i in range(RACERS)],
        "each racer's (write, answer) in the order it made them",
    )
    for index in range(RACERS):
        run, stranger = mine[index].run.id, other[index].run.id
        rows = [(r.name, r.output) for r in await h.storage.get_step_results(run)]
        expect(rows, [("s", f"first-{index}")], f"racer {index}'s checkpoint")
        expect(await h.storage.get_step_results(stranger), [], "steps of the runs not held")
        ended = await h.get(run)
        expect((ended.status, ended.output), (RunStatus.COMPLETED, f"done-{index}"), "held run")
        expect((await h.get(stranger)).status, RunStatus.RUNNING, "the run not held")


SCENARIOS = {
    "claim": (
        "Racing claim_next_run over the same runs: each claimed once, none lost.",
        _racing_claims,
    ),
    "stale_reclaim": (
        "Racing reclaims of one run whose lease expired: exactly one winner, recoveries "
        "counted once; the old lease is fenced.",
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
        "Racing a takeover against a stream of saves with the old lease: no old-lease "
        "write lands after the takeover.",
        _racing_fenced_save,
    ),
    "cancel_vs_complete": (
        "Racing a conditional cancel against completion: exactly one wins, and the run "
        "ends in the winner's status.",
        _racing_cancel_vs_complete,
    ),
    "event_key": (
        "Racing deliver_event with one key: every racer is told True, one event is stored.",
        _racing_event_key,
    ),
    "mixed_writes": (
        "Concurrent checkpoints and run endings, held and not, on runs of each racer's "
        "own: every caller gets its own write's answer (a batching adapter included).",
        _racing_mixed_writes,
    ),
    "write_once": (
        "Racing saves of one final checkpoint (with and without the lease): exactly one "
        "is written, and the row is the winner's.",
        _racing_write_once,
    ),
}


def _register(name: str, mode: str, description: str, scenario: Any) -> None:
    @case(
        f"concurrency.{name}_{mode}",
        f"{description} ({mode}, {ROUNDS} rounds)",
        requires=MODES[mode],
    )
    async def race(h: Harness) -> None:
        async with Racers(h, mode, RACERS) as racers:
            for round_ in range(ROUNDS):
                try:
                    await scenario(h, racers, round_)
                except AssertionError as exc:
                    exc.add_note(f"in round {round_ + 1} of {ROUNDS} (workflow {_wf(round_)!r})")
                    raise


for _name, (_description, _scenario) in SCENARIOS.items():
    for _mode in MODES:
        _register(_name, _mode, _description, _scenario)


@case("concurrency.fencing_across_handles", requires=[Capability.THREADS])
async def fencing_across_handles(h: Harness) -> None:
    """A takeover through another handle fences the old holder's handle."""
    claimed = await h.created_and_claimed()
    other = await h.open_another()
    await h.expire(claimed.run.id)
    taken = await h.claim_any(["wf"], storage=other)
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
    # Due by any clock: the kit clock started at real time and has not moved.
    due = h.now() - 1_000
    await h.storage.upsert_schedule(h.schedule("k", every_ms=10**9, next_run_at=due))
    results = await asyncio.to_thread(_race_processes, h.url, "claim_schedule", (["wf"],))
    expect(sorted(s for batch in results for s in batch), [due], "slots fired")


@case("concurrency.stale_takeover_processes", requires=[Capability.CROSS_PROCESS])
async def stale_takeover_processes(h: Harness) -> None:
    """Spawned processes race to take over one run whose (1 ms) lease expired, each once
    its own handle's now() passed the expiry: one winner, recoveries counted once."""
    # The racers cannot share the kit clock, so the lease is taken on the store's own
    # clock too (a handle opened without the kit clock), and each racer waits for that
    # clock to pass the expiry: no skew between this process and the store matters.
    own_clock = await h.open_another(shared_clock=False)
    run = await h.create()
    claimed = await h.claim(run.id, lease_ms=1, storage=own_clock)
    expires = (await h.get(run.id)).lease_expires_at
    if expires is None:
        raise ContractViolation("lease_expires_at after a claim", "an int", None)
    results = await asyncio.to_thread(_race_processes, h.url, "take_over", (["wf"], expires))
    won = [batch for batch in results if batch]
    expect(len(won), 1, f"processes that took the run over: {won}")
    run_id, lease_id, recoveries = won[0]
    expect((run_id, recoveries), (run.id, 1), "(run, recoveries) returned to the winner")
    stored = await h.get(run.id)
    expect((stored.recoveries, stored.attempt), (1, 2), "stored (recoveries, attempt)")
    await expect_all_refused(h, run.id, claimed.lease_id, "a takeover in a process")
    expect(await h.storage.heartbeat_run(run.id, lease_id), True, "the winner's lease")
