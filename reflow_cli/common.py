"""What every command shares: exit codes, the ``--storage`` and ``--json`` options,
JSON and table output, times and values made readable.

Exit codes: 0 ok; 1 not found or refused (no such run, a run that cannot be cancelled,
a store that must be migrated first); 2 usage or configuration (a bad option, an unknown
storage scheme, a missing ``--storage``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console

from reflow_cli.text import age, when

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "BadConfig",
    "Refused",
    "age",
    "console",
    "echo_json",
    "json_option",
    "storage_option",
    "to_json",
    "value_text",
    "when",
]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


class Refused(click.ClickException):
    """Not found or refused: exit code 1, one line on stderr."""

    exit_code = EXIT_REFUSED


class BadConfig(click.ClickException):
    """A usage or configuration problem that click did not catch itself: exit code 2."""

    exit_code = EXIT_USAGE


def storage_option(command: F) -> F:
    """``--storage URL``, falling back to ``$REFLOW_STORAGE``; missing is a usage error."""
    return click.option(
        "--storage",
        envvar="REFLOW_STORAGE",
        required=True,
        metavar="URL",
        help="Storage URL, e.g. sqlite:///reflow.db (default: $REFLOW_STORAGE).",
    )(command)


def json_option(command: F) -> F:
    """``--json``: machine-readable output on stdout instead of rich tables."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        command
    )


def to_json(value: Any) -> Any:
    """A record (msgspec struct, enum, list of them) as plain JSON-ready values."""
    return msgspec.to_builtins(value)


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON (records converted with :func:`to_json`)."""
    click.echo(json.dumps(to_json(value), indent=2, ensure_ascii=False, default=str))


def console() -> Console:
    """A rich console; wide when piped, so ids and times are not cut in logs and greps."""
    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=160)


def value_text(value: Any, width: int = 60) -> str:
    """A stored value as one JSON line, cut at ``width`` characters."""
    text = json.dumps(to_json(value), default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"
