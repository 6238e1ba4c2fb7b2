"""The ``reflow`` command: a thin click layer over :mod:`~reflow_core.demo`,
:mod:`~reflow_core.worker`, the conformance kit and read-only run inspection.

click and rich come with the ``cli`` extra. They are imported only when the command
runs, so ``import reflow_core`` never needs them and a missing extra is one clear line
instead of a traceback. ``python -m reflow_core.cli`` works like ``reflow``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from reflow_core.errors import ReflowError
from reflow_core.registry import AdapterOption, AdapterSpec, adapter_specs, open_storage
from reflow_core.types import RunFilter, RunStatus, StepResult, WorkflowRun

if TYPE_CHECKING:
    import click
    from rich.console import Console

__all__ = ["MISSING_EXTRA", "build_cli", "main"]

MISSING_EXTRA = "the reflow command needs the 'cli' extra: pip install 'reflow[cli]'"


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``reflow = "reflow_core.cli:main"``)."""
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ImportError:
        print(MISSING_EXTRA, file=sys.stderr)
        raise SystemExit(2) from None
    build_cli().main(args=list(argv) if argv is not None else None, prog_name="reflow")


def _when(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds")


def _console() -> Console:
    """A rich console; wide when piped, so ids and times are not cut in logs and greps."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


def _value(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _check_exists(url: str) -> None:
    """Inspecting must not create a database: a mistyped SQLite path is an error, not a
    new empty file (``initialize()`` would create one)."""
    parts = urlsplit(url)
    if parts.scheme.split("+")[0] in ("sqlite", "apsw") and parts.path not in ("", "/:memory:"):
        path = Path(unquote(parts.path[1:]))
        if not path.exists():
            raise FileNotFoundError(f"no database file at {path}")


async def _read_runs(
    url: str, filter: RunFilter | None, run_id: str | None
) -> tuple[list[WorkflowRun], list[StepResult]]:
    """Open the storage, read, close: ``list_runs`` with ``filter``, or one run's rows."""
    _check_exists(url)
    storage = open_storage(url)
    try:
        await storage.initialize()
        if run_id is None:
            assert filter is not None
            return await storage.list_runs(filter), []
        run = await storage.get_run(run_id)
        if run is None:
            return [], []
        return [run], await storage.get_step_results(run_id)
    finally:
        await storage.close()


def _option_line(option: AdapterOption) -> str:
    default = f" (default: {option.default})" if option.default else ""
    return f"{option.name}: {option.meaning}{default}"


def _adapter_json(spec: AdapterSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "distribution": spec.distribution,
        "version": spec.version,
        "schemes": list(spec.schemes),
        "capabilities": sorted(c.value for c in spec.capabilities),
        "options": [
            {"name": o.name, "meaning": o.meaning, "default": o.default} for o in spec.options
        ],
        "description": spec.description,
    }


def _conformance_epilog(formatter: click.HelpFormatter) -> None:
    """The installed adapters' kit options, for ``reflow conformance --help``."""
    try:
        specs = sorted(adapter_specs().values(), key=lambda spec: spec.name)
    except ReflowError:
        return
    rows = [
        (f"{spec.name}: {option.name}=", _option_line(option).split(": ", 1)[1])
        for spec in specs
        for option in spec.options
    ]
    if rows:
        with formatter.section("Adapter options (--option KEY=VALUE)"):
            formatter.write_dl(rows)


def build_cli() -> click.Group:
    """The click command group (a function, so click is imported only when it runs)."""
    import click
    from rich.table import Table

    class ConformanceCommand(click.Command):
        """``reflow conformance --help`` lists each installed adapter's kit options."""

        def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            super().format_epilog(ctx, formatter)
            _conformance_epilog(formatter)

    def read(
        url: str, filter: RunFilter | None = None, run_id: str | None = None
    ) -> tuple[list[WorkflowRun], list[StepResult]]:
        try:
            return asyncio.run(_read_runs(url, filter, run_id))
        except (ReflowError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc

    storage_option = click.option(
        "--storage",
        envvar="REFLOW_STORAGE",
        required=True,
        metavar="URL",
        help="Storage URL, e.g. sqlite:///reflow.db (default: $REFLOW_STORAGE).",
    )

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="reflow")
    def cli() -> None:
        """Reflow: durable workflow execution for Python."""

    @cli.command()
    @click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        help="SQLite file to create (must not exist); default: a temporary directory.",
    )
    @click.option("--keep", is_flag=True, help="Keep the temporary files to inspect them.")
    def demo(db: Path | None, keep: bool) -> None:
        """Kill a worker mid-run, start another, and prove no completed step ran twice."""
        from reflow_core.demo import run_demo

        sys.exit(run_demo(db, keep=keep))

    class OneLineUsageError(click.ClickException):
        exit_code = 2

    class WorkerCommand(click.Command):
        """Reports a bad option on one line with exit code 2, like every other reason a
        worker cannot start (see :mod:`reflow_core.worker`), not click's usage text."""

        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            try:
                return super().parse_args(ctx, args)
            except click.UsageError as exc:
                raise OneLineUsageError(
                    f"{exc.format_message()} (see 'reflow worker --help')"
                ) from None

    @cli.command(cls=WorkerCommand)
    @click.argument("target", metavar="MODULE:ATTR")
    @click.option("--storage", metavar="URL", help="Storage URL (default: $REFLOW_STORAGE).")
    @click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True)
    @click.option("--concurrency", type=click.IntRange(min=1), help="Runs at once per process.")
    @click.option("--lease", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS")
    @click.option("--poll", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS")
    @click.option(
        "--grace",
        type=click.FloatRange(min=0),
        default=30.0,
        show_default=True,
        metavar="SECONDS",
        help="On SIGTERM/SIGINT, how long running steps may take to finish.",
    )
    @click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
        show_default=True,
    )
    def worker(
        target: str,
        storage: str | None,
        processes: int,
        concurrency: int | None,
        lease: float | None,
        poll: float | None,
        grace: float,
        log_level: str,
    ) -> None:
        """Execute the workflows of MODULE:ATTR until SIGTERM or SIGINT.

        MODULE:ATTR names an Engine, a Workflow, a list of Workflows, or a function
        returning one of those. Workflows need --storage (or $REFLOW_STORAGE).

        A worker that cannot start (bad target, option or storage) prints one line
        saying why and exits with code 2; it is not restarted.
        """
        from reflow_core import worker as worker_module

        config = worker_module.WorkerConfig(
            target=target,
            storage=storage,
            concurrency=concurrency,
            lease=lease,
            poll=poll,
            grace=grace,
            log_level=log_level.upper(),
        )
        sys.exit(worker_module.run(config, processes))

    @cli.command("adapters")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def list_adapters(as_json: bool) -> None:
        """List the installed storage adapters: where they come from, the URL schemes
        they serve, what they declare, and the options their conformance run takes."""
        specs = sorted(adapter_specs().values(), key=lambda spec: spec.name)
        if as_json:
            click.echo(json.dumps([_adapter_json(spec) for spec in specs], indent=2))
            return
        table = Table(title="storage adapters", title_justify="left")
        for column in ("name", "distribution", "schemes", "capabilities", "kit options"):
            table.add_column(column)
        for spec in specs:
            table.add_row(
                spec.name,
                f"{spec.distribution or '-'} {spec.version or ''}".strip(),
                ", ".join(f"{scheme}://" for scheme in spec.schemes) or "-",
                ", ".join(sorted(c.value for c in spec.capabilities)) or "-",
                "\n".join(_option_line(option) for option in spec.options) or "-",
            )
        _console().print(table)

    @cli.command(cls=ConformanceCommand)
    @click.argument("name")
    @click.option("--option", "options", multiple=True, metavar="KEY=VALUE")
    @click.option("--select", metavar="PATTERN", help="Run only the matching cases.")
    @click.option(
        "--report",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write the report: Markdown for a .md path, JSON otherwise.",
    )
    @click.option("--seed", type=int, help="Replay Hypothesis cases with this seed.")
    @click.option(
        "--stress",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Repeat race cases (and multiply Hypothesis examples) this many times.",
    )
    def conformance(
        name: str,
        options: tuple[str, ...],
        select: str | None,
        report: Path | None,
        seed: int | None,
        stress: int,
    ) -> None:
        """Run the storage conformance kit against adapter NAME."""
        parsed: dict[str, str] = {}
        for item in options:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
            parsed[key] = value
        # The one place reflow_core reaches into the kit: the command only dispatches to
        # it, lazily, so the engine never depends on it (tests/unit/test_architecture.py).
        try:
            from reflow_conformance import run
            from reflow_conformance.report import render_table, write_report
        except ImportError as exc:
            raise click.ClickException(f"the conformance kit is not available: {exc}") from exc
        try:
            result = run(name, parsed, select=select, seed=seed, stress=stress)
        except (ReflowError, LookupError) as exc:  # LookupError: --select matched nothing
            raise click.ClickException(str(exc)) from exc
        click.echo(render_table(result))
        if report is not None:
            write_report(report, result)
        sys.exit(0 if result.ok else 1)

    @cli.group()
    def runs() -> None:
        """Inspect runs in a storage (read-only)."""

    @runs.command("list")
    @storage_option
    @click.option("--status", type=click.Choice([s.value for s in RunStatus]))
    @click.option("--workflow", metavar="NAME")
    @click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
    def list_runs(storage: str, status: str | None, workflow: str | None, limit: int) -> None:
        """List runs, newest first."""
        status_filter = RunStatus(status) if status else None
        found, _ = read(storage, RunFilter(status=status_filter, workflow=workflow, limit=limit))
        table = Table(title=f"{len(found)} run(s), newest first", title_justify="left")
        for column in ("id", "workflow", "status", "claims", "created", "updated"):
            table.add_column(column, no_wrap=column == "id")
        for run in found:
            table.add_row(
                run.id,
                run.workflow,
                run.status.value,
                str(run.attempt),
                _when(run.created_at),
                _when(run.updated_at),
            )
        _console().print(table)

    @runs.command("show")
    @click.argument("run_id")
    @storage_option
    def show_run(run_id: str, storage: str) -> None:
        """Show one run and its steps."""
        found, steps = read(storage, run_id=run_id)
        if not found:
            raise click.ClickException(f"no run with id {run_id!r} in {storage}")
        run = found[0]
        console = _console()
        fields = {
            "run": run.id,
            "workflow": run.workflow,
            "status": run.status.value,
            "claims": str(run.attempt),
            "recovered": str(run.recoveries) if run.recoveries else "",
            "held by": (
                f"worker {run.holder.worker} on {run.holder.host} (pid {run.holder.pid})"
                if run.holder
                else ""
            ),
            "claimed": _when(run.claimed_at) if run.claimed_at else "",
            "heartbeat": _when(run.heartbeat_at) if run.heartbeat_at else "",
            "lease to": _when(run.lease_expires_at) if run.lease_expires_at else "",
            "created": _when(run.created_at),
            "updated": _when(run.updated_at),
            "input": _value(run.input, 200),
            "output": _value(run.output, 200) if run.status is RunStatus.COMPLETED else "",
            "error": f"{run.error.type}: {run.error.message}" if run.error else "",
        }
        for key, text in fields.items():
            if text:
                console.print(f"[bold]{key:>9}[/bold]  {text}", highlight=False)
        table = Table(title="steps", title_justify="left")
        for column in ("step", "status", "attempts", "updated", "output / error"):
            table.add_column(column)
        for step in steps:
            detail = (
                f"{step.error.type}: {step.error.message}" if step.error else _value(step.output)
            )
            table.add_row(
                step.name, step.status.value, str(step.attempts), _when(step.updated_at), detail
            )
        console.print(table)

    return cli


if __name__ == "__main__":
    main()
