"""Chaos: a fleet of worker processes SIGKILLed at random and restarted (issue 5), with
clocks that disagree (issue 8).

Three ``workers/crash_app.py`` processes share one store and execute 200 five-step
runs whose steps take 150-650 ms each. Each worker's clock is a whole lease ahead of,
behind, or in step with the store's. A chaos loop driven by a seeded RNG (the seed is
printed; ``REFLOW_CHAOS_SEED`` replays one) SIGKILLs a random worker at random moments,
sixteen times, starting a fresh worker after each kill; then the fleet finishes.

The side-effect ledger is one SQLite file for both backends, separate from the store:
it must not share the fate of the store under test (a store bug can neither hide nor
invent ledger rows), one verification serves both backends, and ledger ids order the
executions across processes without trusting any clock. Each step's output in the
store names the ledger row of the execution that was checkpointed.

Afterwards, for every ``(run, step)``: the execution whose checkpoint is in the store is
the last one that started (one starting after it re-executed a completed step: either
its claim came after the checkpoint, or the checkpoint was written by a worker that had
lost its lease); no earlier execution has a checkpoint stamp in the ledger (the stamp
survives a wrongful re-execution overwriting the step row); and each earlier execution
belongs to a worker killed after it started and before the next execution started,
i.e. the step was running at a kill.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import crash_ledger
import postgres_fixtures
from crash_app import OPERATIONS, expected_output
from crash_harness import Fleet, Store, WorkerProcess, store_url, wait_until

from reflow_core import RunStatus, StepStatus

pg_dsn = postgres_fixtures.pg_dsn
pg_schema = postgres_fixtures.pg_schema

RUNS = 200
WORKERS = 3
KILLS = 16
KILL_GAP_S = (0.3, 1.5)
"""Random pause between kills (at most 24 s in all). The runs need at least 33 s of step
work on 12 slots, so every kill lands while work remains."""
SKEW_MS = 3000
"""Workers' clocks run a whole lease ahead of or behind the store's (and each other's)."""
WORKER_OPTIONS = {
    "concurrency": 4,
    "lease": 3.0,
    "heartbeat": 0.3,
    "poll": 0.05,
    "work_ms": (150, 650),
    "stdout_to_file": True,
}
"""A 3 s lease leaves ten missed heartbeats of margin on a loaded 2-core machine, so a
run is reclaimed only from a worker that is really gone."""
FINISH_TIMEOUT_S = 150.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store on each backend."""
    return store_url(request.param, tmp_path, request)


@dataclass
class Summary:
    """What the chaos did, and what it cost."""

    executions: int = 0
    ran_twice: int = 0
    ran_more: int = 0
    interrupted: int = 0
    """Executions that never returned (their worker died inside the step)."""


def _all_completed(store: Store) -> bool:
    failed = store.runs(RunStatus.FAILED)
    assert not failed, f"{len(failed)} runs failed, e.g. {failed[0]}"
    return len(store.runs(RunStatus.COMPLETED)) == RUNS


def _verify(store: Store, ledger: Path, run_ids: list[str], kills: dict[int, int]) -> Summary:
    runs = {run.id: run for run in store.runs()}
    assert set(runs) == set(run_ids), "runs lost or invented"
    stuck = [run for run in runs.values() if run.status is not RunStatus.COMPLETED]
    assert not stuck, f"{len(stuck)} runs not completed, e.g. {stuck[0]}"
    wrong = [r for r in runs.values() if r.output["value"] != expected_output(r.input["n"])]
    assert not wrong, f"{len(wrong)} runs with a wrong output, e.g. {wrong[0]}"

    executions: dict[tuple[str, str], list[crash_ledger.Execution]] = {}
    for execution in crash_ledger.read_all(ledger):
        executions.setdefault((execution.run_id, execution.step), []).append(execution)

    problems: list[str] = []
    summary = Summary(executions=sum(len(group) for group in executions.values()))
    for run_id in run_ids:
        rows = store.steps(run_id)
        assert sorted(row.name for row in rows) == sorted(OPERATIONS), (run_id, rows)
        for row in rows:
            assert row.status is StepStatus.COMPLETED, row
            group = executions.get((run_id, row.name), [])
            kept = row.output["exec"]
            produced_by = next((e for e in group if e.id == kept), None)
            if produced_by is None or produced_by.pid != row.output["pid"]:
                problems.append(f"{run_id}/{row.name}: checkpoint from unknown execution {kept}")
                continue
            if produced_by.finished_ns is None:
                problems.append(f"{run_id}/{row.name}: checkpoint of an unfinished {produced_by}")
            if group[-1].id != kept:
                later = [e for e in group if e.id > kept]
                problems.append(f"{run_id}/{row.name}: re-executed after its checkpoint: {later}")
            for earlier, following in itertools.pairwise(group):
                if earlier.id >= kept:
                    break
                killed_at = kills.get(earlier.pid)
                if earlier.checkpointed_ns is not None:
                    problems.append(
                        f"{run_id}/{row.name}: checkpointed, yet executed again: {following}"
                    )
                elif killed_at is None or not earlier.started_ns < killed_at < following.started_ns:
                    problems.append(
                        f"{run_id}/{row.name}: ran again though no kill interrupted it: "
                        f"{earlier} then {following} (kill at {killed_at})"
                    )
                if earlier.finished_ns is None:
                    summary.interrupted += 1
            summary.ran_twice += len(group) == 2
            summary.ran_more += len(group) > 2
    assert not problems, f"{len(problems)} violations:\n" + "\n".join(problems[:20])
    return summary


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fleet_survives_random_sigkills(url: str, tmp_path: Path) -> None:
    """200 five-step runs on three worker processes, sixteen of which are SIGKILLed at random
    moments and replaced: every run completes with the right output, none is lost or
    stuck, each has five completed step rows, no completed step is executed again, and a
    step runs more than once only if a kill interrupted it. Reports how many ran twice.

    Fails if the engine replays a checkpointed step after a reclaim, if a fenced worker's
    checkpoint lands, if a run is never reclaimed, or if storage loses a run or a row.
    """
    seed = int(os.environ.get("REFLOW_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nchaos seed {seed} (replay with REFLOW_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    ledger = tmp_path / "ledger.db"
    crash_ledger.init(ledger)
    store = Store(url)
    kills: dict[int, int] = {}
    began = time.monotonic()
    try:
        run_ids = store.enqueue(range(RUNS))
        with Fleet(url, ledger, tmp_path) as fleet:
            # Every worker's clock is off by a lease either way, or right: since 2.0 the
            # store's clock alone decides leases, so skew must change nothing below.
            skews = (-SKEW_MS, 0, SKEW_MS)
            live: list[WorkerProcess] = [
                fleet.start(f"w{slot}", skew_ms=skews[slot % 3], **WORKER_OPTIONS)
                for slot in range(WORKERS)
            ]
            for kill in range(KILLS):
                time.sleep(rng.uniform(*KILL_GAP_S))  # the chaos schedule, not synchronisation
                assert not _all_completed(store), f"work ran out after {kill} kills; resize"
                slot = rng.randrange(WORKERS)
                kills[live[slot].pid] = live[slot].kill()
                skew = rng.choice(skews)
                live[slot] = fleet.start(f"w{slot}-{kill}", skew_ms=skew, **WORKER_OPTIONS)
            chaos_s = time.monotonic() - began
            wait_until("every run to complete", lambda: _all_completed(store), FINISH_TIMEOUT_S)
            for worker in live:
                assert worker.stop() == 0, worker.stderr()
            workers = list(fleet.started)
        summary = _verify(store, ledger, run_ids, kills)
    finally:
        store.close()

    tracebacks = [w.name for w in workers if "Traceback" in w.stderr()]
    assert not tracebacks, f"tracebacks in the stderr of {tracebacks}"
    errors = Counter(
        line.split()[1] for w in workers for line in w.output() if line.startswith("ERROR")
    )
    print(
        f"chaos: {RUNS} runs, {KILLS} kills in {chaos_s:.1f}s, all done after "
        f"{time.monotonic() - began:.1f}s; {summary.executions} step executions for "
        f"{RUNS * len(OPERATIONS)} steps: {summary.ran_twice} steps ran twice, "
        f"{summary.ran_more} more than twice, {summary.interrupted} executions were "
        f"interrupted inside the step; errors reported by workers: {dict(errors) or 'none'}"
    )
