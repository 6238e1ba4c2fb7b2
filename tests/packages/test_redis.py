"""The reflow-redis package, installed as a user installs it, against a real Redis.

(a) the whole conformance kit, as ``pytest --reflow-adapter=redis`` runs it; (b) the
SIGKILL chaos acceptance test of ``tests/acceptance/test_chaos.py`` on a Redis store;
(c) an engine opened from a ``redis://`` URL runs a workflow to completion; plus what
only this adapter has: its registration, key isolation, its persistence report and
driver errors as ``StorageError``.

Everything here skips with a reason unless ``REFLOW_TEST_REDIS_URL`` names a server and
the package is installed, and fails instead under ``REFLOW_REQUIRE_SERVERS=1``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/packages is no package
from redis_fixtures import (
    drop_prefix,
    redis_prefix,
    redis_server_url,
    redis_url,
    require_package,
)

from reflow_core import Engine, RunStatus, StepContext, Workflow, open_storage
from reflow_core.errors import StorageError
from reflow_core.registry import Capability, get_adapter

__all__ = ["redis_prefix", "redis_server_url"]  # fixtures, re-exported for pytest

pytestmark = pytest.mark.redis

ACCEPTANCE = Path(__file__).resolve().parents[1] / "acceptance"


def _url(base: str, prefix: str) -> str:
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}reflow_prefix={prefix}"


def test_registered_through_the_entry_point_only() -> None:
    """The adapter comes from the reflow-redis distribution's entry point, serves both
    schemes, and declares durable only when told the server persists."""
    require_package()
    spec = get_adapter("redis")
    assert spec.distribution == "reflow-redis"
    assert spec.schemes == ("redis", "rediss")
    assert {Capability.CROSS_PROCESS, Capability.THREADS, Capability.NOTIFY} <= spec.capabilities
    assert "reflow_redis" not in "".join(
        Path(p).read_text() for p in (Path(__file__).parents[2] / "reflow_core").glob("*.py")
    )


@pytest.mark.timeout(900)  # the whole kit: a few minutes on a busy two-core machine
def test_redis_keeps_the_contract() -> None:
    """The whole kit passes; the only skips are capabilities not declared (durable, on a
    server without AOF fsync)."""
    import reflow_conformance
    from reflow_conformance.report import render_table

    url = redis_url()
    report = reflow_conformance.run("redis", {"url": url})
    assert report.totals.failed == 0 and report.totals.error == 0, render_table(report)
    for case in report.cases:
        if case.outcome == "skipped":
            assert "does not declare capability" in case.reason, (case.id, case.reason)
    assert report.totals.passed >= 240, render_table(report)


def test_engine_runs_a_workflow_from_a_redis_url(redis_server_url: str, redis_prefix: str) -> None:
    """``Engine("redis://...")`` opens the adapter by URL and runs a two-step workflow."""
    flow: Workflow[dict[str, int]] = Workflow("smoke")

    @flow.step
    async def double(ctx: StepContext[dict[str, int]]) -> int:
        return ctx.input["n"] * 2

    @flow.step
    def plus_one(ctx: StepContext[dict[str, int]]) -> int:
        return int(ctx.prev) + 1

    async def scenario() -> None:
        engine = Engine(_url(redis_server_url, redis_prefix), [flow], use_plugins=False)
        try:
            run = await engine.enqueue("smoke", {"n": 20})
            await engine.run_until_idle()
            view = await engine.get_run(run.id)
        finally:
            await engine.stop()
        assert type(engine.storage).__name__ == "RedisStorage"
        assert (view.run.status, view.run.output) == (RunStatus.COMPLETED, 41)
        assert [s.name for s in view.steps] == ["double", "plus_one"]

    asyncio.run(scenario())


def test_prefixes_keep_stores_apart(redis_server_url: str, redis_prefix: str) -> None:
    """Two prefixes on one database are two stores: a run in one is not seen by the other,
    and a prefix's keys all start with it."""
    other = f"{redis_prefix}x"

    async def scenario() -> None:
        from reflow_core.types import RunFilter, WorkflowRun

        first = open_storage(_url(redis_server_url, redis_prefix))
        second = open_storage(_url(redis_server_url, other))
        await first.initialize()
        await second.initialize()
        try:
            run = WorkflowRun(
                id="a:b|c/{d}", workflow="w:1", input=None, status=RunStatus.PENDING,
                created_at=1, updated_at=1,
            )  # fmt: skip
            await first.create_run(run)
            assert await second.get_run(run.id) is None
            assert await second.list_runs(RunFilter()) == []
            assert [r.id for r in await first.list_runs(RunFilter())] == [run.id]
        finally:
            await first.close()
            await second.close()

    try:
        asyncio.run(scenario())
        import redis

        client = redis.Redis.from_url(redis_server_url)
        try:
            keys = list(client.scan_iter(match=f"{redis_prefix}:*"))
        finally:
            client.close()
        assert keys and all(k.startswith(f"{redis_prefix}:".encode()) for k in keys)
    finally:
        drop_prefix(redis_server_url, other)


