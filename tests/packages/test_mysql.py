"""The separately installed ``reflow-mysql`` package, against a real MariaDB/MySQL server.

Server tests need ``REFLOW_TEST_MYSQL_URL`` (skipped with that reason otherwise, failed
under ``REFLOW_REQUIRE_SERVERS=1``) and the package installed non-editable
(``pip install ./packages/reflow-mysql``), exactly as a user gets it: it registers
through the ``reflow`` entry point, never through the core.

* the whole conformance kit, as ``pytest --reflow-adapter=mysql`` runs it;
* the SIGKILL chaos acceptance test (``tests/acceptance/test_chaos.py``) on MySQL;
* an ``Engine`` opened by URL running a workflow to completion;
* the adapter's own refusals: bad URLs, unreachable servers, old servers.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mysql_fixtures

from reflow_core import Engine, RunStatus, StepContext, StepStatus, Workflow, open_storage
from reflow_core.errors import ConfigError, StorageError

pytestmark = pytest.mark.mysql


@pytest.fixture(scope="module")
def mysql_url() -> str:
    """The server's URL (checked once per module)."""
    return mysql_fixtures.mysql_url()


@pytest.fixture
def mysql_store(mysql_url: str) -> Iterator[str]:
    """A fresh store's URL (unique table prefix), dropped afterwards."""
    yield from mysql_fixtures.store_url(mysql_url)


# -- the contract -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_mysql_keeps_the_contract(mysql_url: str) -> None:
    """The whole kit passes; skips are only for capabilities the adapter does not declare.

    Minutes, not seconds: each of the ~330 cases creates and drops its own tables, and
    InnoDB flushes its log at every commit (about 10-20 ms per commit on this disk).
    """
    import reflow_conformance
    from reflow_conformance.report import render_table

    report = reflow_conformance.run("mysql", {"url": mysql_url})
    assert report.totals.failed == 0 and report.totals.error == 0, render_table(report)
    for case in report.cases:
        if case.outcome == "skipped":
            assert "does not declare capability" in case.reason, (case.id, case.reason)
    assert report.totals.passed >= 240, render_table(report)


def test_registered_through_the_entry_point_only() -> None:
    """The adapter comes from the reflow-mysql distribution, by name and both schemes."""
    mysql_fixtures.require_package()
    from reflow_core.registry import Capability, get_adapter

    spec = get_adapter("mysql")
    assert spec.distribution == "reflow-mysql"
    assert set(spec.schemes) == {"mysql", "mariadb"}
    assert Capability.NOTIFY in spec.capabilities
    for scheme in ("mysql", "mariadb"):
        storage = open_storage(f"{scheme}://root@127.0.0.1:3306/test?reflow_prefix=x_")
        assert type(storage).__module__ == "reflow_mysql.storage"
        assert storage.url == f"{scheme}://root@127.0.0.1:3306/test?reflow_prefix=x_"


# -- the chaos acceptance test ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fleet_survives_random_sigkills_on_mysql(mysql_store: str, tmp_path: Path) -> None:
    """``tests/acceptance/test_chaos.py``'s fleet test, unchanged, on a MySQL store: 200
    five-step runs, sixteen random SIGKILLs; no completed step re-run, no run lost or
    stuck (the function asserts all of it)."""
    acceptance = Path(__file__).resolve().parents[1] / "acceptance"
    sys.path.insert(0, str(acceptance))
    import test_chaos

    test_chaos.test_fleet_survives_random_sigkills(mysql_store, tmp_path)


# -- the engine, by URL -----------------------------------------------------------------


def _workflow() -> Workflow[Any]:
    flow: Workflow[Any] = Workflow("mysql-smoke")

    @flow.step
    def double(ctx: StepContext[Any]) -> int:
        return int(ctx.input["n"]) * 2

    @flow.step
    async def describe(ctx: StepContext[Any]) -> dict[str, Any]:
        return {"doubled": ctx.prev, "text": "é 😀 \\ ' \" trailing "}

    return flow


