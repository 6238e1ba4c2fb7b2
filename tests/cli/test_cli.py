"""The ``reflow`` command's argument handling, messages and read-only inspection, in-process
through click's CliRunner (the demo and the worker run as real processes elsewhere)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from reflow_cli.app import MISSING_EXTRA, build_cli, main
from reflow_cli.worker import (
    StartupError,
    WorkerConfig,
    build_engine,
    load_target,
    redact,
    start_engine,
)
from reflow_core import Engine, LeaseHolder, StepContext, Workflow, open_storage

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _app_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``worker_app`` lives next to this file; make it importable as workers import it."""
    monkeypatch.syspath_prepend(str(HERE))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in (
        "demo",
        "worker",
        "conformance",
        "runs",
        "events",
        "schedules",
        "db",
        "adapter",
    ):
        assert command in result.output


def test_missing_cli_extra_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "click", None)  # makes `import click` raise ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == MISSING_EXTRA


# -- worker: target loading and option checks ------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon", "expected MODULE:ATTR"),
        ("no_such_module_xyz:flows", "cannot import module 'no_such_module_xyz'"),
        ("worker_app:missing", "has no attribute 'missing'"),
        ("worker_app:not_a_workflow", "worker_app:not_a_workflow is int; expected an Engine"),
    ],
)
def test_worker_rejects_bad_targets(
    target: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="reflow.worker"):
        result = invoke("worker", target, "--storage", "memory://")
    assert result.exit_code == 2
    assert message in caplog.text


def test_worker_with_an_engine_refuses_storage_and_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="reflow.worker"):
        result = invoke("worker", "worker_app:engine", "--storage", "memory://", "--lease", "5")
    assert result.exit_code == 2
    assert "is an Engine" in caplog.text
    assert "drop --storage, --lease" in caplog.text


def test_worker_with_workflows_needs_a_storage(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("REFLOW_STORAGE", raising=False)
    with caplog.at_level(logging.ERROR, logger="reflow.worker"):
        result = invoke("worker", "worker_app:workflows", "--processes", "2")
    assert result.exit_code == 2
    assert "needs a storage" in caplog.text


@pytest.mark.parametrize("option", [("--processes", "0"), ("--concurrency", "0"), ("--poll", "0")])
def test_worker_rejects_nonsense_numbers(option: tuple[str, str]) -> None:
    result = invoke("worker", "worker_app:workflows", "--storage", "memory://", *option)
    assert result.exit_code == 2
    assert option[0] in result.output


def test_load_target_accepts_every_documented_form() -> None:
    engine = load_target("worker_app:engine")
    assert isinstance(engine, Engine)
    assert [w.name for w in load_target("worker_app:workflows")] == ["quick", "hold"]  # type: ignore[union-attr]
    assert [w.name for w in load_target("worker_app:make_workflows")] == ["quick", "hold"]  # type: ignore[union-attr]
    assert [w.name for w in load_target("worker_app:quick")] == ["quick"]  # type: ignore[union-attr]


def test_build_engine_applies_options_and_env_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFLOW_STORAGE", "memory://")
    engine, described = build_engine(
        WorkerConfig("worker_app:workflows", concurrency=3, lease=6.0, poll=0.5)
    )
    assert (engine.concurrency, engine.lease.duration_s, engine.poll_interval) == (3, 6.0, 0.5)
    assert sorted(engine.workflows) == ["hold", "quick"]
    assert described == "memory://"


def test_storage_passwords_stay_out_of_logs() -> None:
    assert redact("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact("sqlite:///reflow.db") == "sqlite:///reflow.db"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            WorkerConfig("worker_app:workflows", storage="host=db password=s3cret-pw"),
            "cannot open storage host=db password=***: no storage adapter named",
        ),
        (
            WorkerConfig("worker_app:workflows", storage="memory://", grace=float("inf")),
            "invalid --grace inf",
        ),
        (
            WorkerConfig("worker_app:workflows", storage="memory://", poll=0.0),
            "invalid --poll 0.0",
        ),
    ],
)
def test_start_engine_reports_one_line_with_passwords_hidden(
    config: WorkerConfig, message: str
) -> None:
    with pytest.raises(StartupError) as info:
        asyncio.run(start_engine(config))
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert "s3cret-pw" not in text


def test_worker_option_errors_are_one_line() -> None:
    result = invoke("worker", "worker_app:workflows", "--grace", "-1")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: Invalid value for '--grace': -1.0 is not in the range x>=0. "
        "(see 'reflow worker --help')"
    ]


def test_worker_config_round_trips_through_child_argv() -> None:
    from reflow_cli.worker import main as child_main

    config = WorkerConfig("m:a", storage="sqlite:///x.db", concurrency=4, lease=9.5, grace=3.0)
    assert config.argv() == [
        "m:a", "--grace", "3.0", "--log-level", "INFO",
        "--storage", "sqlite:///x.db", "--concurrency", "4", "--lease", "9.5",
    ]  # fmt: skip
    # The child parses it back; a bad target then fails with the config exit code.
    assert child_main(["nocolon", *config.argv()[1:]]) == 2


# -- runs list / show --------------------------------------------------------------------


def _make_runs(db: Path) -> tuple[str, str]:
    """One completed and one pending run in a fresh SQLite file; returns their ids."""
    wf: Workflow[Any] = Workflow("greet")

    @wf.step
    def hello(ctx: StepContext[Any]) -> str:
        return f"hello {ctx.input['name']}"

    async def go() -> tuple[str, str]:
        engine = Engine(f"sqlite:///{db}", [wf])
        try:
            done = await engine.enqueue(wf, {"name": "Ada"})
            await engine.run_until_idle()
            pending = await engine.enqueue(wf, {"name": "Alan"})
            return done.id, pending.id
        finally:
            await engine.stop()

    return asyncio.run(go())


