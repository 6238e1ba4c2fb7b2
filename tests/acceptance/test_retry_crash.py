"""Retry counts survive a SIGKILL during a short, in-lease backoff, on SQLite and PostgreSQL
(issue 9, item 8).

The step of ``flaky`` (``workers/crash_app.py``) is retried up to ``FLAKY_MAX_ATTEMPTS``
times, ``FLAKY_BACKOFF_S`` apart: a wait short enough that the worker spends it in place,
holding the lease (the long waits, which suspend the run in storage, are covered
elsewhere). Whether an execution fails is decided by the side-effect ledger, not by the
engine: the step succeeds on its ``succeed_on``-th execution *overall*, counted across
processes. So the ledger is the truth the stored ``attempts`` and the attempt numbers the
engine hands the step are held against.

A worker is SIGKILLed as soon as it prints ``RETRYING``: the retry-scheduled hook runs
once the failed attempt is stored and just before the wait, and the wait (0.8 s) is far
longer than the test takes to read a line and send a signal. The ledger then proves the
kill landed in the wait: the killed worker never started the next attempt. A fresh
worker reclaims the run once the dead worker's one-second lease has expired.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import crash_ledger
import postgres_fixtures
from crash_app import FLAKY, FLAKY_BACKOFF_S, FLAKY_MAX_ATTEMPTS
from crash_harness import Fleet, Store, WorkerProcess, store_url

from reflow_core import Engine, RunStatus, StepStatus

pg_dsn = postgres_fixtures.pg_dsn
pg_schema = postgres_fixtures.pg_schema

pytestmark = pytest.mark.slow

SHORT_LEASE = {"lease": 1.0, "heartbeat": 0.2, "poll": 0.05}
STEP = "flaky"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store on each backend."""
    return store_url(request.param, tmp_path, request)


def _enqueue_flaky(store: Store, n: int, succeed_on: int) -> str:
    engine = Engine(store.storage, [FLAKY], use_plugins=False)

    async def enqueue() -> str:
        return (await engine.enqueue(FLAKY.name, {"n": n, "succeed_on": succeed_on})).id

    return store._await(enqueue())


def _kill_in_backoff(
    worker: WorkerProcess, store: Store, run_id: str, attempt: int, since: int = 0
) -> None:
    """SIGKILL ``worker`` as soon as it reports (on a line from index ``since``) that
    attempt ``attempt`` failed and will be retried after an in-place wait; then check what
    the dead worker left in storage: the failed attempt, counted and described on the
    step's row, the run still ``running``."""
    line = worker.expect(rf"^RETRYING {run_id} {STEP} (\d+) (\S+) (\S+)$", since=since)
    worker.kill()  # before anything else: the wait is only FLAKY_BACKOFF_S long
    reported, delay, retry_at = int(line[1]), float(line[2]), line[3]
    assert reported == attempt, (
        f"{worker.name} reports attempt {reported} failed, expected {attempt}: "
        "the count did not carry over from the previous process"
    )
    # "-": no retry_at, so the worker waits in place; a suspended run is another path.
    assert (delay, retry_at) == (FLAKY_BACKOFF_S, "-"), "not an in-place wait"

    run = store.run(run_id)
    assert run.status is RunStatus.RUNNING, run
    rows = store.steps(run_id)
    stored = [(row.name, row.status, row.attempts, row.wake_at) for row in rows]
    assert stored == [(STEP, StepStatus.RUNNING, attempt, None)], (
        f"attempt {attempt} failed, and was not stored as such before the wait: {rows}"
    )
    error = rows[0].error
    assert error is not None and f"(attempt {attempt})" in error.message, error


def _ledger(ledger: Path, run_id: str) -> list[tuple[int, int]]:
    """``(pid, attempt the engine gave)`` of each execution of the run's step, in order;
    every one of them must have returned or raised (none was cut short by a kill)."""
    executions = [e for e in crash_ledger.read_all(ledger) if e.run_id == run_id]
    assert all(e.step == STEP and e.finished_ns is not None for e in executions), executions
    return [(e.pid, e.attempt) for e in executions]


def _clean_exit(worker: WorkerProcess) -> None:
    assert worker.stop() == 0, worker.stderr()
    assert "Traceback" not in worker.stderr(), worker.stderr()
    assert not [line for line in worker.lines if line.startswith("ERROR")], worker.lines


