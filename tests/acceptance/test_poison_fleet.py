"""A poison fleet: one real ``reflow worker --processes 3`` (its supervisor, its restarts)
works through good runs mixed with runs that try to kill or wedge it, on SQLite and
PostgreSQL.

The app is ``workers/poison_app.py``. Poison, interleaved with 40 good three-step runs:
a ``def`` step calling ``sys.exit(3)``; an ``async`` step raising ``CancelledError``, and
one awaiting a task it cancelled; a step calling ``os._exit(1)`` (workflow
``max_recoveries=2``); a step returning a ``set``; and a good run whose stored input is
damaged before the fleet starts.

What must hold once every run is terminal and the fleet was stopped with SIGTERM:

* every good run completed with its right output;
* every poison run failed with its reason: ``STEP_INTERRUPTED`` (``sys.exit`` and both
  ``CancelledError`` runs), ``RECOVERY_LIMIT`` after exactly ``max_recoveries + 1`` = 3
  executions of the ``os._exit`` step (``recoveries == 3``), ``SERIALIZATION`` (the set),
  ``DAMAGED_VALUE`` (the damaged input);
* no poison step other than ``os._exit`` is ever run again, except after the process
  running it was killed by the ``os._exit`` step (it is never retried);
* the only worker processes that died are those that ran the ``os._exit`` step, each
  once, each restarted by the supervisor; every other process (the three first and the
  three restarted) stopped gracefully, and the fleet exits 0.

Process deaths are observed without timing: the ledger (``REFLOW_POISON_LEDGER``, one
``O_APPEND`` line per poison step execution, with its pid) says which processes ran
``os._exit``; the supervisor's log (stderr) names the pid of every process it started,
every one that died and how, and each child logs ``worker stopped`` under its own pid.
The partition "died of ``os._exit``" / "stopped gracefully" must cover every started pid.
All waits are bounded loops on the store and the log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import poison_app
import postgres_fixtures
from crash_harness import Store, store_url, wait_until

from reflow_core import Engine, RunStatus

pg_dsn = postgres_fixtures.pg_dsn
pg_schema = postgres_fixtures.pg_schema

pytestmark = pytest.mark.slow

WORKERS = Path(__file__).resolve().parent / "workers"
PROCESSES = 3
GOOD_RUNS = 40
HARDEXIT_EXECUTIONS = poison_app.MAX_RECOVERIES + 1
"""Claims 1 to 3 run ``die`` (recoveries 0, 1, 2 are within the limit of 2); the fourth
claim (recoveries 3) fails the run without calling it."""
FLEET_ARGS = ["--concurrency", "4", "--lease", "1", "--poll", "0.1", "--grace", "5"]
FINISH_TIMEOUT_S = 60.0
GARBAGE = '{"$datetime": "not a time"}'
"""Valid JSON (PostgreSQL's ``json`` type accepts it) that the codec refuses to decode."""

POISON: dict[str, tuple[str, dict[str, Any]]] = {
    "sysexit": ("sysexit", {}),
    "cancel-raise": ("cancelled", {"how": "raise"}),
    "hardexit": ("hardexit", {}),
    "unstorable": ("unstorable", {}),
    "cancel-await": ("cancelled", {"how": "await"}),
    "damaged": ("good", {"n": 1000}),
}
"""Poison runs by label: workflow and input. ``damaged`` is a good run whose input row is
overwritten with :data:`GARBAGE` before the fleet starts."""

EXPECTED_FAILURE: dict[str, tuple[str, str | None, list[str]]] = {
    "sysexit": ("STEP_INTERRUPTED", "exits", ["raised SystemExit: 3"]),
    "cancel-raise": ("STEP_INTERRUPTED", "cancels", ["CancelledError", "own cancellation"]),
    "cancel-await": ("STEP_INTERRUPTED", "cancels", ["CancelledError"]),
    "hardexit": ("RECOVERY_LIMIT", "die", ["recovered from a lost worker 3 times (limit 2)"]),
    "unstorable": ("SERIALIZATION", "returns_a_set", ["cannot be stored"]),
    "damaged": ("DAMAGED_VALUE", None, ["the input of run", "cannot be decoded"]),
}
"""Each poison run's error: code, failed step, and texts its message must contain."""

STARTED = re.compile(r"worker process #(\d+) started \(pid (\d+)\)")
DIED = re.compile(r"worker process #(\d+) \(pid (\d+)\) (.+?) after [\d.]+s; restarting in")
STOPPED = re.compile(r"reflow\.worker\[(\d+)\] worker stopped in")


@dataclass(frozen=True)
class Backend:
    """A fresh, empty store and how to damage a run's stored input behind its adapter."""

    name: str
    url: str
    dsn: str | None = None
    schema: str | None = None

    def damage_input(self, run_id: str) -> None:
        """Overwrite the run's stored input with :data:`GARBAGE` (a bad disk, a hand edit,
        a newer Reflow would leave such a row)."""
        if self.name == "sqlite":
            with sqlite3.connect(unquote(urlsplit(self.url).path[1:])) as conn:
                sql = "UPDATE reflow_runs SET input = ? WHERE id = ?"
                assert conn.execute(sql, (GARBAGE, run_id)).rowcount == 1
            conn.close()
            return
        import psycopg
        from psycopg import sql as pgsql

        assert self.dsn is not None and self.schema is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            query = pgsql.SQL("UPDATE {}.runs SET input = %s WHERE id = %s").format(
                pgsql.Identifier(self.schema)
            )
            assert conn.execute(query, (GARBAGE, run_id)).rowcount == 1


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    url = store_url(request.param, tmp_path, request)
    if request.param == "sqlite":
        return Backend("sqlite", url)
    dsn: str = request.getfixturevalue("pg_dsn")
    schema: str = request.getfixturevalue("pg_schema")
    return Backend("postgres", url, dsn, schema)


def plan() -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, workflow, input)`` in enqueue (and so roughly claim) order: a poison run
    after every sixth good run, so the ``os._exit`` run comes early enough that good runs
    are still pending or in flight in the processes it kills."""
    items: list[tuple[str, str, dict[str, Any]]] = []
    poison = list(POISON.items())
    for n in range(GOOD_RUNS):
        items.append((f"good-{n}", "good", {"n": n}))
        if n % 6 == 2 and poison:
            label, (workflow, data) = poison.pop(0)
            items.append((label, workflow, data))
    assert not poison, "every poison run is placed"
    return items


def enqueue(store: Store, items: list[tuple[str, str, dict[str, Any]]]) -> dict[str, str]:
    """Enqueue every item from the test process; run id by label."""
    engine = Engine(store.storage, poison_app.workflows, use_plugins=False)

    async def enqueue_all() -> dict[str, str]:
        return {label: (await engine.enqueue(workflow, data)).id for label, workflow, data in items}

    return store._await(enqueue_all())


class ReflowWorker:
    """One ``reflow worker`` command (the supervisor, and through it its children); stdout
    and stderr of all of them appended to one log file (``O_APPEND``: lines stay whole)."""

    def __init__(self, tmp_path: Path, url: str, ledger: Path) -> None:
        self.log_path = tmp_path / "fleet.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(WORKERS), *sys.path]),
            poison_app.LEDGER_ENV: str(ledger),
        }
        env.pop("REFLOW_STORAGE", None)
        command = [sys.executable, "-m", "reflow_cli", "worker", "poison_app:workflows"]
        command += ["--storage", url, "--processes", str(PROCESSES), *FLEET_ARGS]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        """Kill the fleet if the test ended early: first the supervisor's children (only
        pids that are still its children, never a reused pid), then the supervisor."""
        if self.proc.poll() is None:
            for match in STARTED.finditer(self.log()):
                pid = int(match.group(2))
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        os.kill(pid, signal.SIGKILL)
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_poison_runs_fail_with_their_reasons_and_kill_only_the_os_exit_processes(
    backend: Backend, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    items = plan()
    store = Store(backend.url)  # creates the schema before any worker starts
    try:
        ids = enqueue(store, items)
        backend.damage_input(ids["damaged"])

        began = time.monotonic()
        fleet = ReflowWorker(tmp_path, backend.url, ledger)
        try:

            def done() -> bool:
                log = fleet.log()
                if fleet.proc.poll() is not None:
                    raise AssertionError(f"the fleet exited {fleet.proc.returncode}:\n{log}")
                runs = store.runs()
                deaths = len(DIED.findall(log))
                os_exits = sum(step == "die" for _, step, _, _ in poison_app.read_ledger(ledger))
                return (
                    len(runs) == len(items)
                    and all(run.status.is_terminal for run in runs)
                    # The supervisor noticed every os._exit, and every restart is ready.
                    and deaths >= os_exits
                    and log.count("worker ready") == PROCESSES + deaths
                )

            try:
                wait_until("every run terminal, every restart ready", done, FINISH_TIMEOUT_S, 0.1)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{fleet.log()}") from None
            finished = time.monotonic() - began
            fleet.proc.send_signal(signal.SIGTERM)
            code = fleet.proc.wait(timeout=30)
            stopped_after = time.monotonic() - began - finished
        finally:
            fleet.close()
        log = fleet.log()
        print(
            f"\n[{backend.name}] all runs terminal after {finished:.1f}s, "
            f"fleet stopped {stopped_after:.1f}s later"
        )
        assert code == 0, log

        # -- outcomes ------------------------------------------------------------------
        runs = {run.id: run for run in store.runs()}
        label_of = {run_id: label for label, run_id in ids.items()}
        assert set(runs) == set(label_of)
        for label, workflow, data in items:
            run = runs[ids[label]]
            assert run.workflow == workflow
            if label in EXPECTED_FAILURE:
                code_, step, texts = EXPECTED_FAILURE[label]
                assert run.status is RunStatus.FAILED, (label, run)
                assert run.error is not None
                assert (run.error.code, run.error.step) == (code_, step), (label, run.error)
                for text in texts:
                    assert text in run.error.message, (label, run.error.message)
            else:
                assert run.status is RunStatus.COMPLETED, (label, run, log)
                assert run.output == poison_app.expected_output(data["n"]), label
        recovered = sorted(
            run.recoveries for run in runs.values() if run.workflow == "good" and run.recoveries
        )
        print(f"[{backend.name}] good runs taken over from dead workers: recoveries {recovered}")
        # A run taken over from a dead worker runs alone, so the poison run dies alone:
        # an innocent run caught in the first death is recovered once and completes.
        twice = [run for run in runs.values() if run.workflow == "good" and run.recoveries > 1]
        assert not twice, f"innocent runs recovered more than once: {twice}\n{log}"
        hardexit = runs[ids["hardexit"]]
        assert hardexit.recoveries == HARDEXIT_EXECUTIONS, hardexit
        # Claims also count hand-backs (a worker already holding a recovered run hands a
        # second one back unexecuted), so only a lower bound is exact.
        assert hardexit.attempt >= HARDEXIT_EXECUTIONS + 1, hardexit
        rows = {row.name: row for row in store.steps(hardexit.id)}
        assert rows["prepare"].output == "prepared", "its checkpoint survived three deaths"

        # -- executions ----------------------------------------------------------------
        executions = poison_app.read_ledger(ledger)
        per_run: dict[str, list[tuple[str, int]]] = {}
        for _, step, run_id, pid in executions:
            per_run.setdefault(label_of[run_id], []).append((step, pid))
        assert "damaged" not in per_run, "a run with a damaged input must not execute"
        assert per_run["hardexit"][0][0] == "prepare", per_run["hardexit"]
        assert Counter(step for step, _ in per_run["hardexit"]) == {
            "prepare": 1,
            "die": HARDEXIT_EXECUTIONS,
        }, per_run["hardexit"]
        died_of_os_exit = [pid for step, pid in per_run["hardexit"] if step == "die"]
        assert len(set(died_of_os_exit)) == HARDEXIT_EXECUTIONS, "os._exit kills its process"
        for label in ("sysexit", "cancel-raise", "cancel-await", "unstorable"):
            assert label in per_run, f"the {label} step never ran"
            runs_of = per_run[label]
            # Never retried: an earlier execution exists only if its process was killed
            # (by another run's os._exit) before it could record the failure.
            for _, pid in runs_of[:-1]:
                assert pid in died_of_os_exit, (label, runs_of, died_of_os_exit)

        # -- processes -----------------------------------------------------------------
        started = [int(m.group(2)) for m in STARTED.finditer(log)]
        deaths = [(int(m.group(2)), m.group(3)) for m in DIED.finditer(log)]
        stopped = [int(m.group(1)) for m in STOPPED.finditer(log)]
        assert sorted(pid for pid, _ in deaths) == sorted(died_of_os_exit), log
        assert {how for _, how in deaths} == {"exited 1"}, deaths
        assert len(started) == PROCESSES + HARDEXIT_EXECUTIONS, "one restart per death"
        assert len(set(started)) == len(started)
        assert len(stopped) == len(set(stopped)) == PROCESSES, log
        assert set(started) == set(died_of_os_exit) | set(stopped), log
        assert not set(died_of_os_exit) & set(stopped)
        for pid in {pid for _, _, _, pid in executions}:
            assert pid in started, f"pid {pid} ran a step but was not started by the fleet"
        for forbidden in ("cannot start", "did not stop in time", "Traceback"):
            assert forbidden not in log, log
        assert not re.search(r"worker process #\d+ exited", log), log
        assert "all worker processes stopped" in log
    finally:
        store.close()
