"""``reflow worker`` as real processes: a supervised fleet, graceful stop, crash restart.

The app is ``worker_app.py`` next to this file, imported by each worker process through
PYTHONPATH. Every wait is a bounded loop observing the storage, the files the ``hold``
step writes, or the workers' log: nothing is synchronised by sleeping.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reflow_core import Engine, RunFilter, RunStatus, open_storage

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import worker_app  # noqa: E402

pytestmark = pytest.mark.slow


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def statuses(url: str) -> dict[str, RunStatus]:
    async def read() -> dict[str, RunStatus]:
        storage = open_storage(url)
        try:
            await storage.initialize()
            return {r.id: r.status for r in await storage.list_runs(RunFilter(limit=1000))}
        finally:
            await storage.close()

    return asyncio.run(read())


def enqueue(url: str, *items: tuple[str, dict[str, Any]]) -> list[str]:
    async def go() -> list[str]:
        engine = Engine(url, worker_app.workflows)
        try:
            return [(await engine.enqueue(name, data)).id for name, data in items]
        finally:
            await engine.stop()

    return asyncio.run(go())


class Worker:
    """``reflow worker`` in a subprocess, logging to a file the test can read."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.log_path = tmp_path / "worker.log"
        self._log = self.log_path.open("w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reflow_core.cli", "worker", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def count(self, text: str) -> int:
        return self.log().count(text)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def run_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(*args: str) -> Worker:
        worker = Worker(tmp_path, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def test_fleet_finishes_work_and_stops_gracefully_on_sigterm(
    tmp_path: Path, run_worker: Callable[..., Worker]
) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    enqueue(url)  # create the schema before two processes race to migrate it
    worker = run_worker(
        "worker_app:workflows", "--storage", url, "--processes", "2", "--grace", "2",
        "--poll", "0.1",
    )  # fmt: skip
    wait_until("two ready workers", lambda: worker.count("worker ready") == 2)
    quick = enqueue(url, *[("quick", {"n": n}) for n in range(5)])
    finishes, stuck = enqueue(
        url,
        ("hold", {"dir": str(tmp_path), "name": "finishes"}),
        ("hold", {"dir": str(tmp_path), "name": "stuck"}),
    )
    wait_until(
        "quick runs done and both hold steps running",
        lambda: (
            all(statuses(url)[r] is RunStatus.COMPLETED for r in quick)
            and (tmp_path / "finishes.started").exists()
            and (tmp_path / "stuck.started").exists()
        ),
    )

    stopping = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    wait_until("both workers to stop claiming", lambda: worker.count("stop claiming") == 2)
    (tmp_path / "finishes.go").touch()  # within the grace period: this run may finish
    assert worker.proc.wait(timeout=15) == 0, worker.log()
    assert time.monotonic() - stopping < 2 + 5, "the grace period should bound the stop"

    final = statuses(url)
    assert final[finishes] is RunStatus.COMPLETED, worker.log()
    assert final[stuck] is RunStatus.PENDING, "an interrupted run must be released, not held"
    log = worker.log()
    assert log.count("(quick) completed in") == 5
    assert f"run {finishes} (hold) completed in" in log
    assert "all worker processes stopped" in log


def test_supervisor_restarts_a_crashed_worker(
    tmp_path: Path, run_worker: Callable[..., Worker]
) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    enqueue(url)
    worker = run_worker("worker_app:workflows", "--storage", url, "--processes", "2")
    wait_until("two worker processes", lambda: worker.count("worker ready") == 2)
    first = re.search(r"worker process #1 started \(pid (\d+)\)", worker.log())
    assert first is not None
    os.kill(int(first.group(1)), signal.SIGKILL)
    wait_until("the restart", lambda: "was killed by SIGKILL" in worker.log())
    wait_until("a third ready worker", lambda: worker.count("worker ready") == 3)
    assert worker.count("worker process #1 started") == 2

    # The restarted fleet still works, then stops cleanly.
    [run] = enqueue(url, ("quick", {"n": 21}))
    wait_until("the run", lambda: statuses(url)[run] is RunStatus.COMPLETED)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=15) == 0, worker.log()


def test_single_process_worker_with_a_factory_target_stops_on_sigint(
    tmp_path: Path, run_worker: Callable[..., Worker]
) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    worker = run_worker("worker_app:make_workflows", "--storage", url, "--poll", "0.1")
    wait_until("the worker", lambda: worker.count("worker ready") == 1)
    [run] = enqueue(url, ("quick", {"n": 1}))
    wait_until("the run", lambda: statuses(url)[run] is RunStatus.COMPLETED)
    worker.proc.send_signal(signal.SIGINT)
    assert worker.proc.wait(timeout=15) == 0, worker.log()
    assert "SIGINT: stop claiming" in worker.log()
    assert f"run {run} (quick) completed in" in worker.log()
