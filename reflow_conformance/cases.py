"""The case registry: every promise of the storage contract as a named, versioned check.

A case is a plain function registered with :func:`case`. It is independent of pytest:
the runner (:mod:`reflow_conformance.runner`) and the pytest plugin both walk the same
registry. Ids are stable (``area.what``) so reports from different versions of the kit
can be compared; :data:`CONTRACT_VERSION` (re-exported from :mod:`reflow_core.storage`)
names the version of the contract they check.

Two kinds of case function exist:

* ``async def fn(h: Harness) -> None`` — the common kind, run on the case's event loop;
* ``def fn(h: Harness) -> None`` — for cases that drive Hypothesis, which needs a plain
  function; they reach the adapter through ``h.sync(awaitable)``. Every synchronous case
  is treated as Hypothesis-driven: it runs under the session's recorded seed, and its
  failures say how to replay it.

A *race* case (``Case.race``) releases racers together with a barrier; it is repeated
``--reflow-stress`` times, each on a fresh store.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from reflow_core.registry import Capability
from reflow_core.storage import CONTRACT_VERSION

if TYPE_CHECKING:
    from reflow_conformance.harness import Harness

__all__ = ["CONTRACT_VERSION", "Case", "all_cases", "case", "select_cases"]

SUITE_MODULES = (
    "runs",
    "claim",
    "batch_claim",
    "clock",
    "leases",
    "lease_fields",
    "recoveries",
    "status",
    "steps",
    "checkpoints",
    "events",
    "consume",
    "listing",
    "requeue",
    "retention",
    "schedules",
    "values",
    "identifiers",
    "lifecycle",
    "concurrency",
    "rules",
    "model",
    "engine",
)
"""Modules of :mod:`reflow_conformance.suite`, one per contract area, in report order."""

CaseFunction = Callable[["Harness"], Any]


class Case(msgspec.Struct, frozen=True, kw_only=True):
    """One check of the contract."""

    id: str
    """Stable identifier, ``area.what`` (e.g. ``claim.oldest_first``)."""
    area: str
    description: str
    requires: frozenset[Capability] = frozenset()
    """Capabilities the adapter must declare for the case to apply."""
    function: CaseFunction
    is_async: bool = True
    race: bool = False
    """Races barrier-released racers: ``--reflow-stress=N`` runs it N times, each time on a
    fresh store (a race that passes once may still lose on the next interleaving)."""

    @property
    def uses_hypothesis(self) -> bool:
        """Whether the case drives Hypothesis (the synchronous kind): it runs under the
        session's seed, and its failures name the seed that replays them."""
        return not self.is_async

    def missing_capabilities(self, declared: Iterable[Capability]) -> list[Capability]:
        """Required capabilities the adapter does not declare, sorted by name."""
        return sorted(self.requires - frozenset(declared), key=lambda c: c.value)


_REGISTRY: dict[str, Case] = {}


def case(
    case_id: str,
    description: str | None = None,
    *,
    requires: Iterable[Capability | str] = (),
    race: bool | None = None,
) -> Callable[[CaseFunction], CaseFunction]:
    """Register the decorated function as case ``case_id``.

    The area is the part of the id before the first dot. ``description`` defaults to the
    function's docstring. ``requires`` accepts :class:`Capability` members or their
    names; an unknown name is an error at import time, not a silent skip. ``race``
    marks a race case (repeated under ``--reflow-stress``); by default a case is one when
    it is in the ``concurrency`` area or its id names a racing mode (``*_coroutines``,
    ``*_threads``, ``*_processes``, ``*.concurrent_*``).
    """
    capabilities = frozenset(
        c if isinstance(c, Capability) else Capability.parse(c) for c in requires
    )

    def register(function: CaseFunction) -> CaseFunction:
        previous = _REGISTRY.get(case_id)
        # A re-import of the same module (pytester restores sys.modules between runs)
        # re-registers the same function; only a *different* function is a clash.
        if previous is not None and _origin(previous.function) != _origin(function):
            raise ValueError(f"conformance case id {case_id!r} is registered twice")
        text = description or inspect.getdoc(function) or ""
        _REGISTRY[case_id] = Case(
            id=case_id,
            area=case_id.split(".", 1)[0],
            description=" ".join(text.split()),
            requires=capabilities,
            function=function,
            is_async=inspect.iscoroutinefunction(function),
            race=is_race_id(case_id) if race is None else race,
        )
        return function

    return register


_RACE_SUFFIXES = ("_coroutines", "_threads", "_processes")


def is_race_id(case_id: str) -> bool:
    """Whether a case id names a race (see :func:`case`'s ``race``)."""
    area, _, what = case_id.partition(".")
    return area == "concurrency" or what.endswith(_RACE_SUFFIXES) or what.startswith("concurrent_")


def _origin(function: CaseFunction) -> tuple[str, str]:
    return function.__module__, function.__qualname__


def all_cases() -> list[Case]:
    """Every registered case, importing the suite on first use; in suite-module order.

    Raises :class:`ImportError` saying which extra to install if Hypothesis is missing.
    """
    try:
        import hypothesis  # noqa: F401  (the values and model areas are built on it)
    except ImportError as exc:
        raise ImportError(
            "the conformance kit needs Hypothesis: pip install 'reflow[conformance]'"
        ) from exc
    for name in SUITE_MODULES:
        importlib.import_module(f"reflow_conformance.suite.{name}")
    order = {name: index for index, name in enumerate(SUITE_MODULES)}
    return sorted(_REGISTRY.values(), key=lambda c: (order.get(c.area, len(order)), c.id))


def select_cases(select: str | None = None) -> list[Case]:
    """Cases whose id matches ``select``: comma-separated ids, prefixes or shell globs.

    ``"claim"`` selects the whole area, ``"claim.*,leases.heartbeat_*"`` several
    patterns. ``None`` selects everything. A selection that matches nothing raises
    :class:`LookupError` — a run that checks nothing must never look like a pass.
    """
    cases = all_cases()
    if select is None:
        return cases
    patterns = [p.strip() for p in select.split(",") if p.strip()]
    chosen = [
        c
        for c in cases
        if any(
            c.id == p or c.id.startswith(p + ".") or fnmatch.fnmatchcase(c.id, p) for p in patterns
        )
    ]
    if not chosen:
        raise LookupError(
            f"selection {select!r} matches no conformance case; "
            f"areas: {', '.join(sorted({c.area for c in cases}))}"
        )
    return chosen