def test_persistence_report_matches_the_server(redis_server_url: str, redis_prefix: str) -> None:
    """``persistence()`` reports what CONFIG says, and ``require_durable`` refuses a server
    that does not persist (this project's test server keeps nothing on disk)."""
    import redis
    from reflow_redis import RedisStorage

    from reflow_core.errors import ConfigError

    client = redis.Redis.from_url(redis_server_url, decode_responses=True)
    try:
        config = {str(k): str(v) for k, v in client.config_get("append*").items()}
    finally:
        client.close()
    durable = config["appendonly"] == "yes" and config["appendfsync"] in ("always", "everysec")

    async def scenario() -> None:
        storage = RedisStorage(_url(redis_server_url, redis_prefix))
        await storage.initialize()
        try:
            assert (await storage.persistence()).durable is durable
        finally:
            await storage.close()
        strict = RedisStorage(_url(redis_server_url, redis_prefix), require_durable=True)
        if durable:
            await strict.initialize()
        else:
            with pytest.raises(ConfigError, match="appendonly"):
                await strict.initialize()
        await strict.close()

    asyncio.run(scenario())


def test_more_concurrent_calls_than_connections_wait_for_one(
    redis_server_url: str, redis_prefix: str
) -> None:
    """Calls beyond ``max_connections`` wait for a free connection instead of failing (an
    engine with concurrency 25 makes that many calls at once)."""

    async def scenario() -> None:
        storage = open_storage(_url(redis_server_url, redis_prefix), max_connections=2)
        await storage.initialize()
        try:
            times = await asyncio.gather(*(storage.now() for _ in range(50)))
        finally:
            await storage.close()
        assert len(times) == 50 and min(times) > 0

    asyncio.run(scenario())


