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
from rich.text import Text

from reflow_cli.text import age, when
from reflow_cli.values import is_damaged, value_text

__all__ = [
    "DAMAGE_STYLE",
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
    "value_cell",
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
    """A record (msgspec struct, enum, list of them) as plain JSON-ready values.

    Not for records holding stored values: :func:`reflow_cli.values.record_json` keeps a
    damaged value out of the value's place."""
    return msgspec.to_builtins(value)


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON (records converted with :func:`to_json`)."""
    click.echo(json.dumps(to_json(value), indent=2, ensure_ascii=False, default=str))


def console() -> Console:
    """A rich console; wide when piped, so ids and times are not cut in logs and greps."""
    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=160)


DAMAGE_STYLE = "bold yellow"
"""How rich output shows a value that cannot be decoded: a warning, not a value."""


def value_cell(value: Any, width: int = 60) -> Text:
    """A stored value for rich output (:func:`value_text`), a damaged one as a warning
    and cut no shorter than 200 characters, so the stored text shows after the error."""
    if is_damaged(value):
        return Text(value_text(value, max(width, 200)), style=DAMAGE_STYLE)
    return Text(value_text(value, width))
