"""The SQLite adapters under faults beyond one call's error, on real files:

* the database file deleted or replaced under a running adapter: it refuses every call
  with a ``StorageError`` that names the path, instead of committing to the orphan;
* a small volume (a real 3 MB tmpfs): the WAL is checkpointed and stays small, and after
  a disk-full error the store recovers by itself once space is freed, with the failing
  call a ``StorageError`` and nothing half-written;
* a connection thread that dies: every pending and later caller gets ``StorageError``
  within a bound, and ``close()`` returns.

Both adapters share ``reflow_adapters.sqlite_common``, so every test runs against both.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reflow_adapters.apsw import APSWStorage
from reflow_adapters.sqlite import SQLiteStorage
from reflow_adapters.sqlite_common import SQLiteStorageBase, files, migrate, worker
from reflow_adapters.sqlite_common.driver import Connection
from reflow_core import (
    RunFilter,
    RunStatus,
    StepResult,
    StepStatus,
    StorageError,
    WorkflowRun,
)

T = TypeVar("T")
ADAPTERS = [pytest.param(SQLiteStorage, id="sqlite"), pytest.param(APSWStorage, id="apsw")]
BOUND_S = 5.0
"""How long any caller may wait for an answer once something broke."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_run(run_id: str, created_at: int = 1, payload: Any = None) -> WorkflowRun:
    return WorkflowRun(
        id=run_id,
        workflow="wf",
        input={"n": run_id, "payload": payload},
        status=RunStatus.PENDING,
        created_at=created_at,
        updated_at=created_at,
    )


def make_step(run_id: str, name: str, output: Any = None) -> StepResult:
    return StepResult(
        id=f"{run_id}:{name}",
        run_id=run_id,
        name=name,
        status=StepStatus.COMPLETED,
        output=output,
        created_at=2,
        updated_at=2,
    )


def stored_ids(path: Path) -> set[str]:
    """The run ids in the file at ``path``, read by a connection of the test's own."""
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM reflow_runs")}
    finally:
        conn.close()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


async def within(awaitable: Coroutine[Any, Any, T]) -> T:
    """Await with the bound: a hang fails the test instead of stalling the run."""
    return await asyncio.wait_for(awaitable, BOUND_S)


async def every_call_fails(storage: SQLiteStorageBase, match: str) -> None:
    """Every kind of call (writer, reader, point read, initialize) fails fast."""
    calls: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
        "create_run": lambda: storage.create_run(make_run("later")),
        "get_run": lambda: storage.get_run("a"),
        "claim_next_run": lambda: storage.claim_next_run(["wf"], lease_ms=60_000),
        "save_step_result": lambda: storage.save_step_result(make_step("a", "later")),
        "list_runs": lambda: storage.list_runs(RunFilter()),
        "list_schedules": lambda: storage.list_schedules(),
        "initialize": lambda: storage.initialize(),
    }
    for operation, call in calls.items():
        with pytest.raises(StorageError, match=match) as caught:
            await within(call())
        assert caught.value.operation == operation


# -- the database file deleted or replaced while open -----------------------------------


