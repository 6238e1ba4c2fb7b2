"""The ``reflow`` command group (``reflow = "reflow_cli.app:main"``).

click and rich come with the ``cli`` extra. :func:`main` checks for them before it
imports any command module, so a missing extra is one clear line (exit code 2) instead
of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click

__all__ = ["MISSING_EXTRA", "build_cli", "main"]

MISSING_EXTRA = "the reflow command needs the 'cli' extra: pip install 'reflow[cli]'"


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ImportError:
        print(MISSING_EXTRA, file=sys.stderr)
        raise SystemExit(2) from None
    build_cli().main(args=list(argv) if argv is not None else None, prog_name="reflow")


def build_cli() -> click.Group:
    """The ``reflow`` group with every command family added (a function, so click and
    the command modules are imported only when the command runs)."""
    import click

    from reflow_cli.commands import adapters, db, events, process, run_actions, runs, schedules

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="reflow")
    def cli() -> None:
        """Reflow: durable workflow execution for Python.

        Commands that print data take --json. Exit codes: 0 ok, 1 not found or
        refused, 2 usage or configuration.
        """

    for command in (
        process.demo,
        process.worker,
        adapters.adapters,
        adapters.adapter,
        adapters.conformance,
        runs.runs,
        events.events,
        schedules.schedules,
        db.db,
    ):
        cli.add_command(command)
    for action in run_actions.ACTIONS:
        runs.runs.add_command(action)
    return cli


if __name__ == "__main__":
    main()
