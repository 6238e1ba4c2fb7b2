"""Run the suite against an adapter without pytest: ``run("sqlite")`` returns a Report.

Each case runs in three phases, exactly as the pytest plugin runs it, so both report the
same outcomes: *setup* (a fresh temporary directory, the adapter's conformance factory,
``initialize()``), *call* (the case), *teardown* (``close()`` every handle, even after a
failure). A failure in setup is the kit's ``error``; an assertion or an unexpected
exception during the call is the adapter's ``failed``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path

from reflow_conformance.cases import CONTRACT_VERSION, Case, select_cases
from reflow_conformance.harness import Harness, HarnessError
from reflow_conformance.report import CaseReport, Outcome, Report, Totals
from reflow_core.errors import AdapterError, AdapterNotFoundError
from reflow_core.registry import AdapterSpec, adapter_specs

__all__ = ["CaseSession", "load_spec", "run", "run_case", "run_spec", "skip_reason"]

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AssertionError):
        text = str(exc) or "assertion failed"
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and not str(exc):
            text += f" at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}"
        # Hypothesis attaches the falsifying example (a state machine's step trace) as notes.
        notes = getattr(exc, "__notes__", None)
        return text + ("\n" + "\n".join(notes) if notes else "")
    detail = "".join(traceback.format_exception(exc)[-6:])
    return f"unexpected {type(exc).__name__}: {exc}\n{detail}"


class CaseSession:
    """One case against one fresh adapter, in setup / call / teardown phases.

    Owns an event loop for the case's lifetime, so the adapter set up in ``setup`` is
    used on the same loop in ``call`` and closed on it in ``teardown`` (drivers such as
    psycopg bind connections to a loop).
    """

    def __init__(
        self, case: Case, spec: AdapterSpec, options: Mapping[str, str], tmp_path: Path
    ) -> None:
        self.case = case
        self.loop = asyncio.new_event_loop()
        self.harness = Harness(spec, options, tmp_path, self.loop)

    def setup(self) -> None:
        """Build and initialize the adapter; raises :class:`HarnessError`."""
        self.loop.run_until_complete(self.harness.setup())

    def call(self) -> None:
        """Run the case; an ``AssertionError`` is a contract violation."""
        if self.case.is_async:
            coroutine = self.case.function(self.harness)
            self.loop.run_until_complete(asyncio.wait_for(coroutine, CASE_TIMEOUT_S))
        else:
            self.case.function(self.harness)

    def teardown(self) -> None:
        """Close every handle and the loop; raises the first ``close()`` error, if any."""
        try:
            errors = self.loop.run_until_complete(self.harness.close_all())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
        if errors:
            raise AssertionError(f"close() raised {type(errors[0]).__name__}: {errors[0]}")


def run_case(case: Case, spec: AdapterSpec, options: Mapping[str, str]) -> CaseReport:
    """Run one case against a fresh adapter and classify the outcome."""
    reason = skip_reason(case, spec)
    if reason is not None:
        return CaseReport(id=case.id, area=case.area, outcome=Outcome.SKIPPED, reason=reason)
    started = time.perf_counter()
    outcome, reason = Outcome.PASSED, ""
    with tempfile.TemporaryDirectory(
        prefix="reflow-conformance-", ignore_cleanup_errors=True
    ) as tmp:
        session = CaseSession(case, spec, options, Path(tmp))
        try:
            session.setup()
            session.call()
        except HarnessError as exc:
            outcome, reason = Outcome.ERROR, f"harness: {exc}"
        except Exception as exc:
            outcome, reason = Outcome.FAILED, _describe(exc)
        finally:
            try:
                session.teardown()
            except Exception as exc:
                if outcome is Outcome.PASSED:
                    outcome, reason = Outcome.FAILED, _describe(exc)
    return CaseReport(
        id=case.id,
        area=case.area,
        outcome=outcome,
        reason=reason,
        duration_s=round(time.perf_counter() - started, 4),
    )


def run_spec(
    spec: AdapterSpec, options: Mapping[str, str] | None = None, *, select: str | None = None
) -> Report:
    """Run the (selected) suite against the adapter ``spec`` describes.

    Takes a spec directly, so an adapter need not be installed or registered (handy for
    testing deliberately broken adapters). Raises :class:`LookupError` if ``select``
    matches no case.
    """
    cases = select_cases(select)
    started = time.perf_counter()
    results = [run_case(case, spec, options or {}) for case in cases]
    return Report(
        contract_version=CONTRACT_VERSION,
        adapter=spec.name,
        version=spec.version,
        distribution=spec.distribution,
        capabilities=sorted(c.value for c in spec.capabilities),
        cases=results,
        totals=Totals.of(results),
        duration_s=round(time.perf_counter() - started, 3),
    )


def run(
    adapter: str, options: Mapping[str, str] | None = None, *, select: str | None = None
) -> Report:
    """Run the suite against the installed adapter called ``adapter``.

    The adapter is loaded through the ``reflow`` entry points, as an application would
    load it. ``options`` are what ``--reflow-option KEY=VALUE`` passes (a DSN, say).
    """
    return run_spec(load_spec(adapter), options, select=select)
