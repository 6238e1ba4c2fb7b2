"""The kit kills every single-fault adapter built on the real SQLite and PostgreSQL adapters.

Each fault in :mod:`faults` (``tests/conformance/faults``) is the shipped adapter with one
query fragment, one column declaration or one method body changed, registered as an
adapter of its own name and URL scheme. It is run through
``reflow_conformance.run(name, select=...)`` restricted to the cases named for it, and
each of those must *fail* (never error): the table in ``faults/`` documents which case
catches which mistake. The intact adapters must pass the same cases, so no kill is an
artefact of a case that fails everywhere.

``bench/kit_kill_rate.py`` runs the same faults many times to show each is killed every
time (and how often each race case alone catches a split check-then-write).

Speed: each fault runs only its named cases, in-process, and up to :data:`PARALLEL`
faults run at once in a thread pool (a test submits itself and the next few faults, then
waits for its own report), since most of a fault's time is spent waiting on fsync, the
server or a barrier, not on this process's CPU. Faults whose cases drive Hypothesis run
in the test's own thread (Hypothesis is not thread-safe).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

# The faults package must import by the same name here and in the kit's racer processes
# (spawned children inherit sys.path), so tests/conformance goes on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import faults
from faults import TOPICS, Fault
from postgres_fixtures import postgres_dsn

from reflow_conformance import render_table, run, select_cases
from reflow_conformance.report import Outcome, Report
from reflow_core.storage import StorageAdapter, WorkNotifier

FAULTS = faults.all_faults()
SQLITE = [f for f in FAULTS if f.base == "sqlite"]
POSTGRES = [f for f in FAULTS if f.base == "postgres"]


def _methods(protocol: type) -> set[str]:
    return {
        name
        for name, member in vars(protocol).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }


CONTRACT_METHODS = _methods(StorageAdapter) | _methods(WorkNotifier)


PARALLEL = int(os.environ.get("REFLOW_FAULTS_PARALLEL", "4"))
"""Faults run at once (``REFLOW_FAULTS_PARALLEL`` overrides; 1 runs them one by one)."""

_pool: ThreadPoolExecutor | None = None
_reports: dict[str, Future[Report]] = {}


@pytest.fixture(scope="module", autouse=True)
def _installed() -> Iterator[None]:
    global _pool
    faults.install()
    _pool = ThreadPoolExecutor(max(1, PARALLEL), thread_name_prefix="fault")
    yield
    _pool.shutdown(wait=True, cancel_futures=True)
    _pool = None
    _reports.clear()
    faults.uninstall()


def _runnable(fault: Fault) -> bool:
    """Whether the fault can run here without skipping (PostgreSQL reachable)."""
    if fault.base != "postgres":
        return True
    try:
        postgres_dsn()
    except (pytest.skip.Exception, pytest.fail.Exception):
        return False
    return True


def _parallel_safe(fault: Fault) -> bool:
    return not any(c.uses_hypothesis for c in select_cases(fault.select))


def _report(fault: Fault) -> Report:
    """The fault's report: submitted with the next faults in line, then awaited."""
    start = FAULTS.index(fault)
    for ahead in FAULTS[start : start + max(1, PARALLEL)]:
        if ahead.name in _reports or not _parallel_safe(ahead) or not _runnable(ahead):
            continue
        assert _pool is not None
        _reports[ahead.name] = _pool.submit(run, ahead.name, {}, select=ahead.select)
    future = _reports.pop(fault.name, None)
    if future is None:
        return run(fault.name, {}, select=fault.select)
    return future.result()


def _needs_server(fault: Fault) -> None:
    if fault.base == "postgres":
        postgres_dsn()  # skips without a server; fails under REFLOW_REQUIRE_SERVERS=1


def _ids(report: Report, outcome: Outcome) -> set[str]:
    return {c.id for c in report.cases if c.outcome is outcome}


def test_at_least_sixty_distinct_faults_on_both_adapters() -> None:
    assert len(FAULTS) >= 60
    assert len(SQLITE) >= 35
    assert len(POSTGRES) >= 25
    assert len({f.name for f in FAULTS}) == len(FAULTS)
    assert len({f.adapter for f in FAULTS}) == len(FAULTS), "one adapter class per fault"
    for f in FAULTS:
        assert f.caught_by, f.name
        assert f.topic in TOPICS, (f.name, f.topic)
        assert f.kind in {"query", "schema", "method"}, f.name
        assert f.adapter.scheme == f.name, "its own URL scheme, so URLs reopen the fault"


def test_every_kind_of_change_on_each_adapter() -> None:
    for base in (SQLITE, POSTGRES):
        assert {f.kind for f in base} == {"query", "schema", "method"}
        assert sum(f.race for f in base) >= 8, "split check-then-write faults"


def test_every_contract_method_is_faulted() -> None:
    faulted = {m for f in FAULTS for m in f.methods}
    assert CONTRACT_METHODS - faulted == set()


def test_every_rule_is_faulted() -> None:
    assert {f.topic for f in FAULTS} == set(TOPICS)


def test_named_cases_exist() -> None:
    """A typo would make a kill vacuous: every named case must be a registered case."""
    known = {c.id for c in select_cases()}
    for f in FAULTS:
        assert f.caught_by <= known, (f.name, sorted(f.caught_by - known))


@pytest.mark.parametrize(
    "base",
    [
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
def test_intact_adapter_passes_every_named_case(base: str) -> None:
    if base == "postgres":
        postgres_dsn()
    named = sorted({c for f in FAULTS if f.base == base for c in f.caught_by})
    hypothesis = {c.id for c in select_cases(",".join(named)) if c.uses_hypothesis}
    rest = [c for c in named if c not in hypothesis]
    chunks = [rest[i :: max(1, PARALLEL)] for i in range(max(1, PARALLEL))]
    with ThreadPoolExecutor(max(1, PARALLEL)) as pool:
        futures = [pool.submit(run, base, {}, select=",".join(c)) for c in chunks if c]
        reports = [run(base, {}, select=",".join(sorted(hypothesis)))] if hypothesis else []
        reports += [f.result() for f in futures]
    for report in reports:
        assert _ids(report, Outcome.FAILED) == set(), render_table(report)
        assert _ids(report, Outcome.ERROR) == set(), render_table(report)
    assert set().union(*(_ids(r, Outcome.PASSED) for r in reports)) == set(named)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(f, id=f.name, marks=[pytest.mark.postgres] if f.base == "postgres" else [])
        for f in FAULTS
    ],
)
def test_kit_kills_fault(fault: Fault) -> None:
    _needs_server(fault)
    report = _report(fault)
    failed = _ids(report, Outcome.FAILED)
    if fault.race:
        # A split check/write must fall to at least one of the modes that race it, in
        # every run: any one mode alone can miss a window on a loaded machine.
        caught = sorted(fault.measured & failed)
        assert caught, f"{fault.name} ({fault.change}) survived every race:\n{render_table(report)}"
    missing = [] if fault.race else sorted(fault.caught_by - failed)
    assert not missing, f"{fault.name} ({fault.change}) survived {missing}:\n{render_table(report)}"
    # A fault is the adapter's failure, never a harness error.
    assert _ids(report, Outcome.ERROR) == set(), render_table(report)
