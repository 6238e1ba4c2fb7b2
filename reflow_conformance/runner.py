"""Run the suite against an adapter without pytest: ``run("sqlite")`` returns a Report.

Each case runs in three phases, exactly as the pytest plugin runs it, so both report the
same outcomes: *setup* (a fresh temporary directory, the adapter's conformance factory,
``initialize()``), *call* (the case), *teardown* (``close()`` every handle and the
factory's own teardown, even after a failure). A failure in setup or in the factory's
teardown is the kit's ``error``; an assertion or an unexpected exception during the call
is the adapter's ``failed``, reported with the case line that failed.

Hypothesis-driven cases run under one recorded seed per run (``seed=``, random unless
given; the report carries it), so a failure can be replayed and a pass reproduced.
``stress=N`` runs every race case N times (each on a fresh store) and multiplies the
Hypothesis example counts by N.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from reflow_conformance.cases import CONTRACT_VERSION, Case, select_cases
from reflow_conformance.harness import SHARING, Harness, HarnessError, case_location
from reflow_conformance.report import CaseReport, Outcome, Report, Totals
from reflow_core.errors import AdapterError, AdapterNotFoundError
from reflow_core.registry import AdapterSpec, adapter_specs

__all__ = [
    "CaseSession",
    "describe_failure",
    "hypothesis_seeded",
    "load_spec",
    "new_seed",
    "run",
    "run_case",
    "run_spec",
    "skip_reason",
]

CASE_TIMEOUT_S = 300.0
"""An async case that takes longer has hung (a deadlocked adapter); it fails."""


def load_spec(name: str) -> AdapterSpec:
    """The adapter called ``name``, loaded through the ``reflow`` entry points.

    Raises :class:`AdapterNotFoundError` listing the installed adapters and any entry
    point that failed to load (a packaging mistake the kit must surface).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = adapter_specs()
    spec = specs.get(name)
    if spec is not None:
        if spec.conformance_factory is None:
            raise AdapterError(
                f"adapter {name!r} ({spec.distribution or 'in-process'}) has no "
                "conformance_factory in its AdapterSpec, so the kit cannot test it"
            )
        return spec
    installed = ", ".join(sorted(specs)) or "none"
    broken = "".join(f"\n  {w.message}" for w in caught if "reflow" in str(w.message))
    raise AdapterNotFoundError(
        f"no storage adapter named {name!r}; installed adapters: {installed}"
        + (f"\nentry points that failed to load:{broken}" if broken else "")
    )


def skip_reason(case: Case, spec: AdapterSpec) -> str | None:
    """Why ``case`` does not apply to ``spec``, or ``None`` if it does."""
    missing = case.missing_capabilities(spec.capabilities)
    if not missing:
        return None
    names = ", ".join(repr(c.value) for c in missing)
    plural = "capabilities" if len(missing) > 1 else "capability"
    return f"adapter {spec.name!r} does not declare {plural} {names}"


def new_seed() -> int:
    """A fresh random seed for a run that was given none (printed and reported)."""
    return random.SystemRandom().randrange(1, 2**32)


@contextlib.contextmanager
def hypothesis_seeded(seed: int | None, stress: int = 1) -> Iterator[None]:
    """Within: every Hypothesis test runs from ``seed`` and the kit's example counts are
    multiplied by ``stress``; both are restored afterwards.

    The seed is Hypothesis' global forced seed (what its own ``--hypothesis-seed`` sets),
    so it reaches the ``@given`` tests and state machines that cases build inside their
    bodies; the kit's settings keep ``database=None``, so nothing else carries over from
    one run to the next.
    """
    from hypothesis import core

    from reflow_conformance import strategies

    saved_seed, saved_multiplier = core.global_force_seed, strategies._MULTIPLIER
    if seed is not None:
        setattr(core, "global_force_seed", seed)  # noqa: B010 (a module global typed None)
    strategies._MULTIPLIER = saved_multiplier * max(1, stress)
    try:
        yield
    finally:
        setattr(core, "global_force_seed", saved_seed)  # noqa: B010
        strategies._MULTIPLIER = saved_multiplier