def test_attempt_after_a_crash_in_backoff_continues_the_count(url: str, tmp_path: Path) -> None:
    """Worker A makes attempts 1 and 2 (both fail) and is SIGKILLed while it waits to make
    attempt 3. Worker B reclaims the run and its first execution is attempt 3, which
    succeeds (the third execution overall): the step's row ends ``completed`` with
    ``attempts == 3``, and the ledger holds exactly A's 1 and 2 and B's 3.

    Fails if attempts were counted in memory only: B would start again at attempt 1
    (its ``STARTED`` line, the ledger and the ``attempts`` argument all say 1), and since
    the third execution overall succeeds whatever the engine believes, the stored row
    would say ``attempts == 1``. Also fails if the failed attempt were not stored before
    the wait (A's dead row would not be ``running`` with ``attempts == 2``).
    """
    ledger = tmp_path / "ledger.db"
    crash_ledger.init(ledger)
    store = Store(url)
    try:
        with Fleet(url, ledger, tmp_path) as fleet:
            run_id = _enqueue_flaky(store, 7, succeed_on=3)
            a = fleet.start("A", **SHORT_LEASE)
            index, first = a.expect_at(rf"^RETRYING {run_id} {STEP} (\d+) ")
            assert first[1] == "1"
            _kill_in_backoff(a, store, run_id, attempt=2, since=index + 1)

            b = fleet.start("B", **SHORT_LEASE)
            started = b.expect(rf"^STARTED {run_id} {STEP} \d+ {b.pid} (\d+)$", timeout=30)
            assert started[1] == "3", f"B's first execution is attempt {started[1]}, not 3"
            b.expect(rf"^COMPLETED {run_id}$", timeout=30)
            _clean_exit(b)

        run = store.run(run_id)
        assert run.status is RunStatus.COMPLETED, run
        assert (run.output["value"], run.output["pid"], run.output["nth"]) == (7, b.pid, 3)
        assert run.recoveries == 1, "B took the run over from A's expired lease"
        [row] = store.steps(run_id)
        assert (row.status, row.attempts) == (StepStatus.COMPLETED, 3), row
    finally:
        store.close()

    assert _ledger(ledger, run_id) == [(a.pid, 1), (a.pid, 2), (b.pid, 3)]
    assert run.output["exec"] == crash_ledger.read_all(ledger)[-1].id, "B's execution's output"


def test_max_attempts_counts_attempts_made_by_every_process(url: str, tmp_path: Path) -> None:
    """A step that always fails, with ``max_attempts=4``: A makes attempt 1 and is
    SIGKILLed in the backoff, B makes attempt 2 and is SIGKILLed in the backoff, C makes
    attempts 3 and 4. The run ends ``failed`` after exactly four executions in total (the
    ledger), the step's row is ``failed`` with ``attempts == 4`` and attempt 4's error, and
    C never schedules a fifth attempt.

    Fails if attempts were counted in memory only: B would report its failure as attempt
    1, not 2; and were that not checked, the step would run 1 + 1 + 4 = 6 times, the
    ledger and the row would disagree, and a fleet that keeps crashing would retry forever.
    """
    ledger = tmp_path / "ledger.db"
    crash_ledger.init(ledger)
    store = Store(url)
    try:
        with Fleet(url, ledger, tmp_path) as fleet:
            run_id = _enqueue_flaky(store, 5, succeed_on=0)
            a = fleet.start("A", **SHORT_LEASE)
            _kill_in_backoff(a, store, run_id, attempt=1)
            b = fleet.start("B", **SHORT_LEASE)
            _kill_in_backoff(b, store, run_id, attempt=2)

            c = fleet.start("C", **SHORT_LEASE)
            c.expect(rf"^FAILED {run_id}$", timeout=30)
            _clean_exit(c)
            retried = [m[1] for _, m in c.matching(rf"^RETRYING {run_id} {STEP} (\d+) ")]
            assert retried == ["3"], "C retries once (after attempt 3), never after attempt 4"

        run = store.run(run_id)
        assert run.status is RunStatus.FAILED, run
        assert run.error is not None and run.error.step == STEP, run.error
        assert run.error.type.endswith("FlakyError"), run.error
        assert run.error.message == f"execution 4 (attempt 4) of {STEP} fails", run.error
        assert run.recoveries == 2, "B and C each took the run over from an expired lease"
        [row] = store.steps(run_id)
        assert (row.status, row.attempts) == (StepStatus.FAILED, FLAKY_MAX_ATTEMPTS), row
    finally:
        store.close()

    executions = _ledger(ledger, run_id)
    assert len(executions) == FLAKY_MAX_ATTEMPTS, executions
    assert executions == [(a.pid, 1), (b.pid, 2), (c.pid, 3), (c.pid, 4)]
