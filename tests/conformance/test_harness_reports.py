"""The Markdown summary (``--reflow-report PATH.md``), for an adapter's README.

It names the adapter, its distribution and version, the contract version, the seed and
stress, and gives pass/fail/skip/error per contract area, every failure with the case line
that failed, and the skips grouped by reason. A ``.json`` path still gets JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from reflow_adapters.memory import MemoryStorage
from reflow_conformance.report import Report, to_markdown, write_report
from reflow_conformance.runner import run_spec
from reflow_core import AdapterSpec
from reflow_core.storage import CONTRACT_VERSION


class HeartbeatAlwaysTrue(MemoryStorage):
    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        await super().heartbeat_run(run_id, lease_id)
        return True


def _report() -> Report:
    spec = AdapterSpec(
        name="broken-heartbeat",
        factory=lambda url=None, clock=None: HeartbeatAlwaysTrue(clock=clock),
        conformance_factory=lambda t, o, clock=None: HeartbeatAlwaysTrue(clock=clock),
        distribution="reflow-broken",
        version="1.2.3",
    )
    return run_spec(spec, select="leases,concurrency.claim_threads,claim.oldest_first", seed=8)


def test_markdown_summary() -> None:
    report = _report()
    text = to_markdown(report)
    lines = text.splitlines()
    assert lines[0] == "## Reflow storage conformance: `broken-heartbeat`"
    for row in [
        "| adapter | `broken-heartbeat` |",
        "| distribution | reflow-broken 1.2.3 |",
        f"| storage contract | {CONTRACT_VERSION} |",
        "| capabilities | none declared |",
        "| Hypothesis seed | `8` (replay: `--reflow-seed=8`) |",
        "| stress | 1 |",
        "| area | passed | failed | skipped | error |",
    ]:
        assert row in lines, row
    t = report.totals
    assert (
        f"| result | **FAILED**: {t.passed} passed, {t.failed} failed, {t.skipped} skipped, "
        f"0 errors of {t.total} cases in"
    ) in text
    leases = [c for c in report.cases if c.area == "leases"]
    failed = sum(1 for c in leases if c.outcome == "failed")
    assert f"| leases | {len(leases) - failed} | {failed} | 0 | 0 |" in lines
    assert "| claim | 1 | 0 | 0 | 0 |" in lines
    assert "| concurrency | 0 | 0 | 1 | 0 |" in lines
    # Each failure with the case line that failed; skips grouped by reason.
    assert (
        "- **failed** `leases.fencing_heartbeat_run` at `reflow_conformance/suite/leases.py:"
        in text
    )
    # The reason's first line: here the differential check, which answers first.
    assert "differential check: handle 1.heartbeat_run(" in text
    assert (
        "- adapter 'broken-heartbeat' does not declare capability 'threads' (1): "
        "`concurrency.claim_threads`"
    ) in lines


def test_markdown_for_a_passing_adapter_has_no_failure_section() -> None:
    report = run_spec(
        AdapterSpec(
            name="memory-ok",
            factory=lambda url=None, clock=None: MemoryStorage(clock=clock),
            conformance_factory=lambda t, o, clock=None: MemoryStorage(clock=clock),
        ),
        select="claim",
    )
    text = to_markdown(report)
    assert "| result | **passed**:" in text
    assert "| distribution | in-process |" in text
    assert "Failures" not in text


def test_write_report_picks_the_format_by_suffix(tmp_path: Path) -> None:
    report = _report()
    write_report(tmp_path / "r.md", [report])
    write_report(tmp_path / "r.json", [report])
    assert (tmp_path / "r.md").read_text().startswith("## Reflow storage conformance")
    [decoded] = msgspec.json.decode((tmp_path / "r.json").read_bytes(), type=list[Report])
    assert decoded == report


def test_plugin_writes_markdown_for_md_and_json_otherwise(pytester: pytest.Pytester) -> None:
    md, js = pytester.path / "CONFORMANCE.md", pytester.path / "report.json"
    for path in (md, js):
        result = pytester.runpytest(
            "--reflow-adapter=memory",
            "--reflow-adapter=sqlite",
            "--reflow-select=claim,lifecycle",
            "--reflow-seed=11",
            f"--reflow-report={path}",
        )
        assert result.ret == pytest.ExitCode.OK
    text = md.read_text()
    assert text.count("## Reflow storage conformance:") == 2
    assert "`memory`" in text and "`sqlite`" in text
    assert "| Hypothesis seed | `11` (replay: `--reflow-seed=11`) |" in text
    assert "| distribution | reflow " in text
    assert "| lifecycle |" in text
    assert [r["adapter"] for r in json.loads(js.read_text())] == ["memory", "sqlite"]
