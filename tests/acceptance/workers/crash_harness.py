"""Test-side helpers: worker processes that can be followed, stopped, killed and reaped,
and synchronous access to the store from the test process.

Imported by the acceptance tests after they put this directory on ``sys.path`` (tests
have no packages). Nothing here sleeps to synchronise: waits are bounded loops on
something observable (a line on a pipe via ``select``, a row in storage).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from crash_app import FIVE, GATED
from crash_ledger import Execution

from reflow_core import (
    Engine,
    RunFilter,
    RunStatus,
    StepResult,
    WorkflowRun,
    open_storage,
)

__all__ = [
    "APP",
    "Fleet",
    "Store",
    "WorkerProcess",
    "by_step",
    "overlaps",
    "process_state",
    "store_url",
    "wait_until",
]

APP = Path(__file__).resolve().parent / "crash_app.py"
T = TypeVar("T")


def wait_until(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.05) -> T:
    """Poll ``check`` until it returns something other than ``None``/``False``.

    The interval between polls is not synchronisation: ``check`` reads observable state,
    and only its answer ends the wait. Fails with ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


_STAMP = re.compile(r"^(.*) @(\d+)$")


def _split_stamp(raw: str) -> tuple[str, int]:
    """A worker's line without its trailing `` @<ns>`` stamp, and the stamp (0 if none)."""
    match = _STAMP.match(raw)
    if match is None:
        return raw, 0
    return match.group(1), int(match.group(2))