def _delete(path: Path) -> None:
    """``rm reflow.db*``: the file and its companions."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink()


def _restore_backup(path: Path) -> None:
    """Another file moved to the path (a restore from backup), as one rename."""
    other = path.with_name("restored.db")
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    os.replace(other, path)


def _delete_wal(path: Path) -> None:
    """A "cleanup" that removes the write-ahead log of a database in use."""
    Path(f"{path}-wal").unlink()


CHANGES = {"deleted": _delete, "replaced": _restore_backup, "wal-deleted": _delete_wal}


@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("first_call", ["write", "scan"])
def test_a_deleted_or_replaced_database_file_stops_every_call(
    cls: type[SQLiteStorageBase], change: str, first_call: str, tmp_path: Path
) -> None:
    path = tmp_path / "reflow.db"

    async def scenario() -> None:
        storage = cls(path)
        await storage.initialize()
        assert (await storage.create_run(make_run("a"))).created
        CHANGES[change](path)
        await asyncio.sleep(files.CHECK_INTERVAL_S * 2)  # the default throttle, unpatched
        # The very next call fails, whichever thread it goes to, naming the path.
        if first_call == "write":
            call = storage.create_run(make_run("orphaned"))
        else:
            call = storage.list_runs(RunFilter())
        with pytest.raises(StorageError, match="deleted or replaced while open") as caught:
            await within(call)
        assert str(path) in str(caught.value)
        assert "restart the worker" in str(caught.value)
        await every_call_fails(storage, "deleted or replaced while open")
        await within(storage.close())
        await storage.close()

    run(scenario())
    if change == "wal-deleted":
        # The file kept its identity; the refused write is nowhere.
        assert stored_ids(path) == {"a"}
        assert integrity(path) == "ok"


@pytest.mark.parametrize("cls", ADAPTERS)
def test_runs_enqueued_in_the_new_file_are_not_stranded(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    """The reported case: the file is replaced, a new process enqueues into the new file;
    the old worker must stop (so that it is restarted onto the new file), and closing it
    must leave the new database, WAL and all, intact."""
    path = tmp_path / "reflow.db"

    async def scenario() -> None:
        old = cls(path)
        await old.initialize()
        await old.create_run(make_run("before"))
        _delete(path)
        fresh = cls(path)  # a process started after the change, with the new file
        await fresh.initialize()
        await fresh.create_run(make_run("enqueued"))
        await asyncio.sleep(files.CHECK_INTERVAL_S * 2)
        with pytest.raises(StorageError, match="deleted or replaced while open"):
            await within(old.claim_next_run(["wf"], lease_ms=60_000))
        await within(old.close())
        # Closing the orphan checkpointed nothing into, and deleted nothing of, the new
        # database's files at the same path.
        assert wal_bytes(path) > 0
        restarted = cls(path)
        await restarted.initialize()
        claimed = await restarted.claim_next_run(["wf"], lease_ms=60_000)
        assert claimed is not None and claimed.run.id == "enqueued"
        await restarted.close()
        await fresh.close()

    run(scenario())
    assert stored_ids(path) == {"enqueued"}
    assert integrity(path) == "ok"


@pytest.mark.parametrize("cls", ADAPTERS)
def test_moving_the_working_directory_or_a_symlink_is_no_replacement(
    cls: type[SQLiteStorageBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link.db").symlink_to(tmp_path / "a" / "real.db")
    monkeypatch.chdir(tmp_path / "a")

    async def scenario() -> None:
        relative = cls("relative.db")
        linked = cls(tmp_path / "link.db")
        await relative.initialize()
        await linked.initialize()
        os.chdir(tmp_path / "b")  # SQLite resolved the relative path at open
        for i in range(3):
            await asyncio.sleep(files.CHECK_INTERVAL_S * 2)
            assert (await relative.create_run(make_run(f"r{i}"))).created
            assert (await linked.create_run(make_run(f"r{i}"))).created
            assert len(await relative.list_runs(RunFilter())) == i + 1
            assert len(await linked.list_runs(RunFilter())) == i + 1
        await relative.close()
        await linked.close()

    run(scenario())
    assert stored_ids(tmp_path / "a" / "relative.db") == {"r0", "r1", "r2"}
    assert stored_ids(tmp_path / "a" / "real.db") == {"r0", "r1", "r2"}


# -- a small volume ------------------------------------------------------------------


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MB filesystem (tmpfs), mounted for the test and unmounted after it."""
    volume = tmp_path / "volume"
    volume.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 3 MB tmpfs for the disk-full tests needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(volume)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 3 MB tmpfs for the disk-full tests: {mounted.stderr.strip()}")
    try:
        yield volume
    finally:
        if subprocess.run(["umount", str(volume)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(volume)], check=False)


def free_bytes(volume: Path) -> int:
    stat = os.statvfs(volume)
    return stat.f_bavail * stat.f_frsize


