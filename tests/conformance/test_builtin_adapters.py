"""Every built-in adapter keeps the whole storage contract, as the kit states it.

This is the same run a third party gets from ``pytest --reflow-adapter=NAME``; here it
goes through the library entry point so one test reports one adapter.
"""

from __future__ import annotations

import pytest
from postgres_fixtures import postgres_dsn

import reflow_conformance
from reflow_conformance.report import render_table


# The whole kit is one test per adapter: minutes, not the default 120 s, on a busy machine.
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "adapter",
    ["memory", "sqlite", "apsw", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def test_builtin_adapter_keeps_the_contract(adapter: str) -> None:
    options = {"dsn": postgres_dsn()} if adapter == "postgres" else {}
    report = reflow_conformance.run(adapter, options)
    assert report.totals.failed == 0 and report.totals.error == 0, render_table(report)
    # Skips are only for capabilities the adapter does not declare, never silent passes.
    for case in report.cases:
        if case.outcome == "skipped":
            assert "does not declare capability" in case.reason, (case.id, case.reason)
    assert report.totals.passed >= 240, render_table(report)
