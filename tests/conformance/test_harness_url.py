"""The harness checks that ``open_storage(storage.url)`` opens the adapter under test again.

Cases that open other handles — racer threads and processes, a second handle, a reopening
— go through the store's URL. A subclass of a built-in adapter that keeps the built-in's
URL scheme would have them run against the built-in adapter and pass for the wrong
reason; the harness makes that a harness error (never a pass) that says what happened and
how to fix it, and lets an adapter with a scheme of its own through.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reflow_adapters.sqlite import SQLiteStorage
from reflow_adapters.sqlite_common.url import storage_arguments
from reflow_conformance.report import Outcome, render_table
from reflow_conformance.runner import run_spec
from reflow_core import AdapterSpec, Capability
from reflow_core.registry import register_adapter, unregister_adapter

SHARING = frozenset({Capability.THREADS, Capability.DURABLE, Capability.CROSS_PROCESS})
# One case per way of opening another handle: racer threads, a second handle, reopening.
SHARING_CASES = (
    "concurrency.claim_threads,lifecycle.second_handle_sees_writes,lifecycle.reopen_keeps_state"
)


class LeakySQLite(SQLiteStorage):
    """Broken (heartbeats always succeed), and keeps the built-in ``sqlite`` URL scheme."""

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        await super().heartbeat_run(run_id, lease_id)
        return True


def _leaky_spec() -> AdapterSpec:
    return AdapterSpec(
        name="leaky-sqlite",
        factory=lambda url=None, **options: LeakySQLite(url or ":memory:"),
        capabilities=SHARING,
        conformance_factory=lambda tmp_path, options, clock=None: LeakySQLite(
            tmp_path / "leaky.db", clock=clock
        ),
    )


def test_subclass_keeping_the_builtin_scheme_is_a_harness_error() -> None:
    report = run_spec(_leaky_spec(), select=SHARING_CASES)
    assert {c.id: c.outcome for c in report.cases} == dict.fromkeys(
        SHARING_CASES.split(","), Outcome.ERROR
    ), render_table(report)
    reason = report.cases[0].reason
    # What happened: the URL, what it built and through which adapter, what was expected.
    assert "open_storage('sqlite:///" in reason
    assert "built reflow_adapters.sqlite.storage.SQLiteStorage through adapter 'sqlite'" in reason
    assert "'leaky-sqlite'" in reason and "LeakySQLite" in reason
    # How to fix it.
    assert "URL scheme of its own" in reason
    assert "register" in reason


def test_cases_that_open_no_other_handle_still_run() -> None:
    report = run_spec(_leaky_spec(), select="claim.oldest_first,leases.fencing_heartbeat_run")
    outcomes = {c.id: c.outcome for c in report.cases}
    assert outcomes == {
        "claim.oldest_first": Outcome.PASSED,
        "leases.fencing_heartbeat_run": Outcome.FAILED,  # the bug itself is still caught
    }, render_table(report)


class OwnScheme(SQLiteStorage):
    """The same subclass done right: a URL scheme of its own, registered."""

    scheme = "kitsqlite"


def _own_scheme(url: str | None = None, **options: Any) -> OwnScheme:
    path, arguments = storage_arguments(url, "kitsqlite", options)
    return OwnScheme(path, **arguments)


@pytest.fixture
def own_scheme_spec() -> Iterator[AdapterSpec]:
    spec = AdapterSpec(
        name="own-scheme-sqlite",
        factory=_own_scheme,
        schemes=("kitsqlite",),
        capabilities=SHARING,
        conformance_factory=lambda tmp_path, options, clock=None: OwnScheme(
            Path(tmp_path) / "own.db", clock=clock
        ),
    )
    register_adapter(spec)
    try:
        yield spec
    finally:
        unregister_adapter(spec.name)


def test_subclass_with_its_own_registered_scheme_passes(own_scheme_spec: AdapterSpec) -> None:
    report = run_spec(own_scheme_spec, select=SHARING_CASES)
    assert report.totals.passed == report.totals.total == 3, render_table(report)


def test_the_builtin_adapters_open_themselves_again() -> None:
    from reflow_conformance.runner import load_spec

    report = run_spec(load_spec("sqlite"), select=SHARING_CASES)
    assert report.totals.passed == report.totals.total == 3, render_table(report)


CONFTEST = """
from reflow_adapters.sqlite import SQLiteStorage
from reflow_core import AdapterSpec, Capability
from reflow_core.registry import register_adapter, unregister_adapter


class LeakySQLite(SQLiteStorage):
    async def heartbeat_run(self, run_id, lease_id):
        await super().heartbeat_run(run_id, lease_id)
        return True


register_adapter(AdapterSpec(
    name="leaky-sqlite",
    factory=lambda url=None, **o: LeakySQLite(url or ":memory:"),
    capabilities=frozenset({Capability.THREADS}),
    conformance_factory=lambda tmp_path, options, clock=None: LeakySQLite(
        tmp_path / "leaky.db", clock=clock
    ),
))


def pytest_unconfigure(config):
    unregister_adapter("leaky-sqlite")
"""


def test_plugin_reports_the_url_mismatch_as_an_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest(
        "--reflow-adapter=leaky-sqlite",
        "--reflow-select=concurrency.claim_threads,claim.oldest_first",
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*harness error (not a contract failure): open_storage('sqlite:///*) built "
            "*SQLiteStorage through adapter 'sqlite'*",
            "ERROR reflow[[]leaky-sqlite[]]::concurrency.claim_threads*",
        ]
    )