def _start_aof_server(directory: Path, port: int) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not on PATH; this test starts a server of its own")
    command = [
        server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_ping(url: str) -> None:
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
                if client.ping():
                    return
        except (redis.RedisError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)  # polling a server that is starting; no event to wait on


def test_aof_server_keeps_runs_across_a_sigkill(tmp_path: Path) -> None:
    """What ``durable`` means on Redis, on a real server of its own: with AOF and fsync,
    a run, its lease and its checkpoint survive SIGKILL of redis-server and a restart;
    ``persistence()`` calls that server durable."""
    require_package()
    from reflow_core.types import RunFilter

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    server = _start_aof_server(tmp_path, port)
    try:
        _wait_for_ping(url)

        async def before_crash() -> tuple[object, ...]:
            storage = open_storage(url, require_durable=True)
            await storage.initialize()
            try:
                assert (await storage.persistence()).durable  # type: ignore[attr-defined]
                from reflow_core.types import StepResult, StepStatus, WorkflowRun

                now = await storage.now()
                run = WorkflowRun(
                    id="r:1", workflow="w", input={"n": 1}, status=RunStatus.PENDING,
                    created_at=now, updated_at=now,
                )  # fmt: skip
                await storage.create_run(run)
                claimed = await storage.claim_next_run(["w"], lease_ms=600_000)
                assert claimed is not None
                step = StepResult(
                    id="r:1/s", run_id="r:1", name="s", status=StepStatus.COMPLETED,
                    output=[1, "two"], created_at=now, updated_at=now,
                )  # fmt: skip
                assert await storage.save_step_result(step, claimed.lease_id)
                return (
                    await storage.get_run("r:1"),
                    await storage.get_step_results("r:1"),
                    claimed.lease_id,
                )
            finally:
                await storage.close()

        run, steps, lease_id = asyncio.run(before_crash())
        server.send_signal(signal.SIGKILL)
        server.wait(20)
        server = _start_aof_server(tmp_path, port)
        _wait_for_ping(url)

        async def after_restart() -> None:
            storage = open_storage(url)
            await storage.initialize()
            try:
                assert await storage.get_run("r:1") == run
                assert await storage.get_step_results("r:1") == steps
                assert [r.id for r in await storage.list_runs(RunFilter())] == ["r:1"]
                assert await storage.heartbeat_run("r:1", str(lease_id))
            finally:
                await storage.close()

        asyncio.run(after_restart())
    finally:
        server.kill()
        server.wait(20)


def test_listener_reconnects_and_wakes_once_then_ends_on_close(
    redis_server_url: str, redis_prefix: str
) -> None:
    """CLIENT KILL of the pub/sub connection: the listener reconnects and calls on_work
    (messages sent meanwhile are lost), hears the next notification, and returns when the
    storage is closed."""
    import redis

    async def scenario() -> None:
        from reflow_core.types import WorkflowRun

        storage = open_storage(_url(redis_server_url, redis_prefix))
        storage.reconnect_initial_s = 0.01  # type: ignore[attr-defined]
        await storage.initialize()
        woken = asyncio.Event()
        task = asyncio.create_task(storage.listen_for_work(woken.set))  # type: ignore[attr-defined]
        channel = f"{redis_prefix}:work"
        admin = redis.Redis.from_url(redis_server_url)
        try:
            # Nothing is published before the kill, so the only on_work the wait below
            # can see is the one after reconnecting. The subscription is made inside the
            # task; the server's subscriber count is the only thing to observe.
            while admin.pubsub_numsub(channel)[0][1] == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            mine = [
                c
                for c in admin.client_list()
                if c.get("name") == f"reflow:{redis_prefix}" and int(c.get("sub", 0))
            ]
            assert len(mine) == 1, mine
            admin.client_kill_filter(_id=mine[0]["id"])
            await asyncio.wait_for(woken.wait(), 10)  # the call after reconnecting
            woken.clear()
            run = WorkflowRun(
                id="r", workflow="w", input=None, status=RunStatus.PENDING,
                created_at=1, updated_at=1,
            )  # fmt: skip
            await storage.create_run(run)
            await asyncio.wait_for(woken.wait(), 10)
        finally:
            admin.close()
            await storage.close()
        assert await asyncio.wait_for(task, 10) is None

    asyncio.run(scenario())


def test_unreachable_server_is_a_storage_error() -> None:
    """A refused connection surfaces as StorageError naming the operation, with the
    driver's error as the cause; so does a connection lost between calls."""
    require_package()
    from reflow_redis import RedisStorage

    async def scenario() -> None:
        storage = RedisStorage("redis://127.0.0.1:1/0")
        with pytest.raises(StorageError, match="initialize") as info:
            await storage.initialize()
        assert info.value.__cause__ is not None
        assert type(info.value.__cause__).__module__.startswith("redis")

    asyncio.run(scenario())


def test_connection_killed_mid_session_is_a_storage_error(
    redis_server_url: str, redis_prefix: str
) -> None:
    """CLIENT KILL of the adapter's pooled connection: the next call raises StorageError
    (the driver's ConnectionError as its cause, never leaked), the one after succeeds."""
    import redis
    from reflow_redis import RedisStorage

    async def scenario() -> None:
        storage = RedisStorage(_url(redis_server_url, redis_prefix))
        await storage.initialize()
        try:
            admin = redis.Redis.from_url(redis_server_url)
            try:
                name = f"reflow:{redis_prefix}"  # the adapter names its connections
                killed = [c for c in admin.client_list() if c.get("name") == name]
                assert killed, "the adapter's connection was not found"
                for c in killed:
                    admin.client_kill_filter(_id=c["id"])
            finally:
                admin.close()
            # The pooled connection is dead and the client never retries on its own (a
            # lost reply may hide a script that ran): this call fails, cleanly.
            with pytest.raises(StorageError, match="now") as info:
                await storage.now()
            assert type(info.value.__cause__).__name__ == "ConnectionError"
            assert await storage.now() > 0  # a fresh connection serves the next call
        finally:
            await storage.close()

    asyncio.run(scenario())


def _chaos_module() -> object:
    """tests/acceptance/test_chaos.py, imported under a private name so that its test is
    not collected twice; its fleet and verification are reused unchanged."""
    spec = importlib.util.spec_from_file_location(
        "_reflow_chaos_for_redis", ACCEPTANCE / "test_chaos.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fleet_survives_random_sigkills_on_redis(
    redis_server_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """The chaos acceptance test on Redis: 200 five-step runs, three worker processes,
    sixteen SIGKILLs; every run completes once, no completed step runs again."""
    chaos = _chaos_module()
    chaos.test_fleet_survives_random_sigkills(_url(redis_server_url, redis_prefix), tmp_path)  # type: ignore[attr-defined]
