"""The result of running the kit against one adapter, as data, JSON, Markdown and a table.

A :class:`Report` is a ``msgspec.Struct``: :func:`to_json` writes the document that
``pytest --reflow-report=PATH.json`` and ``reflow conformance NAME --report`` produce,
:func:`to_markdown` the summary ``--reflow-report=PATH.md`` writes (for an adapter's
README), :func:`write_report` picks between them by the file's suffix, and
:func:`render_table` prints the same for a terminal.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from pathlib import Path

import msgspec

__all__ = [
    "CaseReport",
    "Outcome",
    "Report",
    "Totals",
    "render_table",
    "to_json",
    "to_markdown",
    "write_report",
]


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
    location: str = ""
    """For a failure: ``file:line`` of the case's own line that failed (the line that
    called ``expect()``, ``assert_exact()`` or the adapter method that raised), never a
    line of the kit's helpers. Empty otherwise."""


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
    seed: int | None = None
    """The Hypothesis seed every Hypothesis-driven case (``values``, ``model`` ...) ran
    with: ``--reflow-seed=SEED`` (pytest) or ``run(..., seed=SEED)`` replays them."""
    stress: int = 1
    """``--reflow-stress``: how many times each race case ran (each on a fresh store), and
    the multiplier of Hypothesis example counts."""

    @property
    def ok(self) -> bool:
        """True when no case failed or errored (and at least one ran)."""
        return self.totals.failed == 0 and self.totals.error == 0 and self.totals.passed > 0


def to_json(reports: Report | list[Report]) -> bytes:
    """Pretty JSON for one report or a list of them."""
    return msgspec.json.format(msgspec.json.encode(reports), indent=2)


def to_markdown(reports: Report | list[Report]) -> str:
    """A Markdown summary, ready to paste into an adapter's README or an issue.

    Per adapter: identity (adapter, distribution and version, contract version,
    capabilities, seed, stress), the outcome, a pass/fail/skip/error table per contract
    area, every failure and error with the case line that failed, and the skips grouped
    by reason.
    """
    items = reports if isinstance(reports, list) else [reports]
    return "\n".join(_markdown_one(report) for report in items)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_one(report: Report) -> str:
    t = report.totals
    verdict = "passed" if report.ok else "FAILED"
    dist = report.distribution or "in-process"
    version = f" {report.version}" if report.version else ""
    capabilities = ", ".join(f"`{c}`" for c in report.capabilities) or "none declared"
    seed = (
        "not recorded"
        if report.seed is None
        else f"`{report.seed}` (replay: `--reflow-seed={report.seed}`)"
    )
    lines = [
        f"## Reflow storage conformance: `{report.adapter}`",
        "",
        "| | |",
        "|---|---|",
        f"| adapter | `{report.adapter}` |",
        f"| distribution | {_cell(dist)}{_cell(version)} |",
        f"| storage contract | {report.contract_version} |",
        f"| capabilities | {capabilities} |",
        f"| Hypothesis seed | {seed} |",
        f"| stress | {report.stress} |",
        f"| result | **{verdict}**: {t.passed} passed, {t.failed} failed, {t.skipped} skipped, "
        f"{t.error} errors of {t.total} cases in {report.duration_s:.1f} s |",
        "",
        "| area | passed | failed | skipped | error |",
        "|---|---:|---:|---:|---:|",
    ]
    areas: dict[str, dict[Outcome, int]] = {}
    for item in report.cases:
        areas.setdefault(item.area, dict.fromkeys(Outcome, 0))[item.outcome] += 1
    for area, counts in areas.items():
        lines.append(
            f"| {area} | {counts[Outcome.PASSED]} | {counts[Outcome.FAILED]} | "
            f"{counts[Outcome.SKIPPED]} | {counts[Outcome.ERROR]} |"
        )
    problems = [c for c in report.cases if c.outcome in (Outcome.FAILED, Outcome.ERROR)]
    if problems:
        lines += ["", "### Failures and errors", ""]
        for item in problems:
            first = item.reason.splitlines()[0] if item.reason else ""
            where = f" at `{item.location}`" if item.location else ""
            lines.append(f"- **{item.outcome.value}** `{item.id}`{where}: {_cell(first)}")
            if len(item.reason.splitlines()) > 1:
                lines += ["", "  <details><summary>details</summary>", "", "  ````text"]
                lines += [f"  {line}" for line in item.reason.splitlines()[:80]]
                lines += ["  ````", "", "  </details>", ""]
    skips: dict[str, list[str]] = {}
    for item in report.cases:
        if item.outcome is Outcome.SKIPPED:
            skips.setdefault(item.reason, []).append(item.id)
    if skips:
        lines += ["", "### Skipped", ""]
        for reason, ids in skips.items():
            shown = ", ".join(f"`{i}`" for i in ids)
            lines.append(f"- {_cell(reason)} ({len(ids)}): {shown}")
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, reports: Report | list[Report]) -> Path:
    """Write ``reports`` to ``path``: Markdown for ``.md``/``.markdown``, JSON otherwise."""
    target = Path(path)
    if target.suffix.lower() in (".md", ".markdown"):
        target.write_text(to_markdown(reports), encoding="utf-8")
    else:
        target.write_bytes(to_json(reports))
    return target


def _summary(report: Report) -> str:
    t = report.totals
    return (
        f"{report.adapter} {report.version or '?'} ({report.distribution or 'in-process'}), "
        f"contract {report.contract_version}: {t.passed} passed, {t.failed} failed, "
        f"{t.skipped} skipped, {t.error} errors in {report.duration_s:.1f}s"
        + (f"; seed {report.seed}" if report.seed is not None else "")
        + (f"; stress {report.stress}" if report.stress != 1 else "")
    )


def render_table(report: Report) -> str:
    """The report as a table: a ``rich`` table when rich is installed, plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
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
            Text(_reason_cell(item)),  # Text: a reason's "[...]" is not rich markup
        )
    console = Console(width=120, record=True, color_system=None, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _reason_cell(item: CaseReport) -> str:
    """The first line of the reason, and the case line that failed."""
    reason = item.reason.splitlines()[0] if item.reason else ""
    return f"{reason} (at {item.location})" if item.location else reason


def _plain_table(report: Report) -> str:
    width = max((len(c.id) for c in report.cases), default=4)
    lines = [_summary(report), ""]
    lines.append(f"{'case':<{width}}  {'outcome':<8}  {'time':>7}  reason")
    for item in report.cases:
        reason = _reason_cell(item)
        lines.append(
            f"{item.id:<{width}}  {item.outcome.value:<8}  {item.duration_s:>6.2f}s  {reason}"
        )
    return "\n".join(lines) + "\n"
