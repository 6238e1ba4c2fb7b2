"""``reflow adapters``, ``reflow adapter new NAME`` and ``reflow conformance NAME``: the
commands for people who write or check storage adapters."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from reflow_cli.common import BadConfig, Refused, console
from reflow_core.errors import ReflowError
from reflow_core.registry import AdapterOption, AdapterSpec, adapter_specs

__all__ = ["adapter", "adapters", "conformance"]


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


@click.command("adapters")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def adapters(as_json: bool) -> None:
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
    console().print(table)


@click.group("adapter")
def adapter() -> None:
    """Write a new storage adapter."""


@adapter.command("new")
@click.argument("name")
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to create the adapter's distribution in.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the created files as JSON.")
def adapter_new(name: str, dest: Path, as_json: bool) -> None:
    """Create a skeleton adapter distribution NAME under --dest, ready for the
    conformance kit (pytest --reflow-adapter=NAME)."""
    # Imported lazily: the generator belongs to the conformance kit, an optional extra.
    try:
        from reflow_conformance.skeleton import check_adapter_name, write_skeleton
    except ImportError as exc:
        raise Refused(
            f"the adapter generator is not available ({exc}); "
            "install the conformance kit: pip install 'reflow[conformance]'"
        ) from exc
    try:
        check_adapter_name(name)
    except ReflowError as exc:
        raise BadConfig(str(exc)) from exc
    try:
        written = write_skeleton(name, dest)
    except (ReflowError, OSError) as exc:  # files in the way, or an unwritable --dest
        raise Refused(str(exc)) from exc
    if as_json:
        click.echo(json.dumps([str(path) for path in written], indent=2))
        return
    out = console()
    out.print(f"created adapter {name!r}: {len(written)} file(s) under {dest}")
    for path in written:
        out.print(f"  {path}")


class _ConformanceCommand(click.Command):
    """``reflow conformance --help`` lists each installed adapter's kit options."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
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


@click.command(cls=_ConformanceCommand)
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
    # Imported lazily: the kit is an optional extra, needed only by this command.
    try:
        from reflow_conformance import run
        from reflow_conformance.report import render_table, write_report
    except ImportError as exc:
        raise Refused(f"the conformance kit is not available: {exc}") from exc
    try:
        result = run(name, parsed, select=select, seed=seed, stress=stress)
    except (ReflowError, LookupError) as exc:  # LookupError: --select matched nothing
        raise Refused(str(exc)) from exc
    click.echo(render_table(result))
    if report is not None:
        write_report(report, result)
    sys.exit(0 if result.ok else 1)