def test_runs_list_and_filters(tmp_path: Path) -> None:
    done, pending = _make_runs(tmp_path / "r.db")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    everything = invoke("runs", "list", "--storage", url)
    assert everything.exit_code == 0
    assert done in everything.output and pending in everything.output
    completed = invoke("runs", "list", "--storage", url, "--status", "completed")
    assert done in completed.output and pending not in completed.output
    other = invoke("runs", "list", "--storage", url, "--workflow", "other")
    assert "0 run(s)" in other.output


def test_runs_show_prints_the_run_and_its_steps(tmp_path: Path) -> None:
    done, _ = _make_runs(tmp_path / "r.db")
    result = invoke("runs", "show", done, "--storage", f"sqlite:///{tmp_path / 'r.db'}")
    assert result.exit_code == 0
    assert "completed" in result.output
    assert '"hello Ada"' in result.output  # the run's output and the step's output
    assert "hello" in result.output


def test_runs_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    _make_runs(tmp_path / "r.db")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    missing_run = invoke("runs", "show", "nope", "--storage", url)
    assert missing_run.exit_code == 1
    assert "no run with id 'nope'" in missing_run.output
    missing_file = invoke("runs", "list", "--storage", f"sqlite:///{tmp_path / 'typo.db'}")
    assert missing_file.exit_code == 1
    assert "does not exist" in missing_file.output and "reflow db migrate" in missing_file.output
    assert not (tmp_path / "typo.db").exists()  # inspecting never creates a database
    unknown = invoke("runs", "list", "--storage", "nosuch://x")
    assert unknown.exit_code == 2  # configuration
    assert "installed adapters" in unknown.output
    bad_status = invoke("runs", "list", "--storage", url, "--status", "done")
    assert bad_status.exit_code == 2


# -- conformance -------------------------------------------------------------------------


def test_conformance_prints_the_table_and_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = invoke("conformance", "memory", "--select", "claim", "--report", str(report))
    assert result.exit_code == 0, result.output
    assert "claim." in result.output
    assert "0 failed" in result.output
    assert json.loads(report.read_text())["adapter"] == "memory"
    summary = tmp_path / "report.md"
    again = invoke(
        "conformance",
        "memory",
        "--select",
        "claim",
        "--report",
        str(summary),
        "--seed",
        "7",
        "--stress",
        "2",
    )
    assert again.exit_code == 0, again.output
    text = summary.read_text()
    assert text.startswith("#") and "memory" in text and "7" in text


def test_conformance_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = invoke("conformance", "nosuch")
    assert unknown.exit_code == 1
    assert "no storage adapter named 'nosuch'" in unknown.output
    nothing = invoke("conformance", "memory", "--select", "no-such-case")
    assert nothing.exit_code == 1
    bad_option = invoke("conformance", "memory", "--option", "novalue")
    assert bad_option.exit_code == 2
    assert "KEY=VALUE" in bad_option.output
    monkeypatch.setitem(sys.modules, "reflow_conformance", None)
    missing = invoke("conformance", "memory")
    assert missing.exit_code == 1
    assert "conformance kit is not available" in missing.output


def test_conformance_failure_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    import reflow_conformance
    from reflow_conformance.report import Report

    real = reflow_conformance.run

    def failing(name: str, options: Any, select: str | None = None, **kw: Any) -> Report:
        report = real(name, options, select=select, **kw)
        totals = report.totals.__class__(**{**_fields(report.totals), "failed": 1})
        return Report(**{**_fields(report), "totals": totals})

    monkeypatch.setattr(reflow_conformance, "run", failing)
    assert invoke("conformance", "memory", "--select", "claim").exit_code == 1


def _fields(struct: Any) -> dict[str, Any]:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}


def test_demo_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "d.db").write_bytes(b"")
    result = invoke("demo", "--db", str(tmp_path / "d.db"))
    assert result.exit_code == 2
    assert "exists" in result.output


def test_runs_show_names_the_holder_of_a_running_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'held.db'}"

    async def hold() -> str:
        storage = open_storage(url)
        try:
            await storage.initialize()
            engine = Engine(storage, [Workflow("held")], use_plugins=False)
            run_ = await engine.enqueue("held")
            claimed = await storage.claim_next_run(
                ["held"], lease_ms=30_000, holder=LeaseHolder(worker="w-9", host="box", pid=4242)
            )
            assert claimed is not None
            return run_.id
        finally:
            await storage.close()

    run_id = asyncio.run(hold())
    result = invoke("runs", "show", run_id, "--storage", url)
    assert result.exit_code == 0
    assert "worker w-9 on box (pid 4242)" in result.output
    assert "lease to" in result.output


def test_adapters_lists_what_is_installed_with_its_kit_options() -> None:
    listed = invoke("adapters", "--json")
    assert listed.exit_code == 0
    adapters = {a["name"]: a for a in json.loads(listed.output)}
    assert {"memory", "sqlite", "apsw", "postgres"} <= set(adapters)
    postgres = adapters["postgres"]
    assert postgres["distribution"] == "reflow"
    assert postgres["schemes"] == ["postgresql", "postgres"]
    assert "notify" in postgres["capabilities"]
    assert [o["name"] for o in postgres["options"]] == ["dsn"]
    assert postgres["options"][0]["default"] == "$REFLOW_TEST_POSTGRES_DSN"
    table = invoke("adapters")
    assert table.exit_code == 0 and "postgresql://" in table.output
    help_text = invoke("conformance", "--help").output
    assert "postgres: dsn=" in help_text
