"""The kit catches broken adapters: each deliberately broken rule fails the named cases.

Every adapter in :data:`broken_adapters.BROKEN` is the intact ``MemoryStorage`` with one
rule of the contract broken. Each is run through :func:`reflow_conformance.run_spec`
(restricted with ``select=`` to the areas concerned, to stay quick) and must fail at
least the cases listed for it: the table documents which case guards which rule. The
intact adapter must pass the whole kit.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from reflow_adapters.memory import MemoryStorage
from reflow_conformance import render_table, run_spec, select_cases
from reflow_conformance.report import Outcome, Report
from reflow_core import AdapterSpec


def _load_broken() -> ModuleType:
    # Loaded by path: tests/conformance is not a package, and the module must not be
    # collected as tests (its name does not start with test_).
    name = "reflow_tests_broken_adapters"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).with_name("broken_adapters.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


broken = _load_broken()
Broken = broken.Broken


def _spec(adapter: type[MemoryStorage], name: str) -> AdapterSpec:
    return AdapterSpec(
        name=name,
        factory=lambda url=None, clock=None: adapter(clock=clock),
        conformance_factory=lambda tmp_path, options, clock=None: adapter(clock=clock),
    )


def _ids(report: Report, outcome: Outcome) -> set[str]:
    return {c.id for c in report.cases if c.outcome is outcome}


def test_at_least_forty_distinct_broken_adapters() -> None:
    adapters = [b.adapter for b in broken.BROKEN]
    assert len(adapters) >= 40
    assert len(set(adapters)) == len(adapters), "each broken adapter appears once"
    assert len({b.rule for b in broken.BROKEN}) == len(adapters), "each breaks another rule"
    for b in broken.BROKEN:
        assert issubclass(b.adapter, MemoryStorage)
        assert b.adapter is not MemoryStorage
        assert b.caught_by, b.name


def test_expected_case_ids_exist_and_are_selected() -> None:
    """A typo in the table would make a test vacuous; every id must be a real, selected case."""
    for b in broken.BROKEN:
        selected = {c.id for c in select_cases(b.select)}
        assert b.caught_by <= selected, (b.name, sorted(b.caught_by - selected))


@pytest.mark.parametrize("b", broken.BROKEN, ids=lambda b: b.name)
def test_kit_catches_broken_adapter(b: Broken) -> None:
    report = run_spec(_spec(b.adapter, b.name), {}, select=b.select)
    failed = _ids(report, Outcome.FAILED)
    assert failed, f"{b.name} ({b.rule}) passed the kit:\n{render_table(report)}"
    assert not report.ok
    missing = sorted(b.caught_by - failed)
    assert not missing, (
        f"{b.name} ({b.rule}) was expected to fail {missing}; it failed {sorted(failed)}"
    )
    # A broken rule is the adapter's failure, never a harness error.
    assert _ids(report, Outcome.ERROR) == set(), render_table(report)


def test_intact_memory_adapter_passes_the_full_kit() -> None:
    report = run_spec(_spec(MemoryStorage, "intact-memory"), {})
    assert report.totals.failed == 0, render_table(report)
    assert report.totals.error == 0, render_table(report)
    assert report.totals.passed >= 230
    assert report.ok
    # Skips are only for capabilities memory does not declare, and say which.
    for item in report.cases:
        if item.outcome is Outcome.SKIPPED:
            assert item.reason.startswith("adapter 'intact-memory' does not declare"), item
