"""The storage conformance kit: every promise of the contract, as executable cases.

Use it from pytest (the plugin is installed with Reflow)::

    pytest --reflow-adapter=sqlite --reflow-adapter=memory --reflow-report=report.json

or as a library, without pytest::

    import reflow_conformance
    report = reflow_conformance.run("sqlite")  # seed=, stress= as for pytest
    print(reflow_conformance.render_table(report))
    reflow_conformance.write_report("CONFORMANCE.md", report)  # Markdown; JSON for .json

Names are imported lazily: the pytest plugin module lives in this package and is
imported by every pytest run of anyone who installs Reflow, so importing the package
must cost next to nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflow_conformance.cases import CONTRACT_VERSION, Case, case, select_cases
    from reflow_conformance.harness import ContractViolation, Harness, assert_exact
    from reflow_conformance.report import (
        Outcome,
        Report,
        render_table,
        to_markdown,
        write_report,
    )
    from reflow_conformance.runner import run, run_spec

__all__ = [
    "CONTRACT_VERSION",
    "Case",
    "ContractViolation",
    "Harness",
    "Outcome",
    "Report",
    "assert_exact",
    "case",
    "render_table",
    "run",
    "run_spec",
    "select_cases",
    "to_markdown",
    "write_report",
]

_WHERE = {
    "CONTRACT_VERSION": "cases",
    "Case": "cases",
    "case": "cases",
    "select_cases": "cases",
    "ContractViolation": "harness",
    "Harness": "harness",
    "assert_exact": "harness",
    "Outcome": "report",
    "Report": "report",
    "render_table": "report",
    "to_markdown": "report",
    "write_report": "report",
    "run": "runner",
    "run_spec": "runner",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'reflow_conformance' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"reflow_conformance.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
