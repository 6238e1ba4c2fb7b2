"""The result of running the kit against one adapter, as data, JSON and a table.

A :class:`Report` is a ``msgspec.Struct``: :func:`to_json` writes the document that
``pytest --reflow-report=PATH`` and ``reflow conformance NAME --json`` produce, and
:func:`render_table` prints the same for a terminal.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import msgspec

__all__ = ["CaseReport", "Outcome", "Report", "Totals", "render_table", "to_json"]


class Outcome(enum.StrEnum):
    """How one case ended."""

    PASSED = "passed"
    """The adapter kept every promise the case checks."""
    FAILED = "failed"
    """A contract violation: an assertion failed or the adapter raised unexpectedly."""
    SKIPPED = "skipped"
    """The case does not apply: the adapter does not declare a capability it needs."""
    ERROR = "error"
    """The kit could not run the case (factory failed, server unreachable, ...)."""


class CaseReport(msgspec.Struct, frozen=True, kw_only=True):
    """One case's outcome."""

    id: str
    area: str
    outcome: Outcome
    reason: str = ""
    """Why it failed, errored or was skipped; empty when it passed."""
    duration_s: float = 0.0


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Counts per outcome."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    error: int = 0
    total: int = 0

    @classmethod
    def of(cls, cases: Iterable[CaseReport]) -> Totals:
        """Count the outcomes of ``cases``."""
        counts = dict.fromkeys(Outcome, 0)
        for item in cases:
            counts[item.outcome] += 1
        return cls(
            passed=counts[Outcome.PASSED],
            failed=counts[Outcome.FAILED],
            skipped=counts[Outcome.SKIPPED],
            error=counts[Outcome.ERROR],
            total=sum(counts.values()),
        )


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the kit found out about one adapter."""

    contract_version: str
    adapter: str
    version: str | None
    distribution: str | None
    capabilities: list[str]
    cases: list[CaseReport]
    totals: Totals
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no case failed or errored (and at least one ran)."""
        return self.totals.failed == 0 and self.totals.error == 0 and self.totals.passed > 0


def to_json(reports: Report | list[Report]) -> bytes:
    """Pretty JSON for one report or a list of them."""
    return msgspec.json.format(msgspec.json.encode(reports), indent=2)


def _summary(report: Report) -> str:
    t = report.totals
    return (
        f"{report.adapter} {report.version or '?'} ({report.distribution or 'in-process'}), "
        f"contract {report.contract_version}: {t.passed} passed, {t.failed} failed, "
        f"{t.skipped} skipped, {t.error} errors in {report.duration_s:.1f}s"
    )


def render_table(report: Report) -> str:
    """The report as a table: a ``rich`` table when rich is installed, plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return _plain_table(report)
    colours = {
        Outcome.PASSED: "green",
        Outcome.FAILED: "red",
        Outcome.SKIPPED: "yellow",
        Outcome.ERROR: "magenta",
    }
    table = Table(title=_summary(report), title_justify="left")
    table.add_column("case")
    table.add_column("outcome")
    table.add_column("time", justify="right")
    table.add_column("reason", overflow="fold")
    for item in report.cases:
        colour = colours[item.outcome]
        table.add_row(
            item.id,
            f"[{colour}]{item.outcome.value}[/{colour}]",
            f"{item.duration_s:.2f}s",
            item.reason.splitlines()[0] if item.reason else "",
        )
    console = Console(width=120, record=True, color_system=None, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _plain_table(report: Report) -> str:
    width = max((len(c.id) for c in report.cases), default=4)
    lines = [_summary(report), ""]
    lines.append(f"{'case':<{width}}  {'outcome':<8}  {'time':>7}  reason")
    for item in report.cases:
        reason = item.reason.splitlines()[0] if item.reason else ""
        lines.append(
            f"{item.id:<{width}}  {item.outcome.value:<8}  {item.duration_s:>6.2f}s  {reason}"
        )
    return "\n".join(lines) + "\n"
