"""``reflow worker`` and ``reflow demo``: the commands that start processes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["demo", "worker"]


@click.command()
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite file to create (must not exist); default: a temporary directory.",
)
@click.option("--keep", is_flag=True, help="Keep the temporary files to inspect them.")
def demo(db: Path | None, keep: bool) -> None:
    """Kill a worker mid-run, start another, and prove no completed step ran twice."""
    from reflow_cli.demo import run_demo

    sys.exit(run_demo(db, keep=keep))


class _OneLineUsageError(click.ClickException):
    exit_code = 2


class _WorkerCommand(click.Command):
    """Reports a bad option on one line with exit code 2, like every other reason a
    worker cannot start (see :mod:`reflow_cli.worker`), not click's usage text."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _OneLineUsageError(
                f"{exc.format_message()} (see 'reflow worker --help')"
            ) from None


@click.command(cls=_WorkerCommand)
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
    help=(
        "On SIGTERM/SIGINT, how long running runs may go on before they are stopped and "
        "their leases released. A `def` step still running in its thread then keeps its "
        "lease (heartbeating) until it returns, so exit can take longer."
    ),
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option(
    "--migrate/--no-migrate",
    default=True,
    show_default=True,
    help="Apply pending schema migrations at start; with --no-migrate a store that is "
    "not current stops the worker (exit 2) until 'reflow db migrate' has run.",
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
    migrate: bool,
) -> None:
    """Execute the workflows of MODULE:ATTR until SIGTERM or SIGINT.

    MODULE:ATTR names an Engine, a Workflow, a list of Workflows, or a function
    returning one of those. Workflows need --storage (or $REFLOW_STORAGE).

    A worker that cannot start (bad target, option or storage) prints one line
    saying why and exits with code 2; it is not restarted.
    """
    from reflow_cli import worker as worker_module

    config = worker_module.WorkerConfig(
        target=target,
        storage=storage,
        concurrency=concurrency,
        lease=lease,
        poll=poll,
        grace=grace,
        log_level=log_level.upper(),
        migrate=migrate,
    )
    sys.exit(worker_module.run(config, processes))
