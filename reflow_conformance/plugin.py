"""The pytest plugin: ``pytest --reflow-adapter=NAME`` runs the conformance suite.

Registered under the ``pytest11`` entry-point group, so it is loaded by *every* pytest
run in an environment where Reflow is installed. Therefore:

* without ``--reflow-adapter`` it does nothing beyond declaring its options, markers
  and the ``reflow_storage`` fixture;
* it imports nothing heavy at module level (the suite, Hypothesis and the adapters are
  imported only when an adapter is given).

With ``--reflow-adapter``, the suite is added to the session as items
``reflow[NAME]::area.case`` — from any directory, test files or not. Each item runs in
pytest's three phases: setup builds and initializes a fresh adapter (a failure there is
the kit's *error*), call runs the case (an assertion is the adapter's *failure*),
teardown closes every handle.

The ``reflow_storage`` fixture hands other test suites a fresh initialized adapter per
test, parametrised over every ``--reflow-adapter``. It is synchronous (pytest has no
async fixtures of its own): it yields a :class:`~reflow_conformance.harness.Harness`
whose ``storage`` is the adapter and whose ``sync(coroutine)`` runs a coroutine on the
event loop the adapter lives on::

    def test_enqueue(reflow_storage):
        engine = Engine(reflow_storage.storage, [wf])
        run = reflow_storage.sync(engine.enqueue("wf", {"n": 1}))
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from reflow_conformance.cases import Case
    from reflow_conformance.harness import Harness
    from reflow_conformance.report import CaseReport, Report
    from reflow_conformance.runner import CaseSession
    from reflow_core.registry import AdapterSpec

_STATE = pytest.StashKey["_KitState"]()


class _KitState:
    """What the plugin knows once options are parsed (only when an adapter is given)."""

    def __init__(self, specs: list[AdapterSpec], options: dict[str, str]) -> None:
        self.specs = specs
        self.options = options
        self.outcomes: dict[str, CaseReport] = {}
        self.items: dict[str, ReflowCaseItem] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reflow", "Reflow storage conformance kit")
    group.addoption(
        "--reflow-adapter",
        action="append",
        default=[],
        metavar="NAME",
        help="run the storage conformance suite against the installed adapter NAME "
        "(repeatable); also parametrises the reflow_storage fixture",
    )
    group.addoption(
        "--reflow-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option passed to the adapters' conformance factory (repeatable), e.g. dsn=...",
    )
    group.addoption(
        "--reflow-report",
        default=None,
        metavar="PATH",
        help="write the conformance report(s) as JSON to PATH",
    )
    group.addoption(
        "--reflow-select",
        default=None,
        metavar="PATTERNS",
        help="only these cases: comma-separated ids, areas or globs (e.g. 'claim,leases.*')",
    )
    group.addoption(
        "--reflow-no-suite",
        action="store_true",
        default=False,
        help="do not add the conformance cases; only parametrise the reflow_storage fixture",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Markers are registered unconditionally so --strict-markers accepts them anywhere.
    config.addinivalue_line("markers", "reflow_conformance: a storage conformance case")
    config.addinivalue_line("markers", "reflow_area(name): the contract area of a case")
    config.addinivalue_line("markers", "reflow_adapter(name): the adapter a case runs against")
    names: list[str] = config.getoption("reflow_adapter") or []
    if not names:
        return
    options: dict[str, str] = {}
    for item in config.getoption("reflow_option") or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise pytest.UsageError(f"--reflow-option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value
    from reflow_conformance.runner import load_spec
    from reflow_core.errors import ReflowError

    specs = []
    for name in dict.fromkeys(names):
        try:
            specs.append(load_spec(name))
        except ReflowError as exc:
            raise pytest.UsageError(f"--reflow-adapter={name}: {exc}") from None
    state = _KitState(specs, options)
    config.stash[_STATE] = state
    config.pluginmanager.register(_KitPlugin(state), "reflow-conformance-kit")


class ReflowSuite(pytest.Collector):
    """The suite for one adapter: node ``reflow[NAME]``, one item per case."""

    def __init__(self, *, spec: AdapterSpec, cases: list[Case], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.cases = cases

    def collect(self) -> list[ReflowCaseItem]:
        return [
            ReflowCaseItem.from_parent(self, name=case.id, case=case, spec=self.spec)
            for case in self.cases
        ]


class ReflowCaseItem(pytest.Item):
    """One conformance case against one adapter."""

    def __init__(self, *, case: Case, spec: AdapterSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.spec = spec
        self.session_: CaseSession | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.add_marker(pytest.mark.reflow_conformance)
        self.add_marker(pytest.mark.reflow_area(case.area))
        self.add_marker(pytest.mark.reflow_adapter(spec.name))

    def setup(self) -> None:
        from reflow_conformance.runner import CaseSession, skip_reason

        reason = skip_reason(self.case, self.spec)
        if reason is not None:
            pytest.skip(reason)
        state = self.config.stash[_STATE]
        self._tmp = tempfile.TemporaryDirectory(
            prefix="reflow-conformance-", ignore_cleanup_errors=True
        )
        self.session_ = CaseSession(self.case, self.spec, state.options, Path(self._tmp.name))
        from reflow_conformance.harness import HarnessError

        problem = None
        try:
            self.session_.setup()
        except HarnessError as exc:
            problem = str(exc)
        if problem is not None:
            # An error in setup (not a failure): the kit could not test the contract.
            pytest.fail(f"harness error (not a contract failure): {problem}", pytrace=False)

    def runtest(self) -> None:
        assert self.session_ is not None
        self.session_.call()

    def teardown(self) -> None:
        try:
            if self.session_ is not None:
                self.session_.teardown()
        finally:
            self.session_ = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        from reflow_conformance.harness import HarnessError

        if isinstance(excinfo.value, HarnessError):
            return f"harness error (not a contract failure): {excinfo.value}"
        if isinstance(excinfo.value, AssertionError) and str(excinfo.value):
            where = excinfo.traceback[-1] if excinfo.traceback else None
            location = f"\n  at {where.path}:{where.lineno + 1}" if where else ""
            return f"[{self.case.id}] {self.case.description}\n{excinfo.value}{location}"
        return super().repr_failure(excinfo, style="short")

    def reportinfo(self) -> tuple[Path, int, str]:
        function = self.case.function
        try:
            path = Path(inspect.getfile(function))
            line = inspect.getsourcelines(function)[1]
        except (OSError, TypeError):
            path, line = Path(__file__), 0
        return path, line, f"reflow[{self.spec.name}]::{self.case.id}"


class _KitPlugin:
    """Hooks active only when ``--reflow-adapter`` was given (registered in configure)."""

    def __init__(self, state: _KitState) -> None:
        self.state = state

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        """Add the suite's items before -k/-m deselection, so those options apply to them."""
        if config.getoption("reflow_no_suite"):
            return
        from reflow_conformance.cases import select_cases

        try:
            cases = select_cases(config.getoption("reflow_select"))
        except (LookupError, ImportError) as exc:
            raise pytest.UsageError(f"--reflow-select: {exc}") from None
        for spec in self.state.specs:
            name = f"reflow[{spec.name}]"
            suite = ReflowSuite.from_parent(session, name=name, nodeid=name, spec=spec, cases=cases)
            for item in suite.collect():
                self.state.items[item.nodeid] = item
                items.append(item)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """A run that selects no conformance case is an error, not a silent pass."""
        if session.config.getoption("reflow_no_suite"):
            return
        if not any(isinstance(item, ReflowCaseItem) for item in session.items):
            raise pytest.UsageError(
                "the options given (-k, -m, --deselect, --reflow-select) leave no "
                "conformance case to run; a conformance run that checks nothing is not a pass"
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Record each case's outcome with the runner's classification (for the report)."""
        from reflow_conformance.report import CaseReport, Outcome

        item = self.state.items.get(report.nodeid)
        if item is None:
            return
        previous = self.state.outcomes.get(report.nodeid)
        duration = report.duration + (previous.duration_s if previous else 0.0)
        outcome = previous.outcome if previous else Outcome.PASSED
        reason = previous.reason if previous else ""
        if report.skipped:
            outcome = Outcome.SKIPPED
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            reason = reason.removeprefix("Skipped: ")
        elif report.failed and outcome is Outcome.PASSED:
            outcome = Outcome.ERROR if report.when == "setup" else Outcome.FAILED
            reason = str(report.longrepr)
        self.state.outcomes[report.nodeid] = CaseReport(
            id=item.case.id,
            area=item.case.area,
            outcome=outcome,
            reason=reason,
            duration_s=round(duration, 4),
        )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write ``--reflow-report`` (one report per adapter)."""
        path = session.config.getoption("reflow_report")
        if not path:
            return
        from reflow_conformance.report import to_json

        reports = [_report(self.state, spec) for spec in self.state.specs]
        Path(path).write_bytes(to_json(reports))


def _report(state: _KitState, spec: AdapterSpec) -> Report:
    from reflow_conformance.cases import CONTRACT_VERSION
    from reflow_conformance.report import Report, Totals

    prefix = f"reflow[{spec.name}]::"
    cases = [r for nodeid, r in state.outcomes.items() if nodeid.startswith(prefix)]
    return Report(
        contract_version=CONTRACT_VERSION,
        adapter=spec.name,
        version=spec.version,
        distribution=spec.distribution,
        capabilities=sorted(c.value for c in spec.capabilities),
        cases=cases,
        totals=Totals.of(cases),
        duration_s=round(sum(c.duration_s for c in cases), 3),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``reflow_storage`` over every ``--reflow-adapter``."""
    if "reflow_storage" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash.get(_STATE, None)
    names = [spec.name for spec in state.specs] if state is not None else []
    if names:
        metafunc.parametrize("reflow_storage", names, indirect=True, ids=names)


@pytest.fixture
def reflow_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A fresh, initialized adapter per test, for each ``--reflow-adapter``.

    Yields a :class:`~reflow_conformance.harness.Harness`: ``.storage`` is the adapter,
    ``.sync(coroutine)`` runs a coroutine on the adapter's own event loop, ``.spec`` is
    its :class:`~reflow_core.AdapterSpec`. The adapter runs on the kit's manual clock:
    ``.clock`` is its "now", ``.advance(ms)`` moves it. Everything is closed after the
    test.
    Skipped (saying so) when no ``--reflow-adapter`` was given.
    """
    state = request.config.stash.get(_STATE, None)
    name = getattr(request, "param", None)
    if state is None or name is None:
        pytest.skip("reflow_storage needs --reflow-adapter=NAME")
    import asyncio

    from reflow_conformance.harness import Harness

    spec = next(s for s in state.specs if s.name == name)
    loop = asyncio.new_event_loop()
    harness = Harness(spec, state.options, tmp_path, loop)
    try:
        loop.run_until_complete(harness.setup())
        yield harness
    finally:
        try:
            errors = loop.run_until_complete(harness.close_all())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
        if errors:
            raise errors[0]
