"""``reflow worker`` as real processes: a supervised fleet, graceful stop, crash restart.

The app is ``worker_app.py`` next to this file, imported by each worker process through
PYTHONPATH. Every wait is a bounded loop observing the storage, the files the ``hold``
step writes, or the workers' log: nothing is synchronised by sleeping.
"""

from __future__ import annotations

import asyncio
import importlib.util
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
            [sys.executable, "-m", "reflow_cli", "worker", *args],
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


# -- a worker that cannot start: one line, exit code 2, never restarted -----------------

SECRET = "s3cret-pw"
needs_psycopg = pytest.mark.skipif(
    importlib.util.find_spec("psycopg") is None, reason="the postgres extra is not installed"
)
BROKEN_APP = "raise RuntimeError('boom at import')\n"
CHILD_FAILS_APP = """
import sys

from reflow_core import ConfigError
from worker_app import workflows


def flows():
    # The supervisor's own check passes; its children (run with --supervisor-pid) fail.
    if "--supervisor-pid" in sys.argv:
        raise ConfigError("this app refuses to run in a supervised child")
    return workflows
"""


def reflow_worker(
    tmp_path: Path, *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``reflow worker ARGS`` to completion, stdout and stderr apart; a bounded wait."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    env.pop("REFLOW_STORAGE", None)
    return subprocess.run(
        [sys.executable, "-m", "reflow_cli", "worker", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["worker_app:workflows", "--storage", "nosuch://x"],
            ["worker cannot start", "no storage adapter serves URL scheme 'nosuch'",
             "install the package that provides its adapter"],
            id="unknown-scheme",
        ),
        pytest.param(
            ["worker_app:workflows", "--storage", f"postgresql://app:{SECRET}@127.0.0.1:1/db"],
            ["worker cannot start", "cannot open storage postgresql://app:***@127.0.0.1:1/db",
             "Connection refused", "check that the database server is running"],
            id="postgres-refused",
            marks=needs_psycopg,
        ),
        pytest.param(
            ["worker_app:workflows", "--storage", f"postgresql+x://app:{SECRET}@127.0.0.1:1/db"],
            ["worker cannot start", "invalid PostgreSQL DSN", "app:***@127.0.0.1:1/db"],
            id="postgres-bad-dsn",
            marks=needs_psycopg,
        ),
        pytest.param(
            ["worker_app:workflows", "--storage", "sqlite:///{tmp}/missing/dir/x.db"],
            ["worker cannot start", "cannot open storage sqlite:///",
             "unable to open database file", "missing/dir does not exist: create it"],
            id="sqlite-missing-directory",
        ),
        pytest.param(
            ["no_such_module_xyz:flows", "--storage", "sqlite:///x.db"],
            ["worker cannot start", "cannot import module 'no_such_module_xyz'", "PYTHONPATH"],
            id="target-module-missing",
        ),
        pytest.param(
            ["broken_app:flows", "--storage", "sqlite:///x.db"],
            ["worker cannot start",
             "importing module 'broken_app' raised RuntimeError: boom at import"],
            id="target-module-raises",
        ),
        pytest.param(
            ["worker_app:not_a_workflow", "--storage", "sqlite:///x.db"],
            ["worker cannot start", "worker_app:not_a_workflow is int; expected an Engine"],
            id="target-not-a-workflow",
        ),
        pytest.param(
            ["worker_app:workflows", "--storage", "sqlite:///x.db", "--grace", "nan"],
            ["worker cannot start", "invalid --grace nan"],
            id="grace-nan",
        ),
        pytest.param(
            ["worker_app:workflows", "--storage", "sqlite:///x.db", "--lease", "0.001"],
            ["worker cannot start", "invalid --lease", "between 10 ms"],
            id="lease-too-short",
        ),
        pytest.param(
            ["worker_app:workflows", "--storage", "sqlite:///x.db", "--concurrency", "0"],
            ["Invalid value for '--concurrency'", "reflow worker --help"],
            id="concurrency-zero",
        ),
    ],
)  # fmt: skip
def test_a_worker_that_cannot_start_says_why_in_one_line_and_exits_2(
    tmp_path: Path, args: list[str], expected: list[str]
) -> None:
    (tmp_path / "broken_app.py").write_text(BROKEN_APP)
    result = reflow_worker(tmp_path, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for text in expected:
        assert text in result.stderr
    assert SECRET not in result.stderr
    assert "worker ready" not in result.stderr


def test_debug_log_level_adds_the_traceback(tmp_path: Path) -> None:
    result = reflow_worker(
        tmp_path, "worker_app:workflows", "--storage", "nosuch://x", "--log-level", "debug"
    )
    assert result.returncode == 2, result.stderr
    assert "worker cannot start: cannot open storage nosuch://x" in result.stderr
    assert "Traceback" in result.stderr
    assert "AdapterNotFoundError" in result.stderr


def test_a_fleet_with_an_unusable_storage_exits_2_before_starting_workers(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'x.db'}"
    began = time.monotonic()
    result = reflow_worker(tmp_path, "worker_app:workflows", "--storage", url, "--processes", "2")
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - began < 30
    assert "Traceback" not in result.stderr
    assert "started (pid" not in result.stderr, "no worker process may be started, or restarted"
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "worker cannot start: cannot open storage" in result.stderr
    assert "does not exist" in result.stderr


def test_supervisor_does_not_restart_a_worker_that_cannot_start(tmp_path: Path) -> None:
    (tmp_path / "child_fails.py").write_text(CHILD_FAILS_APP)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = reflow_worker(tmp_path, "child_fails:flows", "--storage", url, "--processes", "2")
    assert result.returncode == 2, result.stderr
    log = result.stderr
    assert "Traceback" not in log
    # Each slot was started once and never again: no restart loop.
    assert log.count("worker process #1 started") == 1, log
    assert log.count("worker process #2 started") == 1, log
    assert "restarting in" not in log
    assert "worker cannot start: calling child_fails:flows() failed: this app refuses" in log
    # The supervisor says once why it stops the fleet.
    assert log.count("cannot start (exit code 2, reason above); not restarting it") == 1, log
    assert "all worker processes stopped" in log
