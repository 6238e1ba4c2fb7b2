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
teardown closes every handle and runs the conformance factory's teardown.

Every case runs under differential checking (:mod:`reflow_conformance.differential`):
after each operation the adapter's whole observable state is compared with the kit's
reference model; ``--reflow-differential=off`` skips that for a quicker run.

The session has one Hypothesis seed (``--reflow-seed=N``, else a random one), shown in
the header and the summary and added to every failure of a Hypothesis-driven case, so
``--reflow-seed=N`` replays it. ``--reflow-stress=N`` repeats race cases and multiplies
Hypothesis example counts. ``--reflow-report=PATH`` writes JSON, or Markdown for ``.md``.

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

import importlib.util
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

    def __init__(
        self, specs: list[AdapterSpec], options: dict[str, str], seed: int, stress: int
    ) -> None:
        self.specs = specs
        self.options = options
        self.seed = seed
        """The session's Hypothesis seed: given by --reflow-seed, or drawn at random."""
        self.seed_given = False
        self.stress = stress
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
        help="write the conformance report(s) to PATH: a Markdown summary for a .md path, "
        "JSON otherwise",
    )
    group.addoption(
        "--reflow-seed",
        type=int,
        default=None,
        metavar="N",
        help="Hypothesis seed for the Hypothesis-driven cases (values, model, ...); replays "
        "an earlier session's. Default: a random seed, printed in the header and summary",
    )
    group.addoption(
        "--reflow-stress",
        type=int,
        default=1,
        metavar="N",
        help="run every race case N times (each on a fresh store) and multiply Hypothesis "
        "example counts by N, for deeper runs (default 1; the run takes about N times longer "
        "for those cases)",
    )
    group.addoption(
        "--reflow-differential",
        choices=("full", "off"),
        default=None,
        help="compare the adapter's whole observable state with the kit's reference model "
        "after every operation of every case: 'full' (default) or 'off' for a quicker, "
        "shallower run (also REFLOW_DIFFERENTIAL=off)",
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
    stress: int = config.getoption("reflow_stress")
    if stress < 1:
        raise pytest.UsageError(f"--reflow-stress expects a count >= 1, got {stress}")
    if importlib.util.find_spec("hypothesis") is None:
        # Said here, before collection: an error raised while collecting is masked by
        # the "no case to run" check, and a traceback would not say what to install.
        raise pytest.UsageError(
            "--reflow-adapter: the conformance kit needs Hypothesis, which is not "
            "installed; install the kit's extra: pip install 'reflow[conformance]'"
        )
    from reflow_conformance.runner import load_spec, new_seed
    from reflow_core.errors import ReflowError

    given: int | None = config.getoption("reflow_seed")
    # Under pytest-xdist a worker takes the controller's seed, so all share one.
    worker_seed = getattr(config, "workerinput", {}).get("reflow_seed")
    seed = given if given is not None else worker_seed if worker_seed is not None else new_seed()

    specs = []
    for name in dict.fromkeys(names):
        try:
            specs.append(load_spec(name))
        except ReflowError as exc:
            raise pytest.UsageError(f"--reflow-adapter={name}: {exc}") from None
    from reflow_conformance.differential import set_mode

    set_mode(config.getoption("reflow_differential"))
    state = _KitState(specs, options, seed, stress)
    state.seed_given = given is not None
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
        self.harness_errors: set[str] = set()
        """Phases ("call", "teardown") that ended in a HarnessError: errors, not failures."""
        self.failure_location = ""
        """The case line that failed, for the report."""
        self.failure_reason = ""
        """The failure as the runner describes it, for the report."""
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
        stress = "" if state.stress == 1 else f" --reflow-stress={state.stress}"
        self.session_ = CaseSession(
            self.case,
            self.spec,
            state.options,
            Path(self._tmp.name),
            seed=state.seed,
            stress=state.stress,
            replay=f"replay with: pytest --reflow-adapter={self.spec.name} "
            f"--reflow-select={self.case.id} --reflow-seed={state.seed}{stress}",
        )
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
        from reflow_conformance.harness import HarnessError, case_location
        from reflow_conformance.runner import describe_failure

        assert self.session_ is not None
        try:
            self.session_.call()
        except HarnessError:
            self.harness_errors.add("call")
            raise
        except Exception as exc:
            # The case failed: the end-of-case drain of buffered events would only add a
            # second report about a store the case left half-way.
            self.session_.harness.lose_track("the case failed")
            self.failure_location = case_location(exc, self.case.function)
            self.failure_reason = describe_failure(exc, self.case)
            raise

    def teardown(self) -> None:
        from reflow_conformance.harness import HarnessError

        problem = None
        try:
            if self.session_ is not None:
                self.session_.teardown()
        except HarnessError as exc:
            self.harness_errors.add("teardown")
            problem = str(exc)
        finally:
            self.session_ = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
        if problem is not None:
            # The factory's teardown failed: the kit's error, not the adapter's failure.
            pytest.fail(f"harness error (not a contract failure): {problem}", pytrace=False)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        """The promise, the message, the case line that failed, then the exception's
        notes: Hypothesis' falsifying example — for the state machine, the shortest
        failing sequence of calls — and the seed that replays it."""
        from reflow_conformance.harness import HarnessError, case_location

        value = excinfo.value
        if isinstance(value, HarnessError):
            return f"harness error (not a contract failure): {value}"
        header = f"[{self.case.id}] {self.case.description}"
        where = case_location(value, self.case.function, source=True)
        at = f"\n  at {where}" if where else ""
        if isinstance(value, AssertionError):
            notes = "".join(f"\n{note}" for note in getattr(value, "__notes__", None) or ())
            return f"{header}\n{value or 'assertion failed'}{at}{notes}"
        # An unexpected exception: pytest's own (short) traceback, with the kit's helper
        # frames hidden (see _traceback_filter); it prints the notes too.
        trace = super().repr_failure(excinfo, style="short")
        return f"{header}\nunexpected {type(value).__name__}{at}\n{trace}"

    def _traceback_filter(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:
        """Start the traceback at the case function; drop frames that set
        ``__tracebackhide__`` (the kit's helpers, such as ``expect``)."""
        traceback = excinfo.traceback
        try:
            path = Path(inspect.getfile(self.case.function))
        except (OSError, TypeError):
            return traceback.filter(excinfo)
        cut = traceback.cut(path=path)
        return cut.filter(excinfo) if len(cut) else traceback.filter(excinfo)

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
            # Through genitems, as pytest collects its own nodes: it reports the suite
            # (pytest_collectreport) and each item (pytest_itemcollected), so "collected N
            # items" and ``--collect-only`` count the cases.
            for item in session.genitems(suite):
                if isinstance(item, ReflowCaseItem):
                    self.state.items[item.nodeid] = item
                    items.append(item)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """The differential mode is the process's; give it back (pytester runs nest)."""
        from reflow_conformance.differential import set_mode

        set_mode(None)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """pytest-xdist: every worker runs with the controller's seed."""
        node.workerinput["reflow_seed"] = self.state.seed

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        from reflow_core.storage import CONTRACT_VERSION

        names = ", ".join(spec.name for spec in self.state.specs)
        return [f"reflow conformance: {names}; contract {CONTRACT_VERSION}; " + self._seed_text()]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if terminalreporter.config.getoption("collectonly"):
            return
        terminalreporter.write_line(f"reflow conformance: {self._seed_text()}")

    def _seed_text(self) -> str:
        state = self.state
        how = "given" if state.seed_given else "random"
        stress = f"; stress {state.stress}" if state.stress != 1 else ""
        return (
            f"Hypothesis seed {state.seed} ({how}; replay with --reflow-seed={state.seed}){stress}"
        )

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
            harness = report.when == "setup" or report.when in item.harness_errors
            outcome = Outcome.ERROR if harness else Outcome.FAILED
            reason = str(report.longrepr)
            if report.when == "call" and item.failure_reason and not harness:
                reason = item.failure_reason  # the same text as the runner's report
        location = item.failure_location if outcome is Outcome.FAILED else ""
        self.state.outcomes[report.nodeid] = CaseReport(
            id=item.case.id,
            area=item.case.area,
            outcome=outcome,
            reason=reason,
            duration_s=round(duration, 4),
            location=location or (previous.location if previous else ""),
        )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write ``--reflow-report`` (one report per adapter): Markdown for ``.md``."""
        path = session.config.getoption("reflow_report")
        if not path:
            return
        from reflow_conformance.report import write_report

        write_report(path, [_report(self.state, spec) for spec in self.state.specs])


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
        seed=state.seed,
        stress=state.stress,
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
