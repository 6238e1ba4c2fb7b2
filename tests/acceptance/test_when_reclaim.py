"""A ``when=`` decision survives a reclaim: a step the predicate let run is never recorded
as skipped because a later worker would decide otherwise (contract 2.0).

Workflow ``gated`` (``workers/crash_app.py``): ``g1``, then ``gate`` with a ``when=``
predicate that says yes the first time it is asked for a run and no on every later
evaluation (the ledger counts evaluations across processes), then ``g3``. Worker A is
SIGKILLed at a moment chosen deterministically, after the predicate said yes:

* ``decided``: the decision is stored (the ``running`` row written before a step whose
  predicate said yes) and the step's function has not been called (A pauses in the
  step-started hook);
* ``running``: inside ``gate`` (the step blocks on a pipe);
* ``checkpointed``: after ``gate``'s checkpoint (A pauses in the step-completed hook).

Worker B reclaims the run once A's lease expired and completes it. The predicate must
never be asked again, ``gate`` must end ``completed`` (never ``skipped``), and the
output must be the one of a run whose gate ran.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import crash_ledger
import postgres_fixtures
from crash_app import expected_gated_output
from crash_harness import Fleet, Store, by_step, overlaps, store_url

from reflow_core import RunStatus, StepStatus

pg_dsn = postgres_fixtures.pg_dsn
pg_schema = postgres_fixtures.pg_schema

pytestmark = pytest.mark.slow

SHORT = {"lease": 1.0, "heartbeat": 0.2, "poll": 0.05}
MOMENTS = {
    # option for A, the line A prints at that moment, gate's row then
    "decided": ({"pause_before": "gate"}, r"^PAUSED {run} gate$", StepStatus.RUNNING),
    "running": ({"hold": "gate"}, r"^STARTED {run} gate ", StepStatus.RUNNING),
    "checkpointed": ({"pause_after": "gate"}, r"^PAUSED {run} gate$", StepStatus.COMPLETED),
}
"""Where A is killed: its options, the line that says it is there, and ``gate``'s row."""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store on each backend."""
    return store_url(request.param, tmp_path, request)


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_reclaim_after_a_when_step_ran_never_skips_it(
    url: str, tmp_path: Path, moment: str
) -> None:
    """A is killed after ``gate``'s predicate said yes (decision stored / step running /
    step checkpointed); B reclaims and completes the run: the predicate was evaluated
    exactly once (by A; B printed no decision), ``gate``'s row is ``completed`` and was
    never ``skipped``, the run's output includes ``gate``'s work, ``gate`` ran (to
    completion) exactly once except that A's interrupted execution may precede B's,
    never at the same time, and ``g3`` ran once, in B.

    Fails if a reclaim re-asks the predicate (the decision not stored before the step
    runs, or ignored on replay): B would record ``gate`` as skipped.
    """
    options, line, row_then = MOMENTS[moment]
    ledger = tmp_path / "ledger.db"
    crash_ledger.init(ledger)
    store = Store(url)
    try:
        with Fleet(url, ledger, tmp_path) as fleet:
            [run_id] = store.enqueue([5], workflow="gated")
            a = fleet.start("A", **options, **SHORT)
            a.expect(line.format(run=run_id))
            a.expect(rf"^DECIDED {run_id} gate True$")
            at_kill = {row.name: row.status for row in store.steps(run_id)}
            killed_at = a.kill()

            b = fleet.start("B", **SHORT)
            b.expect(rf"^COMPLETED {run_id}$", timeout=20)
            assert b.stop() == 0, b.stderr()
            assert "Traceback" not in b.stderr(), b.stderr()
            skips = b.matching(rf"^WRITE save_step_result {run_id} gate \S+ skipped ")
            assert not skips, f"B recorded gate as skipped: {skips[0][1].string}"
            assert not b.matching(r"^DECIDED "), "B asked the predicate again"

        run = store.run(run_id)
        assert run.status is RunStatus.COMPLETED, run
        assert run.output["value"] == expected_gated_output(5, gate_ran=True)
        assert (run.attempt, run.recoveries) == (2, 1)
        rows = {row.name: row for row in store.steps(run_id)}
        assert {name: row.status for name, row in rows.items()} == {
            "g1": StepStatus.COMPLETED,
            "gate": StepStatus.COMPLETED,
            "g3": StepStatus.COMPLETED,
        }
        gate_writer = a.pid if moment == "checkpointed" else b.pid
        assert rows["gate"].output["pid"] == gate_writer
    finally:
        store.close()

    decisions = [d for d in crash_ledger.read_decisions(ledger) if d.run_id == run_id]
    assert [(d.step, d.pid, d.answer) for d in decisions] == [("gate", a.pid, True)]
    executions = [e for e in crash_ledger.read_all(ledger) if e.run_id == run_id]
    executed = {step: [e.pid for e in group] for step, group in by_step(executions).items()}
    assert executed == {
        "g1": [a.pid],
        "gate": {
            "decided": [b.pid],
            "running": [a.pid, b.pid],
            "checkpointed": [a.pid],
        }[moment],
        "g3": [b.pid],
    }
    assert not overlaps(executions, {a.pid: killed_at})
    # The decision was in storage before the step's function was called.
    assert at_kill == {"g1": StepStatus.COMPLETED, "gate": row_then}, at_kill
