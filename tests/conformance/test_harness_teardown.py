"""Conformance factories with a teardown: generators and context managers.

A factory may return the adapter (the old style, still fine), or yield it from a
generator / async generator, or return a (sync or async) context manager around it. The
code after ``yield`` (or ``__exit__``) runs after each case once every handle is closed,
even when the case failed or ``initialize()`` raised; a server adapter drops its
throw-away schema there instead of leaking one per case.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from reflow_adapters.memory import MemoryStorage
from reflow_conformance.report import Outcome, Report, render_table
from reflow_conformance.runner import run_spec
from reflow_core import AdapterSpec
from reflow_core.registry import ConformanceFactory

TWO_CASES = "claim.oldest_first,leases.fencing_heartbeat_run"


class Logged(MemoryStorage):
    """Logs its close() into the shared event log."""

    log: list[str]

    async def close(self) -> None:
        self.log.append("close")
        await super().close()


def _spec(factory: ConformanceFactory, name: str = "torn-down") -> AdapterSpec:
    return AdapterSpec(
        name=name,
        factory=lambda url=None, clock=None: MemoryStorage(clock=clock),
        conformance_factory=factory,
    )


def _make(log: list[str], cls: type[Logged] = Logged, clock: Any = None) -> Logged:
    storage = cls(clock=clock)
    storage.log = log
    log.append("made")
    return storage


def _per_case(log: list[str]) -> list[list[str]]:
    cases: list[list[str]] = []
    for event in log:
        if event == "made":
            cases.append([])
        cases[-1].append(event)
    return cases


def test_generator_factory_is_torn_down_after_each_case() -> None:
    log: list[str] = []

    def factory(tmp_path: Path, options: Any, *, clock: Any = None) -> Iterator[Logged]:
        yield _make(log, clock=clock)
        log.append("teardown")

    report = run_spec(_spec(factory), select=TWO_CASES)
    assert report.ok, render_table(report)
    # Each case: the store is built, closed by the kit, then torn down — in that order.
    assert _per_case(log) == [["made", "close", "teardown"]] * 2


@pytest.mark.parametrize("style", ["async generator", "context manager", "async context manager"])
def test_other_teardown_styles(style: str) -> None:
    log: list[str] = []

    async def agen(tmp_path: Path, options: Any, *, clock: Any = None) -> AsyncIterator[Logged]:
        yield _make(log, clock=clock)
        log.append("teardown")

    @contextlib.contextmanager
    def cm(tmp_path: Path, options: Any, *, clock: Any = None) -> Iterator[Logged]:
        yield _make(log, clock=clock)
        log.append("teardown")

    @contextlib.asynccontextmanager
    async def acm(tmp_path: Path, options: Any, *, clock: Any = None) -> AsyncIterator[Logged]:
        yield _make(log, clock=clock)
        log.append("teardown")

    factory = {"async generator": agen, "context manager": cm, "async context manager": acm}
    report = run_spec(_spec(factory[style]), select=TWO_CASES)
    assert report.ok, render_table(report)
    assert _per_case(log) == [["made", "close", "teardown"]] * 2


def test_plain_factories_keep_working() -> None:
    log: list[str] = []
    report = run_spec(
        _spec(lambda tmp_path, options, clock=None: _make(log, clock=clock)), select=TWO_CASES
    )
    assert report.ok, render_table(report)
    assert _per_case(log) == [["made", "close"]] * 2


class BrokenHeartbeat(Logged):
    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        await super().heartbeat_run(run_id, lease_id)
        return True


class CannotInitialize(Logged):
    async def initialize(self) -> None:
        raise RuntimeError("server unreachable")


@pytest.mark.parametrize(
    ("cls", "outcome"), [(BrokenHeartbeat, Outcome.FAILED), (CannotInitialize, Outcome.ERROR)]
)
def test_teardown_runs_even_when_the_case_fails_or_setup_errors(
    cls: type[Logged], outcome: Outcome
) -> None:
    log: list[str] = []

    def factory(tmp_path: Path, options: Any, *, clock: Any = None) -> Iterator[Logged]:
        yield _make(log, cls, clock=clock)
        log.append("teardown")

    report = run_spec(_spec(factory), select="leases.fencing_heartbeat_run")
    assert [c.outcome for c in report.cases] == [outcome], render_table(report)
    assert log == ["made", "close", "teardown"]


def test_the_state_machine_tears_down_each_example_store_as_it_goes() -> None:
    live: list[int] = []
    counts = {"made": 0, "torn down": 0}

    def factory(tmp_path: Path, options: Any, *, clock: Any = None) -> Iterator[MemoryStorage]:
        counts["made"] += 1
        live.append(counts["made"] - counts["torn down"])
        yield MemoryStorage(clock=clock)
        counts["torn down"] += 1

    report = run_spec(_spec(factory), select="model.state_machine", seed=3)
    assert report.ok, render_table(report)
    assert counts["made"] > 20  # one store per example, plus the case's own
    assert counts["torn down"] == counts["made"]
    assert max(live) <= 2, "stores are torn down per example, not all at the end of the case"


def _error_of(factory: ConformanceFactory) -> str:
    report: Report = run_spec(_spec(factory), select="claim.oldest_first")
    [item] = report.cases
    assert item.outcome is Outcome.ERROR, render_table(report)
    return item.reason


def test_a_failing_teardown_is_a_harness_error() -> None:
    def factory(tmp_path: Path, options: Any, *, clock: Any = None) -> Iterator[MemoryStorage]:
        yield MemoryStorage(clock=clock)
        raise RuntimeError("could not drop schema")

    reason = _error_of(factory)
    assert "teardown raised RuntimeError: could not drop schema" in reason


def test_a_generator_must_yield_one_adapter() -> None:
    def nothing(tmp_path: Path, options: Any, *, clock: Any = None) -> Iterator[MemoryStorage]:
        return
        yield

    def twice(tmp_path: Path, options: Any, *, clock: Any = None) -> Iterator[MemoryStorage]:
        yield MemoryStorage(clock=clock)
        yield MemoryStorage(clock=clock)

    def no_adapter(tmp_path: Path, options: Any, *, clock: Any = None) -> Iterator[Any]:
        yield "not an adapter"

    assert "yielded nothing" in _error_of(nothing)
    assert "yielded twice" in _error_of(twice)
    assert "not a storage adapter" in _error_of(no_adapter)


def test_a_generator_factory_without_clock_is_named() -> None:
    def old(tmp_path: Path, options: Any) -> Iterator[MemoryStorage]:
        yield MemoryStorage()

    assert "factory(tmp_path, options, clock=clock)" in _error_of(old)


CONFTEST = """
from pathlib import Path

