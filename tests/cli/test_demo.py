"""``reflow demo`` end to end in real processes, and its verdict logic on its own."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from reflow_cli.demo import STEPS, LedgerEntry, verify
from reflow_core import RunFilter, RunStatus, StepResult, StepStatus, WorkflowRun, open_storage


@pytest.mark.slow
def test_demo_kills_a_worker_and_every_completed_step_ran_once(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "reflow_cli", "demo", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    took = time.monotonic() - began
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SIGKILL → worker 1" in proc.stdout
    assert "each completed step ran to completion exactly once ✓ (15 steps)" in proc.stdout
    assert took < 20, f"the demo took {took:.1f}s"

    # Check the claim independently of the demo's own verdict: read both files ourselves.
    with closing(sqlite3.connect(tmp_path / "demo-ledger.db")) as ledger:
        rows = ledger.execute("SELECT run_id, step, phase, pid FROM ledger").fetchall()
    effects = Counter((run, step) for run, step, phase, _ in rows if phase == "effect")
    assert len(effects) == 3 * len(STEPS)
    assert set(effects.values()) == {1}
    pids = {pid for *_, pid in rows}
    assert len(pids) == 2, "two worker processes should have executed steps"
    restarted = Counter((run, step) for run, step, phase, _ in rows if phase == "started")
    assert max(restarted.values()) == 2, "the step running at the kill should start again"

    async def runs() -> list[tuple[WorkflowRun, list[StepResult]]]:
        storage = open_storage(f"sqlite:///{db}")
        try:
            await storage.initialize()
            found = await storage.list_runs(RunFilter())
            return [(run, await storage.get_step_results(run.id)) for run in found]
        finally:
            await storage.close()

    loaded = asyncio.run(runs())
    assert [run.status for run, _ in loaded] == [RunStatus.COMPLETED] * 3
    # recoveries, not attempt: a claim handed back unexecuted (a recovered run waits for
    # a worker where it can run alone) counts as an attempt but runs nothing.
    resumed = [run for run, _ in loaded if run.recoveries == 1]
    assert resumed, "at least the killed order must have been taken over once"
    for run, steps in loaded:
        ran_on = {s.output["pid"] for s in steps}
        assert len(ran_on) <= 1 + run.recoveries, run
        assert run.recoveries <= 1, run


# -- the verdict, without processes ------------------------------------------------------

KILLED, SURVIVOR = 100, 200


def _run(status: RunStatus = RunStatus.COMPLETED) -> WorkflowRun:
    return WorkflowRun(id="r1", workflow="w", input=None, status=status, created_at=0, updated_at=0)


def _step(name: str, pid: int) -> StepResult:
    return StepResult(
        id=name,
        run_id="r1",
        name=name,
        status=StepStatus.COMPLETED,
        output={"pid": pid},
        attempts=1,
        created_at=0,
        updated_at=0,
    )


def _entry(step: str, phase: str, pid: int) -> LedgerEntry:
    return LedgerEntry("r1", "A-1", step, phase, pid, 0.0)


def test_verdict_exactly_once_with_a_restarted_step() -> None:
    entries = [
        _entry("a", "started", KILLED),
        _entry("a", "effect", KILLED),
        _entry("b", "started", KILLED),  # killed here, before the side effect
        _entry("b", "started", SURVIVOR),
        _entry("b", "effect", SURVIVOR),
    ]
    verdict = verify([(_run(), [_step("a", KILLED), _step("b", SURVIVOR)])], entries,
                     killed_pid=KILLED)  # fmt: skip
    assert verdict.ok
    assert "exactly once ✓" in verdict.lines[0][1]
    assert verdict.notes == {("r1", "a"): "before kill", ("r1", "b"): "re-run"}


def test_verdict_allows_a_repeat_only_for_the_step_caught_by_the_kill() -> None:
    caught = [
        _entry("b", "started", KILLED),
        _entry("b", "effect", KILLED),  # side effect done, checkpoint not yet: at-least-once
        _entry("b", "started", SURVIVOR),
        _entry("b", "effect", SURVIVOR),
    ]
    verdict = verify([(_run(), [_step("b", SURVIVOR)])], caught, killed_pid=KILLED)
    assert verdict.ok
    assert "ran twice, as at-least-once execution allows" in verdict.lines[0][1]

    # The same repeat by the surviving worker alone is a real duplicate: a failure.
    duplicate = [_entry("b", "effect", SURVIVOR), _entry("b", "effect", SURVIVOR)]
    assert not verify([(_run(), [_step("b", SURVIVOR)])], duplicate, killed_pid=KILLED).ok


def test_verdict_fails_on_unfinished_runs_and_missing_effects() -> None:
    assert not verify([(_run(RunStatus.RUNNING), [])], [], killed_pid=KILLED).ok
    assert not verify([(_run(), [_step("a", SURVIVOR)])], [], killed_pid=KILLED).ok