def wal_bytes(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


@pytest.mark.parametrize("cls", ADAPTERS)
def test_the_wal_is_checkpointed_and_stays_small_on_a_small_volume(
    cls: type[SQLiteStorageBase], small_volume: Path
) -> None:
    """The reported case: the WAL alone filled a 3 MB disk after a few dozen runs."""
    path = small_volume / "reflow.db"

    async def scenario() -> None:
        storage = cls(path)
        await storage.initialize()
        for i in range(150):
            run_ = make_run(f"r{i:03}", payload="x" * 200)
            await storage.create_run(run_)
            claimed = await storage.claim_next_run(["wf"], lease_ms=60_000)
            assert claimed is not None
            for step in range(5):
                result = make_step(claimed.run.id, f"s{step}", output="y" * 200)
                assert await storage.save_step_result(result, claimed.lease_id)
            assert await storage.update_claimed_run_status(
                claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output={"ok": True}
            )
            assert wal_bytes(path) <= 1024 * 1024, f"after run {i}"
        await storage.close()

    run(scenario())
    assert len(stored_ids(path)) == 150
    assert integrity(path) == "ok"


class ManualClock:
    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.mark.parametrize("cls", ADAPTERS)
def test_a_full_disk_fails_cleanly_and_the_store_recovers_once_space_is_freed(
    cls: type[SQLiteStorageBase], small_volume: Path
) -> None:
    path = small_volume / "reflow.db"
    reserve = small_volume / "reserve"  # what the operator deletes to free space
    reserve.write_bytes(b"\1" * 512 * 1024)
    clock = ManualClock()
    is_full = cls.driver.is_full

    async def scenario() -> None:
        storage = cls(path, clock=clock)
        await storage.initialize()
        await storage.create_run(make_run("r"))
        claimed = await storage.claim_next_run(["wf"], lease_ms=60_000)
        assert claimed is not None
        error, last_written = await _fill_wal_with_heartbeats(
            storage, path, clock, claimed.lease_id
        )
        assert is_full(error.__cause__), error  # type: ignore[arg-type]
        assert error.operation == "heartbeat_run"
        # Nothing half-written: the run is as the last acknowledged heartbeat left it.
        stored = await within(storage.get_run("r"))
        assert stored is not None and stored.heartbeat_at == last_written
        # While the disk is full, a batch of calls each either lands or fails cleanly.
        calls = [storage.create_run(make_run(f"full{i}", payload="z" * 3000)) for i in range(4)]
        results = await within(asyncio.gather(*calls, return_exceptions=True))
        for i, result in enumerate(results):
            assert not isinstance(result, BaseException) or isinstance(result, StorageError)
            assert (await storage.get_run(f"full{i}") is not None) == (
                not isinstance(result, BaseException)
            )
        # The operator frees space (less than the WAL holds). No restart, not even
        # another call: the idle writer copies the WAL into the database and cuts it to
        # nothing (wal_checkpoint(TRUNCATE)), so the disk does not fill again at once.
        reserve.unlink()
        deadline = time.monotonic() + BOUND_S
        while wal_bytes(path) > 64 * 1024 or free_bytes(small_volume) < 2 * 1024 * 1024:
            assert time.monotonic() < deadline, (wal_bytes(path), free_bytes(small_volume))
            await asyncio.sleep(0.05)
        # And the next calls succeed.
        clock.now += 1
        assert await within(storage.heartbeat_run("r", claimed.lease_id))
        last_written = clock.now
        assert (await within(storage.create_run(make_run("after")))).created
        stored = await storage.get_run("r")
        assert stored is not None and stored.heartbeat_at == last_written
        assert await storage._call("check", _integrity) == "ok"
        await within(storage.close())

    run(scenario())
    assert {"r", "after"} <= stored_ids(path)
    assert integrity(path) == "ok"


def _integrity(conn: Connection) -> str:
    return str(conn.execute("PRAGMA integrity_check")[0][0])


def _wal_settings(conn: Connection) -> tuple[int, int]:
    return (
        int(conn.execute("PRAGMA wal_autocheckpoint")[0][0]),
        int(conn.execute("PRAGMA journal_size_limit")[0][0]),
    )


def test_wal_limits_are_sqlites_default_where_there_is_room() -> None:
    page = 4096
    assert migrate.wal_limits(100 * 2**30, page) == (1000, 2 * 1000 * (page + 24))
    pages, size_limit = migrate.wal_limits(3 * 2**20, page)  # a 3 MB volume
    assert pages * (page + 24) <= 3 * 2**20 // 8 + page
    assert size_limit == 2 * pages * (page + 24)
    assert migrate.wal_limits(0, page)[0] == migrate.MIN_WAL_AUTOCHECKPOINT_PAGES


@pytest.mark.parametrize("cls", ADAPTERS)
def test_the_writer_sizes_the_wal_to_its_volume(
    cls: type[SQLiteStorageBase], tmp_path: Path, small_volume: Path
) -> None:
    async def settings(path: Path) -> tuple[int, int]:
        storage = cls(path)
        await storage.initialize()
        try:
            return await storage._call("settings", _wal_settings)
        finally:
            await storage.close()

    roomy = run(settings(tmp_path / "roomy.db"))
    small = run(settings(small_volume / "small.db"))
    assert roomy == migrate.wal_limits(free_bytes(tmp_path), 4096)
    assert roomy[0] == 1000  # SQLite's default: where there is room, nothing changes
    assert small[0] < 100
    assert small[1] < 1024 * 1024


async def _fill_wal_with_heartbeats(
    storage: SQLiteStorageBase, path: Path, clock: ManualClock, lease_id: str
) -> tuple[StorageError, int | None]:
    """Heartbeat one run until the disk is full; the error and the last stored beat.

    Another process reading holds every checkpoint back, so the WAL grows until it alone
    fills the disk: the reported case (a WAL of many versions of a few pages), made
    deterministic.
    """
    # The adapter's own driver: two SQLite libraries in one process do not see each
    # other's POSIX locks, so a reader on the other one would hold nothing back.
    reader = type(storage).driver.connect(str(path))
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM reflow_runs")
    last_written = None
    try:
        for _ in range(5000):
            clock.now += 1
            try:
                assert await within(storage.heartbeat_run("r", lease_id))
            except StorageError as exc:
                return exc, last_written
            last_written = clock.now
        pytest.fail("the disk never filled")
    finally:
        reader.execute("ROLLBACK")
        reader.close()


@pytest.mark.parametrize("cls", ADAPTERS)
def test_a_fresh_adapter_on_a_volume_the_wal_filled_recovers_once_space_is_freed(
    cls: type[SQLiteStorageBase], small_volume: Path
) -> None:
    """The reported case's last part: a freshly started engine did not recover either."""
    path = small_volume / "reflow.db"
    reserve = small_volume / "reserve"
    reserve.write_bytes(b"\1" * 512 * 1024)
    clock = ManualClock()

    async def scenario() -> None:
        storage = cls(path, clock=clock)
        await storage.initialize()
        await storage.create_run(make_run("r"))
        claimed = await storage.claim_next_run(["wf"], lease_ms=60_000)
        assert claimed is not None
        error, last_written = await _fill_wal_with_heartbeats(
            storage, path, clock, claimed.lease_id
        )
        assert cls.driver.is_full(error.__cause__)  # type: ignore[arg-type]
        await within(storage.close())  # its checkpoint on close fails: no room
        assert wal_bytes(path) > 2 * 1024 * 1024  # the WAL alone fills the disk
        reserve.unlink()
        fresh = cls(path, clock=clock)
        await fresh.initialize()
        stored = await fresh.get_run("r")
        assert stored is not None and stored.heartbeat_at == last_written
        for i in range(60):
            created = await within(fresh.create_run(make_run(f"new{i}", payload="v" * 2000)))
            assert created.created
        assert wal_bytes(path) <= 512 * 1024
        assert free_bytes(small_volume) > 1024 * 1024
        listed = {r.id for r in await fresh.list_runs(RunFilter(limit=10_000))}
        assert listed == {"r"} | {f"new{i}" for i in range(60)}
        await fresh.close()

    run(scenario())
    assert integrity(path) == "ok"


# -- a connection thread that dies -------------------------------------------------------


class _Gate:
    """Holds the writer inside a job until released, so that later jobs queue up."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def job(self, conn: Connection) -> None:
        self.entered.set()
        assert self.release.wait(timeout=30)


def _raises(exc: BaseException, *, write: bool = True) -> Callable[[Connection], None]:
    """A job that raises ``exc`` halfway: after a write of its own, or a read."""

    def job(conn: Connection) -> None:
        if write:
            conn.execute("INSERT INTO reflow_schema_version VALUES (999, 'half', 0)")
        else:
            conn.execute("SELECT count(*) FROM reflow_runs")
        raise exc

    return job


FAULTS: dict[str, Callable[[], BaseException]] = {
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
}


@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_writer_thread_that_dies_fails_every_caller_and_close_returns(
    cls: type[SQLiteStorageBase], fault: str, tmp_path: Path
) -> None:
    path = tmp_path / "dies.db"

    async def scenario() -> None:
        storage = cls(path)
        await storage.initialize()
        await storage.create_run(make_run("a"))
        gate = _Gate()
        blocker = asyncio.ensure_future(storage._call("gate", gate.job))
        await asyncio.to_thread(gate.entered.wait)
        # Queued behind the gate, these run as one batch with the fault in the middle.
        calls: list[Coroutine[Any, Any, Any]] = [
            storage.create_run(make_run("b")),
            storage.get_run("a"),
            storage._call("fault", _raises(FAULTS[fault]())),
            storage.save_step_result(make_step("a", "s")),
            storage.claim_next_run(["wf"], lease_ms=60_000),
        ]
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(0)
        gate.release.set()
        await within(blocker)
        results = await within(asyncio.gather(*tasks, return_exceptions=True))
        for result in results:
            assert isinstance(result, StorageError), result
            assert "thread died" in str(result) and fault in str(result)
            assert isinstance(result.__cause__, BaseException)
            assert type(result.__cause__).__name__ == fault
        await every_call_fails(storage, "thread died")
        await within(storage.close())
        await storage.close()

    run(scenario())
    # Nothing of the batch in hand was committed.
    assert stored_ids(path) == {"a"}
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM reflow_steps").fetchone()[0] == 0
    assert conn.execute("SELECT max(version) FROM reflow_schema_version").fetchone()[0] < 999
    conn.close()


@pytest.mark.parametrize("cls", ADAPTERS)
def test_a_reader_thread_that_dies_fails_every_caller_and_close_returns(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    async def scenario() -> None:
        storage = cls(tmp_path / "reader.db")
        await storage.initialize()
        await storage.create_run(make_run("a"))
        with pytest.raises(StorageError, match="thread died") as caught:
            await within(storage._call("fault", _raises(SystemExit(1), write=False), scan=True))
        assert isinstance(caught.value.__cause__, SystemExit)
        await every_call_fails(storage, "thread died")
        await within(storage.close())

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_a_fault_in_the_writer_outside_any_job_fails_every_caller(
    cls: type[SQLiteStorageBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a job: whatever escapes the thread's own code ends it the same way."""

    async def scenario() -> None:
        storage = cls(tmp_path / "own.db")
        await storage.initialize()
        await storage.create_run(make_run("a"))
        writer = storage._writer
        assert writer is not None

        def broken(jobs: Any, outcomes: Any) -> None:
            raise RuntimeError("injected into the writer's answering")

        monkeypatch.setattr(writer, "_deliver", broken)
        with pytest.raises(StorageError, match="thread died") as caught:
            await within(storage.get_run("a"))
        assert isinstance(caught.value.__cause__, RuntimeError)
        await every_call_fails(storage, "thread died")
        await within(storage.close())

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_memory_error_in_a_job_fails_that_call_only(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    """Running out of memory (the stdlib driver's SQLITE_NOMEM) is a StorageError for its
    caller; its batch-mates and later calls go on."""

    async def scenario() -> None:
        storage = cls(tmp_path / "nomem.db")
        await storage.initialize()
        gate = _Gate()
        blocker = asyncio.ensure_future(storage._call("gate", gate.job))
        await asyncio.to_thread(gate.entered.wait)
        tasks = [
            asyncio.ensure_future(storage.create_run(make_run("a"))),
            asyncio.ensure_future(storage._call("nomem", _raises(MemoryError()))),
            asyncio.ensure_future(storage.create_run(make_run("b"))),
        ]
        await asyncio.sleep(0)
        gate.release.set()
        await within(blocker)
        first, nomem, last = await within(asyncio.gather(*tasks, return_exceptions=True))
        assert isinstance(nomem, StorageError) and isinstance(nomem.__cause__, MemoryError)
        assert first.created and last.created  # type: ignore[union-attr]
        assert (await storage.create_run(make_run("c"))).created
        await storage.close()

    run(scenario())
    assert stored_ids(tmp_path / "nomem.db") == {"a", "b", "c"}


def test_a_job_queued_after_the_thread_ended_is_answered(tmp_path: Path) -> None:
    """The race close() cannot see: a job that reaches the queue after the thread's last
    look gets ``StorageError``, not silence."""

    async def scenario() -> None:
        thread = worker.Worker(
            SQLiteStorage.driver,
            str(tmp_path / "ended.db"),
            lambda conn: None,
            transactional=True,
            name="reflow-test-writer",
        )
        thread.start()
        await asyncio.wrap_future(thread.ready)
        await asyncio.wrap_future(thread.stop())
        thread.join()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        thread.submit(worker.Job("late", lambda conn: None, loop, future))
        with pytest.raises(StorageError, match="closed"):
            await within(future)
        await within(asyncio.wrap_future(thread.stop()))

    run(scenario())