def test_engine_runs_a_workflow_by_url(mysql_store: str) -> None:
    """``Engine("mysql://...")`` initializes the store, runs a two-step workflow, and the
    output and checkpoints read back exactly, also from a fresh handle."""

    async def main() -> tuple[Any, list[Any]]:
        async with Engine(mysql_store, [_workflow()], poll_interval=0.05) as engine:
            run = await engine.enqueue("mysql-smoke", {"n": 21})
            done = await engine.wait_for(run.id, within=30)
            assert done.status is RunStatus.COMPLETED, done
        storage = open_storage(mysql_store)
        await storage.initialize()
        try:
            stored = await storage.get_run(run.id)
            assert stored is not None
            return stored.output, await storage.get_step_results(run.id)
        finally:
            await storage.close()

    output, steps = asyncio.run(main())
    assert output == {"doubled": 42, "text": "é 😀 \\ ' \" trailing "}
    assert [(s.name, s.status, s.output) for s in steps] == [
        ("double", StepStatus.COMPLETED, 42),
        ("describe", StepStatus.COMPLETED, output),
    ]


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://root@127.0.0.1:3306/", "names no database"),
        ("mysql://root@127.0.0.1:3306/test?sslmode=on", "unknown MySQL URL parameter"),
        ("mysql://root@127.0.0.1:3306/test?reflow_prefix=Bad-Prefix", "table prefix"),
        ("mysql://root@127.0.0.1:notaport/test", "invalid MySQL URL"),
    ],
)
def test_bad_urls_are_config_errors(url: str, words: str) -> None:
    mysql_fixtures.require_package()
    with pytest.raises(ConfigError, match=words):
        open_storage(url)


def test_unreachable_server_is_a_storage_error() -> None:
    """A closed port fails initialize() with StorageError, the driver error as cause."""
    mysql_fixtures.require_package()

    async def main() -> None:
        storage = open_storage("mysql://root@127.0.0.1:1/test?connect_timeout=2")
        try:
            await storage.initialize()
        finally:
            await storage.close()

    with pytest.raises(StorageError, match="initialize") as caught:
        asyncio.run(main())
    assert caught.value.__cause__ is not None
    assert not isinstance(caught.value.__cause__, StorageError)


def test_wrong_password_is_a_storage_error(mysql_url: str) -> None:
    from reflow_mysql.url import parse_url

    target = parse_url(mysql_url)
    bad = f"mysql://nobody-{target.user}:wrong@{target.host}:{target.port}/{target.database}"

    async def main() -> None:
        storage = open_storage(bad)
        try:
            await storage.initialize()
        finally:
            await storage.close()

    with pytest.raises(StorageError, match="Access denied"):
        asyncio.run(main())


@pytest.mark.parametrize(
    ("version", "refused"),
    [
        ("10.11.19-MariaDB-0+deb12u1", False),
        ("10.6.0-MariaDB", False),
        ("10.5.21-MariaDB", True),
        ("8.0.36", False),
        ("5.7.44-log", True),
    ],
)
def test_servers_without_skip_locked_are_refused(version: str, refused: bool) -> None:
    mysql_fixtures.require_package()
    from reflow_mysql.connections import _check_version

    if refused:
        with pytest.raises(StorageError, match="too old"):
            _check_version("initialize", version)
    else:
        _check_version("initialize", version)


def test_unused_handle_closes_and_refuses_calls() -> None:
    """Calls before initialize() and after close() are StorageErrors saying which."""
    mysql_fixtures.require_package()

    async def main() -> None:
        storage = open_storage("mysql://root@127.0.0.1:3306/test?reflow_prefix=never_")
        with pytest.raises(StorageError, match="not initialized"):
            await storage.get_run("x")
        await storage.close()
        await storage.close()
        with pytest.raises(StorageError, match="closed"):
            await storage.get_run("x")

    asyncio.run(main())