from reflow_adapters.memory import MemoryStorage
from reflow_core import AdapterSpec
from reflow_core.registry import register_adapter, unregister_adapter

LOG = Path(__file__).with_name("teardowns.log")


def fresh(tmp_path, options, *, clock=None):
    yield MemoryStorage(clock=clock)
    with LOG.open("a") as log:
        log.write("teardown\\n")
    if options.get("fail") == "yes":
        raise RuntimeError("could not drop schema")


register_adapter(AdapterSpec(
    name="with-teardown", factory=lambda url=None, **o: MemoryStorage(), conformance_factory=fresh,
))


def pytest_unconfigure(config):
    unregister_adapter("with-teardown")
"""


def test_plugin_runs_the_teardown_per_case_and_for_the_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        "def test_uses_storage(reflow_storage):\n    assert reflow_storage.storage\n"
    )
    result = pytester.runpytest(
        "--reflow-adapter=with-teardown", "--reflow-select=claim.oldest_first,runs"
    )
    passed = result.parseoutcomes()["passed"]
    assert result.ret == pytest.ExitCode.OK
    teardowns = (pytester.path / "teardowns.log").read_text().splitlines()
    assert len(teardowns) == passed  # every kit case, and the fixture's test


def test_plugin_reports_a_failing_teardown_as_an_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    path = pytester.path / "report.json"
    result = pytester.runpytest(
        "--reflow-adapter=with-teardown",
        "--reflow-select=claim.oldest_first",
        "--reflow-option=fail=yes",
        f"--reflow-report={path}",
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*harness error (not a contract failure): the conformance factory's teardown raised*"]
    )
    [report] = json.loads(path.read_text())
    assert report["totals"]["error"] == 1
    assert report["cases"][0]["outcome"] == "error"