def describe_failure(exc: BaseException, case: Case) -> str:
    """A failure as text: the message, the case line it came from, then the notes
    (Hypothesis' falsifying example or a state machine's shortest failing sequence of
    calls, the seed that replays it, the stress repetition that failed)."""
    where = case_location(exc, case.function, source=True)
    at = f"\n  at {where}" if where else ""
    if isinstance(exc, AssertionError):
        notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", None) or ())
        return f"{str(exc) or 'assertion failed'}{at}{notes}"
    # format_exception ends with the notes; its last lines are the raise site and them.
    lines = traceback.format_exception(exc)
    keep = 6 + len(getattr(exc, "__notes__", None) or ())
    return f"unexpected {type(exc).__name__}: {exc}{at}\n{''.join(lines[-keep:]).rstrip()}"


class CaseSession:
    """One case against one fresh adapter, in setup / call / teardown phases.

    Owns an event loop for the case's lifetime, so the adapter set up in ``setup`` is
    used on the same loop in ``call`` and closed on it in ``teardown`` (drivers such as
    psycopg bind connections to a loop).
    """

    def __init__(
        self,
        case: Case,
        spec: AdapterSpec,
        options: Mapping[str, str],
        tmp_path: Path,
        *,
        seed: int | None = None,
        stress: int = 1,
        replay: str = "",
    ) -> None:
        self.case = case
        self.spec = spec
        self.options = options
        self.tmp_path = tmp_path
        self.seed = seed
        """The Hypothesis seed (Hypothesis-driven cases only; ``None``: Hypothesis' own)."""
        self.stress = max(1, stress)
        stress_arg = "" if self.stress == 1 else f", stress={self.stress}"
        self.replay = replay or (
            f"replay with reflow_conformance.run({spec.name!r}, seed={seed}, "
            f"select={case.id!r}{stress_arg})"
        )
        """How to replay this case's Hypothesis run; added to its failures."""
        self.loop = asyncio.new_event_loop()
        self.harness = Harness(spec, options, tmp_path, self.loop, case=case)

    def setup(self) -> None:
        """Build and initialize the adapter (and, for a case that opens other handles,
        check that its URL opens it again); raises :class:`HarnessError`."""
        shares = bool(self.case.requires & SHARING)
        self.loop.run_until_complete(self.harness.setup(verify_url=shares))

    def call(self) -> None:
        """Run the case; an ``AssertionError`` is a contract violation.

        A race case runs ``stress`` times, each repetition after the first on a fresh
        harness and store (the previous one torn down first). A failure of a
        Hypothesis-driven case gets a note with the seed that replays it.
        """
        repetitions = self.stress if self.case.race else 1
        for index in range(repetitions):
            if index:
                self._renew(index)
            try:
                self._call_once()
            except Exception as exc:
                if repetitions > 1:
                    exc.add_note(
                        f"failed on repetition {index + 1} of {repetitions} "
                        f"(stress {self.stress}; each repetition on a fresh store)"
                    )
                raise

    def _call_once(self) -> None:
        if self.case.is_async:
            coroutine = self.case.function(self.harness)
            self.loop.run_until_complete(asyncio.wait_for(coroutine, CASE_TIMEOUT_S))
            self.loop.run_until_complete(self.harness.finish())
            return
        try:
            with hypothesis_seeded(self.seed, self.stress):
                self.case.function(self.harness)
            self.loop.run_until_complete(self.harness.finish())
        except Exception as exc:
            if self.case.uses_hypothesis and self.seed is not None:
                exc.add_note(f"Hypothesis seed {self.seed}: {self.replay}")
            raise

    def _renew(self, index: int) -> None:
        """Tear down the current harness and set up a fresh one (a stress repetition)."""
        self._raise_teardown_errors(self.loop.run_until_complete(self.harness.close_all()))
        directory = self.tmp_path / f"repetition-{index + 1}"
        directory.mkdir(parents=True, exist_ok=True)
        self.harness = Harness(self.spec, self.options, directory, self.loop, case=self.case)
        self.setup()

    def teardown(self) -> None:
        """Close every handle, run the factory's teardowns, close the loop.

        Raises ``AssertionError`` for the first ``close()`` that raised (the adapter's
        failure), else :class:`HarnessError` for a factory teardown that raised.
        """
        try:
            errors = self.loop.run_until_complete(self.harness.close_all())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
        self._raise_teardown_errors(errors)

    @staticmethod
    def _raise_teardown_errors(errors: list[BaseException]) -> None:
        closing = [e for e in errors if not isinstance(e, HarnessError)]
        if closing:
            raise AssertionError(f"close() raised {type(closing[0]).__name__}: {closing[0]}")
        if errors:
            raise errors[0]