class WorkerProcess:
    """One ``crash_app.py`` process.

    Its stdout is a pipe read without blocking (``select``), or a file when
    ``stdout_to_file`` (for long runs nobody follows live); stderr always goes to a file.
    :attr:`lines` holds the lines without their time stamps, :attr:`stamps` the stamps
    (``time.time_ns()`` in the worker when the fact happened), index for index.
    """

    def __init__(
        self,
        store_url: str,
        ledger: Path,
        log_dir: Path,
        name: str,
        *,
        concurrency: int = 1,
        lease: float = 1.0,
        heartbeat: float = 0.2,
        poll: float = 0.05,
        hold: str | None = None,
        pause_after: str | None = None,
        work_ms: tuple[int, int] = (0, 0),
        stdout_to_file: bool = False,
        pause_before: str | None = None,
        skew_ms: int = 0,
        hang_heartbeats_after: int | None = None,
        claims_hang_too: bool = False,
        log_heartbeats: bool = False,
        worker_id: str | None = None,
    ) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self.stdout_path = log_dir / f"{name}.stdout" if stdout_to_file else None
        command = [
            sys.executable,
            str(APP),
            store_url,
            str(ledger),
            f"--concurrency={concurrency}",
            f"--lease={lease}",
            f"--heartbeat={heartbeat}",
            f"--poll={poll}",
            f"--work-ms={work_ms[0]},{work_ms[1]}",
        ]
        if hold is not None:
            command.append(f"--hold={hold}")
        if pause_after is not None:
            command.append(f"--pause-after={pause_after}")
        if pause_before is not None:
            command.append(f"--pause-before={pause_before}")
        if skew_ms:
            command.append(f"--skew-ms={skew_ms}")
        if hang_heartbeats_after is not None:
            command.append(f"--hang-heartbeats-after={hang_heartbeats_after}")
        if claims_hang_too:
            command.append("--claims-hang-too")
        if log_heartbeats:
            command.append("--log-heartbeats")
        command.append(f"--worker-id={worker_id or name}")
        self.lines: list[str] = []
        self.stamps: list[int] = []
        self.paused_at = 0
        self._partial = b""
        self._eof = False
        with self.stderr_path.open("wb") as stderr, _open_or_pipe(self.stdout_path) as stdout:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=stderr,
                bufsize=0,
            )
        self.pid = self.proc.pid

    def __repr__(self) -> str:
        return f"<worker {self.name} pid={self.pid} rc={self.proc.returncode}>"

    # -- output -----------------------------------------------------------------

    def _read(self, timeout: float) -> bool:
        """Read what the pipe has within ``timeout`` seconds into :attr:`lines`; ``True`` if
        anything (or the end of the stream) was read."""
        stdout = self.proc.stdout
        if stdout is None or self._eof:
            return False
        ready, _, _ = select.select([stdout], [], [], max(timeout, 0.0))
        if not ready:
            return False
        data = os.read(stdout.fileno(), 65536)
        if not data:
            self._eof = True
            data = b"\n" if self._partial else b""
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            line, stamp = _split_stamp(raw.decode())
            self.lines.append(line)
            self.stamps.append(stamp)
        return True

    def output(self) -> list[str]:
        """Every stdout line so far (from the file when stdout goes to one)."""
        return [line for _, line in self.timed()]

    def timed(self) -> list[tuple[int, str]]:
        """Every stdout line so far with its stamp: ``(ns, line)``."""
        if self.stdout_path is not None:
            return [
                (stamp, line)
                for line, stamp in map(_split_stamp, self.stdout_path.read_text().splitlines())
            ]
        self._read(0)
        return list(zip(self.stamps, self.lines, strict=True))

    def matching(self, pattern: str, since: int = 0) -> list[tuple[int, re.Match[str]]]:
        """Every line so far from index ``since`` matching ``pattern``: ``(stamp, match)``."""
        regex = re.compile(pattern)
        found = []
        for stamp, line in self.timed()[since:]:
            match = regex.search(line)
            if match:
                found.append((stamp, match))
        return found

    def stderr(self) -> str:
        """What the process wrote to stderr so far."""
        return self.stderr_path.read_text()

    def expect(self, pattern: str, timeout: float = 20.0, since: int = 0) -> re.Match[str]:
        """The first stdout line from index ``since`` matching ``pattern``, waiting for it."""
        return self.expect_at(pattern, timeout, since)[1]

    def expect_at(
        self, pattern: str, timeout: float = 20.0, since: int = 0
    ) -> tuple[int, re.Match[str]]:
        """Like :meth:`expect`, with the matching line's index in :attr:`lines`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = since
        while True:
            for index in range(index, len(self.lines)):  # noqa: B020 - resumes the scan
                match = regex.search(self.lines[index])
                if match:
                    return index, match
            index = len(self.lines)
            remaining = deadline - time.monotonic()
            if self._eof or remaining <= 0:
                state = "exited" if self._eof else f"printed nothing matching within {timeout:g}s"
                raise AssertionError(
                    f"worker {self.name} (pid {self.pid}) {state}, expected /{pattern}/\n"
                    f"stdout:\n" + "\n".join(self.lines[-40:]) + f"\nstderr:\n{self.stderr()}"
                )
            self._read(remaining)

    # -- control ----------------------------------------------------------------

    def release(self) -> None:
        """Send the go-ahead line a ``--hold`` step is waiting for."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    def pause(self) -> int:
        """SIGSTOP: the process (and its heartbeats) stop dead, holding whatever it holds.

        Returns once the stop took effect and everything printed before it was read: the
        index in :attr:`lines` of the first line printed after :meth:`resume`. The time
        just before the signal (``time.time_ns()``) is kept in :attr:`paused_at`.
        """
        self.paused_at = time.time_ns()
        os.kill(self.pid, signal.SIGSTOP)
        wait_until("SIGSTOP to take effect", lambda: process_state(self.pid) == "T", 5, 0.005)
        while self._read(0):
            pass
        return len(self.lines)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> int:
        """SIGKILL and reap; returns the kill time (``time.time_ns()`` just before the signal)."""
        killed_at = time.time_ns()
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._drain()
        return killed_at

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful stop), reading stdout to the end; returns the exit status."""
        self.terminate()
        self._drain(timeout)
        return self.proc.wait(timeout=timeout)

    def terminate(self) -> int:
        """SIGTERM without waiting (the engine's ``stop(grace=0)``); returns the signal time
        (``time.time_ns()`` just before it)."""
        sent = time.time_ns()
        self.proc.send_signal(signal.SIGTERM)
        return sent

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Read stdout to the end and reap the process; its exit status."""
        self._drain(timeout)
        return self.proc.wait(timeout=timeout)

    def _drain(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stdout_path is None and not self._eof and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())

    def close(self) -> None:
        """Kill (if still running) and reap the process, and close its pipes. Idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a SIGSTOPped process too
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


def _open_or_pipe(path: Path | None) -> contextlib.AbstractContextManager[Any]:
    """A file to write to, or (as a no-op context) ``subprocess.PIPE``."""
    return contextlib.nullcontext(subprocess.PIPE) if path is None else path.open("wb")


class Fleet:
    """Starts worker processes and, on exit, kills and reaps every one it started."""

    def __init__(self, store_url: str, ledger: Path, log_dir: Path) -> None:
        self.store_url = store_url
        self.ledger = ledger
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(self, name: str, **options: Any) -> WorkerProcess:
        """A new worker (options as for :class:`WorkerProcess`)."""
        worker = WorkerProcess(self.store_url, self.ledger, self.log_dir, name, **options)
        self.started.append(worker)
        return worker

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for worker in self.started:
            worker.close()


class Store:
    """The store under test, read and written synchronously from the test process.

    One event loop (an :class:`asyncio.Runner`) serves the adapter for its whole life.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._runner = asyncio.Runner()
        self.storage = open_storage(url)
        try:
            self._await(self.storage.initialize())
        except BaseException:
            self.close()
            raise

    def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def enqueue(self, inputs: Iterable[int], workflow: str = "five") -> list[str]:
        """Enqueue one run of ``workflow`` (``five`` or ``gated``) per ``n``; their ids, in
        order."""
        engine = Engine(self.storage, [FIVE, GATED], use_plugins=False)

        async def enqueue_all() -> list[str]:
            return [(await engine.enqueue(workflow, {"n": n})).id for n in inputs]

        return self._await(enqueue_all())

    def now(self) -> int:
        """The store's clock (ms), the one that judges leases."""
        return self._await(self.storage.now())

    def run(self, run_id: str) -> WorkflowRun:
        """A run that must exist."""
        found = self._await(self.storage.get_run(run_id))
        assert found is not None, f"run {run_id} is missing"
        return found

    def steps(self, run_id: str) -> list[StepResult]:
        """A run's step rows."""
        return self._await(self.storage.get_step_results(run_id))

    def runs(self, status: RunStatus | None = None) -> list[WorkflowRun]:
        """Every run (optionally of one status), paging through ``list_runs``."""

        async def collect() -> list[WorkflowRun]:
            found: list[WorkflowRun] = []
            while True:
                last = found[-1] if found else None
                page = await self.storage.list_runs(
                    RunFilter(
                        status=status,
                        before=None if last is None else last.created_at,
                        before_id=None if last is None else last.id,
                        limit=500,
                    )
                )
                found.extend(page)
                if len(page) < 500:
                    return found

        return self._await(collect())

    def close(self) -> None:
        """Close the adapter and the event loop."""
        try:
            self._await(self.storage.close())
        finally:
            self._runner.close()


def overlaps(
    executions: Iterable[Execution], killed: Mapping[int, int] | None = None
) -> list[tuple[Execution, Execution]]:
    """Pairs of executions of the same ``(run, step)`` that ran at the same time: the later
    one started before the earlier one finished. An execution that never finished ends
    when its process was SIGKILLed (``killed``: pid to kill time), else never."""
    killed = killed or {}
    groups: dict[tuple[str, str], list[Execution]] = {}
    for execution in executions:
        groups.setdefault((execution.run_id, execution.step), []).append(execution)
    found = []
    for group in groups.values():
        for i, earlier in enumerate(group):
            for later in group[i + 1 :]:
                ended = earlier.finished_ns or killed.get(earlier.pid)
                if ended is None or later.started_ns < ended:
                    found.append((earlier, later))
    return found


def by_step(executions: Iterable[Execution]) -> dict[str, list[Execution]]:
    """Executions grouped by step name, each group in start order."""
    grouped: dict[str, list[Execution]] = {}
    for execution in executions:
        grouped.setdefault(execution.step, []).append(execution)
    return grouped


def store_url(backend: str, tmp_path: Path, request: Any) -> str:
    """A fresh, empty store's URL: a SQLite file in ``tmp_path``, or for ``postgres`` a unique
    schema from the ``pg_schema`` fixture of ``tests/postgres_fixtures.py`` (skipped or
    failed per that module's rules, dropped after the test). The test module must import
    the ``pg_dsn`` and ``pg_schema`` fixtures."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    from reflow_adapters.postgres import PostgresStorage

    dsn: str = request.getfixturevalue("pg_dsn")
    schema: str = request.getfixturevalue("pg_schema")
    url = PostgresStorage(dsn, schema=schema).url  # no I/O: the URL names the schema
    assert url is not None
    return url


def process_state(pid: int) -> str:
    """The one-letter scheduler state of a process (``T`` once SIGSTOP took effect)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]
