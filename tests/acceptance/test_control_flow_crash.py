"""Real worker processes killed with SIGKILL in the middle of a sleep, a wait for an
event and a parallel group: the outcome equals an uninterrupted run's, every step that
completed ran once, and no run is left stuck.

Workers (``crash_worker.py``) announce ``READY <run> <step>`` on stdout when a step is
parked; the test reads those lines with ``select`` and kills the worker then. Where the
moment to kill is "the run is suspended", the test observes the run's status in the
database (a bounded loop of reads: observation, not timing).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import run

from reflow_adapters.sqlite import SQLiteStorage
from reflow_core import Engine, RunStatus, StepStatus

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("crash_worker.py")
_spec = importlib.util.spec_from_file_location("crash_worker", WORKER)
assert _spec is not None and _spec.loader is not None
crash_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crash_worker)


class Worker:
    """One worker process; its stdout lines are read with a deadline."""

    def __init__(self, db: Path, ledger: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(db), str(ledger)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.expect("STARTED")

    def expect(self, prefix: str, within: float = 15) -> str:
        """The next stdout line, which must start with ``prefix``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"worker did not print {prefix!r} within {within}s")
            readable, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if readable:
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"worker exited ({self.proc.poll()}) before {prefix!r}")
                if line.startswith(prefix):
                    return line.strip()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no lease release, no final writes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()


class Setup:
    def __init__(self, tmp_path: Path, workers: list[Worker]) -> None:
        self.db = tmp_path / "reflow.db"
        self.ledger = crash_worker.Ledger(str(tmp_path / "ledger.db"))
        self._workers = workers
        self._tmp = tmp_path

    def worker(self) -> Worker:
        worker = Worker(self.db, Path(self.ledger.path))
        self._workers.append(worker)
        return worker

    def engine(self) -> tuple[Engine, SQLiteStorage]:
        """An engine in the test process: enqueues, sends events, reads; never executes."""
        workflows, _ = crash_worker.build(self.ledger)
        storage = SQLiteStorage(self.db)
        return Engine(storage, workflows, poll_interval=0.05, use_plugins=False), storage


async def _until_status(engine: Engine, run_id: str, status: RunStatus) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        view = await engine.get_run(run_id)
        if view is not None and view.run.status is status:
            return
        await asyncio.sleep(0.02)  # observation of another process, not synchronisation
    raise AssertionError(f"run {run_id} never became {status}")


async def _control(engine: Engine, workflow: str, event: Any = None) -> Any:
    """The same workflow, uninterrupted, on the surviving worker: its output."""
    control = await engine.enqueue(workflow, {"n": 4, "crash": False})
    if event is not None:
        assert await engine.send_event(control.id, "go", event)
    done = await engine.wait_for(control.id, within=15)
    assert done.status is RunStatus.COMPLETED
    return done.output


def test_sigkill_during_and_after_a_durable_sleep(tmp_path: Path, workers: list[Worker]) -> None:
    setup = Setup(tmp_path, workers)

    async def scenario() -> None:
        engine, storage = setup.engine()
        try:
            run_ = await engine.enqueue("sleeper", {"n": 4, "crash": True})
            first = setup.worker()
            await _until_status(engine, run_.id, RunStatus.SLEEPING)
            view = await engine.get_run(run_.id)
            assert view is not None
            wake_at = view.run.wake_at
            first.kill()  # killed mid-sleep (the run holds no lease)
            second = setup.worker()
            second.expect(f"READY {run_.id} after")  # woke, parked in the step after
            second.kill()  # killed while holding the lease
            setup.worker()
            done = await engine.wait_for(run_.id, within=15)
            assert done.status is RunStatus.COMPLETED
            assert done.output == await _control(engine, "sleeper")
            assert done.output == {"prev": 40, "seen": ["before"]}
            finished = await engine.get_run(run_.id)
            assert finished is not None
            assert [s.status for s in finished.steps] == [StepStatus.COMPLETED] * 3
            assert wake_at is not None and done.updated_at >= wake_at
            assert setup.ledger.counts(run_.id) == {"before": 1, "started:nap": 1, "after": 2}
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_sigkill_while_waiting_for_an_event(tmp_path: Path, workers: list[Worker]) -> None:
    setup = Setup(tmp_path, workers)

    async def scenario() -> None:
        engine, storage = setup.engine()
        try:
            run_ = await engine.enqueue("waiter", {"n": 4, "crash": True})
            first = setup.worker()
            await _until_status(engine, run_.id, RunStatus.WAITING)
            first.kill()
            # Delivered while no worker is alive: buffered durably.
            assert await engine.send_event(run_.id, "go", {"ok": True})
            second = setup.worker()
            second.expect(f"READY {run_.id} after")
            second.kill()  # after the event was consumed and checkpointed
            setup.worker()
            done = await engine.wait_for(run_.id, within=15)
            assert done.status is RunStatus.COMPLETED
            assert done.output == await _control(engine, "waiter", {"ok": True})
            assert done.output == {"prev": {"ok": True}, "seen": ["before", "go"]}
            assert setup.ledger.counts(run_.id) == {"before": 1, "started:go": 1, "after": 2}
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_sigkill_in_a_parallel_group(tmp_path: Path, workers: list[Worker]) -> None:
    setup = Setup(tmp_path, workers)

    async def scenario() -> None:
        engine, storage = setup.engine()
        try:
            run_ = await engine.enqueue("fanout", {"n": 4, "crash": True})
            first = setup.worker()
            first.expect(f"READY {run_.id} b")  # a is checkpointed, b is in flight
            first.kill()
            setup.worker()
            done = await engine.wait_for(run_.id, within=15)
            assert done.status is RunStatus.COMPLETED
            assert done.output == await _control(engine, "fanout")
            assert done.output == {
                "prev": {"a": 41, "b": 42},
                "seen": ["a", "b", "before", "group"],
            }
            assert setup.ledger.counts(run_.id) == {"before": 1, "a": 1, "b": 2, "after": 1}
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