def run_case(
    case: Case,
    spec: AdapterSpec,
    options: Mapping[str, str],
    *,
    seed: int | None = None,
    stress: int = 1,
) -> CaseReport:
    """Run one case against a fresh adapter and classify the outcome.

    A failure's report carries the case line that failed (``location``).
    """
    reason = skip_reason(case, spec)
    if reason is not None:
        return CaseReport(id=case.id, area=case.area, outcome=Outcome.SKIPPED, reason=reason)
    started = time.perf_counter()
    outcome, reason, location = Outcome.PASSED, "", ""
    with tempfile.TemporaryDirectory(
        prefix="reflow-conformance-", ignore_cleanup_errors=True
    ) as tmp:
        session = CaseSession(case, spec, options, Path(tmp), seed=seed, stress=stress)
        try:
            session.setup()
            session.call()
        except HarnessError as exc:
            outcome, reason = Outcome.ERROR, f"harness: {exc}"
        except Exception as exc:
            outcome, reason = Outcome.FAILED, describe_failure(exc, case)
            location = case_location(exc, case.function)
        finally:
            try:
                session.teardown()
            except HarnessError as exc:
                if outcome is Outcome.PASSED:
                    outcome, reason = Outcome.ERROR, f"harness: {exc}"
            except Exception as exc:
                if outcome is Outcome.PASSED:
                    outcome, reason = Outcome.FAILED, describe_failure(exc, case)
    return CaseReport(
        id=case.id,
        area=case.area,
        outcome=outcome,
        reason=reason,
        duration_s=round(time.perf_counter() - started, 4),
        location=location,
    )


def run_spec(
    spec: AdapterSpec,
    options: Mapping[str, str] | None = None,
    *,
    select: str | None = None,
    seed: int | None = None,
    stress: int = 1,
) -> Report:
    """Run the (selected) suite against the adapter ``spec`` describes.

    Takes a spec directly, so an adapter need not be installed or registered (handy for
    testing deliberately broken adapters). Raises :class:`LookupError` if ``select``
    matches no case. ``seed`` replays the Hypothesis cases of an earlier run (its
    report's ``seed``); without it a random seed is drawn and recorded in the report.
    ``stress`` (>= 1) repeats every race case and multiplies Hypothesis example counts.
    """
    if stress < 1:
        raise ValueError(f"stress must be at least 1, got {stress}")
    cases = select_cases(select)
    seed = new_seed() if seed is None else seed
    started = time.perf_counter()
    results = [run_case(case, spec, options or {}, seed=seed, stress=stress) for case in cases]
    return Report(
        contract_version=CONTRACT_VERSION,
        adapter=spec.name,
        version=spec.version,
        distribution=spec.distribution,
        capabilities=sorted(c.value for c in spec.capabilities),
        cases=results,
        totals=Totals.of(results),
        duration_s=round(time.perf_counter() - started, 3),
        seed=seed,
        stress=stress,
    )


def run(
    adapter: str,
    options: Mapping[str, str] | None = None,
    *,
    select: str | None = None,
    seed: int | None = None,
    stress: int = 1,
) -> Report:
    """Run the suite against the installed adapter called ``adapter``.

    The adapter is loaded through the ``reflow`` entry points, as an application would
    load it. ``options`` are what ``--reflow-option KEY=VALUE`` passes (a DSN, say);
    ``seed`` and ``stress`` are as for :func:`run_spec`.
    """
    return run_spec(load_spec(adapter), options, select=select, seed=seed, stress=stress)
