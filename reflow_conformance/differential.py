"""Differential checking: every operation of every case, against the reference model.

The harness hands each case :class:`CheckedStorage` handles instead of the adapter's
own. Each contract call made through one is applied to the adapter and then to the
reference model (:class:`~reflow_conformance.reference.ReferenceStore`), and then:

1. the adapter's answer must be the model's (lease ids and ``updated_at`` aside: the
   adapter issues those; a new lease id must be valid and never issued before);
2. the adapter's **complete observable state** must be the model's, read through the
   contract's own methods on *every* open handle onto the store: ``get_run`` and
   ``get_step_results`` of every run the case ever created, ``list_runs`` paged three
   at a time and once per status, and ``list_schedules``. So a write that also changes
   another run, an upsert that keeps an old field, a listing that drops a field, or a
   handle whose cache misses another handle's write fails at the case line that made
   the call, naming the call, the calls before it and the fields that differ.

   A store with more than :data:`ONE_BY_ONE` runs (a case that creates hundreds) is read
   in part after each write — the runs the call wrote or named and a window of the rest
   in turn, and the whole listing every :data:`BIG_STORE_EVERY` writes — so that the
   check's cost does not grow with the square of the case's runs.

Buffered events cannot be read without taking them, so every ``take_event`` and
``consume_event`` answer is compared with the model's buffer, and when the case ends
the checker takes every event the model still holds, oldest first, and compares those.

What the model cannot follow stops the checking for the rest of the case, never with a
false failure: calls that overlap on the store (racing coroutines, an engine's
background tasks), handles in other threads or processes, and writes through a handle on
the store's own clock. Race cases (``Case.race``) are checked by their own assertions
and run unchecked. A case that cannot be modelled for another reason opts out with
:func:`opt_out` (or an entry in :data:`OPTED_OUT`), saying why.

``REFLOW_DIFFERENTIAL=off`` (or ``pytest --reflow-differential=off``) turns the
checking off for a quick run; it is on by default.
"""

from __future__ import annotations

import difflib
import enum
import functools
import inspect
import os
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import msgspec

from reflow_conformance.reference import ModelRefusal, ReferenceStore
from reflow_core.storage import StorageAdapter
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    WorkflowRun,
)

__all__ = [
    "MODE_ENV",
    "OPTED_OUT",
    "CheckedStorage",
    "DifferentialViolation",
    "StoreCheck",
    "checking_enabled",
    "opt_out",
    "opt_out_reason",
    "set_mode",
]

F = TypeVar("F", bound=Callable[..., Any])

MODE_ENV = "REFLOW_DIFFERENTIAL"
"""Environment variable: ``off`` turns differential checking off (default ``full``)."""

_mode: str | None = None

PAGE = 3
"""``list_runs`` is read in pages this small (larger for a store with many runs, at most
:data:`MAX_PAGES` pages), so keyset paging is exercised on every check."""

MAX_PAGES = 6

ONE_BY_ONE = 16
"""Up to this many runs, every run is also read one by one (``get_run``,
``get_step_results``) after every write. Beyond it (a case that creates hundreds of runs),
the runs the call wrote or named are, plus the next :data:`ONE_BY_ONE` in turn, so each
check stays bounded; the listings still show every run in full each time."""

_STATUSES = list(RunStatus)
BIG_STORE_EVERY = 4
_LOG_SHOWN = 15
_DIFF_LINES = 60
_VALUE_CHARS = 200

_ENGINE = (
    "drives the store through a whole Engine (dispatcher, heartbeats, retention) whose "
    "calls the model does not see in order on every adapter; on postgres a step row "
    "the model expects was missing after a later claim, nondeterministically (being "
    "investigated)"
)

OPTED_OUT: dict[str, str] = {
    "engine.workflow_completes": _ENGINE,
    "engine.abandoned_run_resumes_elsewhere": _ENGINE,
    "engine.idempotent_enqueue": _ENGINE,
    "engine.serialization_error_fails_cleanly": _ENGINE,
}
"""Case id -> why the reference model cannot follow it, for cases whose module cannot be
decorated with :func:`opt_out` here."""


def set_mode(mode: str | None) -> None:
    """``"full"`` or ``"off"`` for this process (``None``: back to the environment)."""
    if mode not in (None, "full", "off"):
        raise ValueError(f"differential mode must be 'full' or 'off', got {mode!r}")
    global _mode
    _mode = mode


def checking_enabled() -> bool:
    """Whether differential checking is on (``--reflow-differential`` / the env var)."""
    mode = _mode or os.environ.get(MODE_ENV, "full").strip().lower() or "full"
    return mode != "off"


def opt_out(reason: str) -> Callable[[F], F]:
    """Decorate a case function (under ``@case``) whose operations the reference model
    cannot follow deterministically; ``reason`` says why, and is shown in reports."""
    if not reason.strip():
        raise ValueError("opt_out needs a reason")

    def mark(function: F) -> F:
        function.__reflow_differential_opt_out__ = reason  # type: ignore[attr-defined]
        return function

    return mark


def opt_out_reason(case_id: str, function: Callable[..., Any] | None, race: bool) -> str | None:
    """Why a case runs without differential checking, or ``None`` if it runs with it."""
    if not checking_enabled():
        return f"differential checking is off ({MODE_ENV}=off or --reflow-differential=off)"
    if case_id in OPTED_OUT:
        return OPTED_OUT[case_id]
    marked = inspect.unwrap(function) if function is not None else None
    reason = getattr(marked, "__reflow_differential_opt_out__", None)
    if isinstance(reason, str):
        return reason
    if race:
        return "a race case: its interleavings are checked by its own assertions"
    return None


class DifferentialViolation(AssertionError):
    """The adapter's answer or state differs from the reference model's."""


# -- rendering ---------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return repr(value.value)
    return repr(value)


def _lines(prefix: str, value: Any) -> list[str]:
    if isinstance(value, msgspec.Struct):
        out: list[str] = []
        for name in value.__struct_fields__:
            out += _lines(f"{prefix}.{name}", getattr(value, name))
        return out
    if isinstance(value, list) and value and all(isinstance(v, msgspec.Struct) for v in value):
        out = [f"{prefix} = {len(value)} records"]
        for index, item in enumerate(value):
            label = getattr(item, "id", None) or getattr(item, "key", None) or index
            out += _lines(f"{prefix}[{label!r}]", item)
        return out
    return [f"{prefix} = {_show(value)}"]


def _diff(expected: dict[str, Any], got: dict[str, Any]) -> str:
    old: list[str] = []
    new: list[str] = []
    for label in expected:
        if expected[label] != got.get(label):
            old += _lines(label, expected[label])
            new += _lines(label, got.get(label))
    changed = [
        f"{line[0]} {line[1:]}"
        for line in difflib.unified_diff(old, new, n=0, lineterm="")
        if not line.startswith(("@@", "---", "+++"))
    ]
    if not changed:  # equal renderings of unequal values
        changed = [f"- {line}" for line in old] + [f"+ {line}" for line in new]
    shown = [
        line if len(line) <= _VALUE_CHARS else f"{line[:_VALUE_CHARS]}... ({len(line)} chars)"
        for line in changed[:_DIFF_LINES]
    ]
    if len(changed) > _DIFF_LINES:
        shown.append(f"... {len(changed) - _DIFF_LINES} more diff lines")
    return "\n".join(f"    {line}" for line in shown)


def _short(value: Any) -> str:
    if isinstance(value, WorkflowRun):
        return f"<run {value.id!r} {value.workflow!r} {value.status.value}>"
    if isinstance(value, StepResult):
        return f"<step {value.id!r} {_step_status(value)}>"
    if isinstance(value, Schedule):
        return f"<schedule {value.key!r}>"
    if isinstance(value, ClaimedRun):
        return f"<claimed {value.run.id!r}>"
    if isinstance(value, CreateRunResult):
        return f"<{'created' if value.created else 'existing'} {value.run.id!r}>"
    if isinstance(value, list) and len(value) > 3:
        return f"[{len(value)} items]"
    text = _show(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _step_status(step: StepResult) -> str:
    return str(getattr(step.status, "value", step.status))


def _masked(value: Any) -> Any:
    """``value`` with every ``updated_at`` set to 0 (the adapter stamps it)."""
    if isinstance(value, WorkflowRun | StepResult | Schedule):
        return msgspec.structs.replace(value, updated_at=0)
    if isinstance(value, CreateRunResult):
        return CreateRunResult(_masked(value.run), value.created)
    if isinstance(value, ClaimedRun):
        return ClaimedRun(_masked(value.run), "<lease>")
    if isinstance(value, ClaimedSchedule):
        return ClaimedSchedule(_masked(value.schedule), value.slot)
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


# -- one store, all its handles -------------------------------------------------------


class StoreCheck:
    """The reference model of one store, the handles open onto it, and the calls so far."""

    def __init__(self, clock: Callable[[], int], name: str) -> None:
        self.model = ReferenceStore()
        self.clock = clock
        self.name = name
        self.handles: list[CheckedStorage] = []
        self.log: list[str] = []
        self.lost: str | None = None
        self.in_flight = 0
        self.failed = False
        self._turn = 0
        self._focus: list[str] = []
        self._statuses: list[RunStatus] = []
        self._listings = True

    @property
    def active(self) -> bool:
        return self.lost is None and not self.failed

    def lose(self, reason: str) -> None:
        """Stop checking this store for the rest of the case (the model cannot follow)."""
        if self.lost is None:
            self.lost = reason

    def open_handles(self) -> list[CheckedStorage]:
        return [h for h in self.handles if h._ready and not h._closed]

    def fail(self, what: str, detail: str) -> None:
        __tracebackhide__ = True
        self.failed = True
        shown = self.log[-_LOG_SHOWN:]
        first = len(self.log) - len(shown) + 1
        sequence = "\n".join(f"    {first + i}. {entry}" for i, entry in enumerate(shown))
        more = f" (last {len(shown)} of {len(self.log)})" if len(self.log) > len(shown) else ""
        raise DifferentialViolation(
            f"differential check: {what}\n{detail}\n  calls so far on this store{more}:\n"
            f"{sequence}\n  (reference model: reflow_conformance.reference; - model, + adapter)"
        )

    # -- reading the whole state -------------------------------------------------

    def _one_by_one(self, named: Collection[str]) -> list[str]:
        """The run ids read one by one in this check (see :data:`ONE_BY_ONE`)."""
        model = self.model
        every = sorted(model.known_run_ids | set(model.steps))
        if len(every) <= ONE_BY_ONE:
            return every
        chosen = {owner for _, owner, _ in model.touched} | set(named)
        start = self._turn % len(every)
        chosen.update((every[start:] + every[:start])[:ONE_BY_ONE])
        self._turn += ONE_BY_ONE
        return sorted(r for r in chosen if r in model.known_run_ids or r in model.steps)

    def _page(self) -> int:
        return max(PAGE, -(-len(self.model.runs) // MAX_PAGES))

    def expected_view(self) -> dict[str, Any]:
        model = self.model
        view: dict[str, Any] = {}
        for run_id in self._focus:
            if run_id in model.known_run_ids:
                view[f"get_run({run_id!r})"] = model.run(run_id)
        for run_id in self._focus:
            view[f"get_step_results({run_id!r})"] = model.step_rows(run_id)
        if self._listings:
            view["list_runs() paged"] = model.ordered_runs()
        for status in self._statuses:
            view[f"list_runs(status={status.value!r})"] = [
                r for r in model.ordered_runs() if r.status is status
            ]
        view["list_schedules()"] = model.schedule_list()
        return view

    async def _paged(self, handle: StorageAdapter) -> list[WorkflowRun]:
        size = self._page()
        pages: list[WorkflowRun] = []
        page = await handle.list_runs(RunFilter(limit=size))
        for _ in range(len(self.model.runs) // size + 3):
            pages += page
            if len(page) < size:
                break
            last = page[-1]
            page = await handle.list_runs(
                RunFilter(limit=size, before=last.created_at, before_id=last.id)
            )
        return pages

    async def read_view(self, handle: StorageAdapter) -> dict[str, Any]:
        model = self.model
        view: dict[str, Any] = {}
        for run_id in self._focus:
            if run_id in model.known_run_ids:
                view[f"get_run({run_id!r})"] = await handle.get_run(run_id)
        for run_id in self._focus:
            view[f"get_step_results({run_id!r})"] = await handle.get_step_results(run_id)
        if self._listings:
            view["list_runs() paged"] = await self._paged(handle)
        for status in self._statuses:
            view[f"list_runs(status={status.value!r})"] = await handle.list_runs(
                RunFilter(status=status, limit=10_000)
            )
        view["list_schedules()"] = await handle.list_schedules()
        return view

    def _adopt(self, view: dict[str, Any]) -> None:
        """Take the adapter's ``updated_at`` for every record the last call wrote."""
        model = self.model
        for kind, owner, key in model.touched:
            if kind == "run":
                got = view.get(f"get_run({key!r})")
                if isinstance(got, WorkflowRun):
                    model.adopt(kind, owner, key, got.updated_at)
            elif kind == "step":
                rows = view.get(f"get_step_results({owner!r})") or []
                for row in rows:
                    if isinstance(row, StepResult) and row.name == key:
                        model.adopt(kind, owner, key, row.updated_at)
            else:
                for schedule in view.get("list_schedules()") or []:
                    if isinstance(schedule, Schedule) and schedule.key == key:
                        model.adopt(kind, owner, key, schedule.updated_at)
        model.touched.clear()

    async def check_state(self, call: str, named: Collection[str] = ()) -> None:
        """Compare the complete observable state through every open handle (``named``:
        the run ids the call named)."""
        __tracebackhide__ = True
        handles = self.open_handles()
        if not handles:
            self.model.touched.clear()
            return
        self._focus = self._one_by_one(named)
        # Every status a run is in, and one other in turn (a run listed under a status it
        # is not in shows there sooner or later; every status costs a query).
        present = {entry.record.status for entry in self.model.runs.values()}
        extra = _STATUSES[self._turn % len(_STATUSES)]
        self._turn += 1
        self._statuses = [s for s in _STATUSES if s in present or s is extra]
        self._listings = True
        if len(self.model.runs) > ONE_BY_ONE:
            # A big store (a case that creates hundreds of runs): the whole listing every
            # BIG_STORE_EVERY checks, one status in turn otherwise, so that a case's cost
            # does not grow with the square of its runs.
            self._listings = self._turn % BIG_STORE_EVERY == 0
            self._statuses = [extra] if self._listings else []
        for index, handle in enumerate(handles):
            got = await self.read_view(handle._inner)
            if index == 0:
                self._adopt(got)
            expected = self.expected_view()
            if got != expected:
                self.fail(
                    f"after {call}, the state read through {handle._label} differs from the "
                    "reference model's:",
                    _diff(expected, got),
                )

    async def drain(self) -> None:
        """Take every event the model still buffers, through the first open handle, and
        compare each (events cannot be read without taking them)."""
        __tracebackhide__ = True
        handles = self.open_handles()
        if not self.active or not handles:
            return
        handle = handles[0]
        for run_id in sorted(self.model.events):
            for name in sorted(self.model.buffered(run_id)):
                while True:
                    expected = self.model.take_event(run_id, name)
                    got = await handle._inner.take_event(run_id, name)
                    call = f"take_event({run_id!r}, {name!r}) (the kit drains the buffer)"
                    self.log.append(f"{call} -> {_short(got)}")
                    if got != expected:
                        self.fail(
                            f"when the case ended, {call} through {handle._label} answered "
                            "otherwise than the reference model's buffer:",
                            _diff({"answer": expected}, {"answer": got}),
                        )
                    if expected is None:
                        break


# -- the checking proxy -------------------------------------------------------------------

_READS = frozenset({"get_run", "list_runs", "get_step_results", "list_schedules", "now"})
_WRITES = frozenset(
    {
        "create_run",
        "claim_next_run",
        "claim_runs",
        "heartbeat_run",
        "sleep_run",
        "wait_run",
        "update_run_status",
        "update_claimed_run_status",
        "requeue_run",
        "purge_runs",
        "save_step_result",
        "deliver_event",
        "take_event",
        "consume_event",
        "upsert_schedule",
        "claim_due_schedule",
        "delete_schedule",
    }
)
_CHECKED = _READS | _WRITES


class CheckedStorage:
    """An adapter handle whose every contract call is checked against the reference
    model. Everything else (``url``, ``listen_for_work``, adapter-specific attributes) is
    the adapter's own; ``isinstance`` checks against the contract's protocols see the
    adapter's methods."""

    def __init__(
        self,
        inner: StorageAdapter,
        store: StoreCheck,
        label: str,
        *,
        ready: bool = True,
        own_clock: bool = False,
    ) -> None:
        self._inner = inner
        self._store = store
        self._label = label
        self._ready = ready
        self._closed = False
        self._own_clock = own_clock
        store.handles.append(self)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name in _CHECKED:
            return functools.partial(self._call, name, attribute)
        return attribute

    def __repr__(self) -> str:
        return f"<checked {self._inner!r}>"

    async def initialize(self) -> None:
        await self._inner.initialize()
        self._ready = True

    async def close(self) -> None:
        self._closed = True
        await self._inner.close()

    async def _call(self, name: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        store = self._store
        if not store.active:
            return await method(*args, **kwargs)
        if store.in_flight:
            store.lose(
                f"{name} was called while another call on the store was in flight: "
                "the order they took effect in is the adapter's choice"
            )
            return await method(*args, **kwargs)
        if self._own_clock and name == "now":
            return await method(*args, **kwargs)  # the store's own clock, not the kit's
        if self._own_clock and name in _WRITES:
            store.lose(f"{self._label} reads the store's own clock, not the kit's")
            return await method(*args, **kwargs)
        bound = inspect.signature(getattr(StorageAdapter, name)).bind(None, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self", None)
        call = f"{self._label}.{name}({', '.join(_short(v) for v in arguments.values())})"
        store.in_flight += 1
        now = store.clock()
        try:
            got = await method(*args, **kwargs)
        except BaseException:
            store.in_flight -= 1
            if store.active:
                store.log.append(f"{call} raised")
                # A failed call leaves stored state as it was.
                await store.check_state(f"{call} (which raised)", _named_runs(arguments))
            raise
        store.in_flight -= 1
        if not _still_checking(store):  # the call itself may have lost track (a racer)
            return got
        if name in _WRITES:  # reads are checked too, but only writes make the history
            store.log.append(f"{call} -> {_short(got)}")
        self._check_answer(name, arguments, now, got, call)
        if name in _WRITES:
            await store.check_state(call, _named_runs(arguments))
        return got

    def _check_answer(
        self, name: str, arguments: dict[str, Any], now: int, got: Any, call: str
    ) -> None:
        __tracebackhide__ = True
        store = self._store
        model = store.model
        try:
            expected, exact = _apply(model, name, arguments, now, got)
        except ModelRefusal as refusal:
            store.fail(
                f"{call} answered {_short(got)}, but the contract requires it to raise "
                f"{refusal.expected.__name__} ({refusal.cause})",
                "",
            )
            return
        except _NotNew as problem:
            store.fail(f"{call}: {problem}", "")
            return
        if expected is _EITHER:
            return
        if (got if exact else _masked(got)) != (expected if exact else _masked(expected)):
            store.fail(
                f"{call} answered otherwise than the reference model:",
                _diff({"answer": _masked(expected)}, {"answer": _masked(got)}),
            )


_EITHER: Any = object()


def _still_checking(store: StoreCheck) -> bool:
    return store.active


def _named_runs(arguments: dict[str, Any]) -> list[str]:
    """The run ids a call names (its ``run_id``, or its record's)."""
    named = [arguments.get("run_id")]
    for key in ("run", "result", "checkpoint"):
        record = arguments.get(key)
        named.append(getattr(record, "run_id", None) or getattr(record, "id", None))
    return [n for n in named if isinstance(n, str)]


class _NotNew(Exception):
    """The adapter's new lease id is not a new, valid one."""


def _apply(
    model: ReferenceStore, name: str, a: dict[str, Any], now: int, got: Any
) -> tuple[Any, bool]:
    """Apply one call to the model; the answer it requires, and whether to compare it
    exactly (``False``: ``updated_at`` and lease ids aside)."""
    if name == "now":
        return now, True
    if name == "create_run":
        return model.create_run(a["run"]), False
    if name == "get_run":
        return model.get_run(a["run_id"]), True
    if name == "list_runs":
        return model.list_runs(a["filter"]), True
    if name == "claim_next_run":
        lease = got.lease_id if isinstance(got, ClaimedRun) else None
        if lease is not None:
            _check_new_lease(model, lease)
        return model.claim_next_run(
            a["workflow_names"], a["lease_ms"], a["holder"], now, lease
        ), False
    if name == "claim_runs":
        leases = [c.lease_id for c in got] if isinstance(got, list) else []
        for lease in leases:
            _check_new_lease(model, lease)
        if len(set(leases)) != len(leases):
            raise _NotNew(f"claim_runs issued one lease id twice: {leases!r}")
        return model.claim_runs(
            a["workflow_names"], a["lease_ms"], a["holder"], a["limit"], now, leases
        ), False
    if name == "heartbeat_run":
        return model.heartbeat_run(a["run_id"], a["lease_id"], now), True
    if name == "sleep_run":
        return model.sleep_run(a["run_id"], a["lease_id"], a["wake_at"]), True
    if name == "wait_run":
        return model.wait_run(a["run_id"], a["lease_id"], a["event_name"], a["wake_at"]), True
    if name == "update_run_status":
        return model.update_run_status(a["run_id"], a["status"], a["expected"], now), True
    if name == "update_claimed_run_status":
        return model.update_claimed_run_status(
            a["run_id"], a["lease_id"], a["status"], a["output"], a["error"]
        ), True
    if name == "requeue_run":
        return model.requeue_run(a["run_id"]), True
    if name == "purge_runs":
        return model.purge_runs(a["finished_before"], a["limit"], a["statuses"]), True
    if name == "save_step_result":
        answer = model.save_step_result(a["result"], a["lease_id"])
        return (_EITHER if answer is None else answer), True
    if name == "get_step_results":
        return model.get_step_results(a["run_id"]), True
    if name == "deliver_event":
        return model.deliver_event(a["run_id"], a["event_name"], a["payload"], a["key"], now), True
    if name == "take_event":
        return model.take_event(a["run_id"], a["event_name"]), True
    if name == "consume_event":
        consumed: ConsumeResult = model.consume_event(
            a["event_name"], a["checkpoint"], a["lease_id"]
        )
        return consumed, True
    if name == "upsert_schedule":
        return model.upsert_schedule(a["schedule"]), False
    if name == "claim_due_schedule":
        return model.claim_due_schedule(a["workflow_names"], now), False
    if name == "delete_schedule":
        return model.delete_schedule(a["key"]), True
    if name == "list_schedules":
        return model.list_schedules(), True
    raise AssertionError(f"no model for {name}")  # pragma: no cover


def _check_new_lease(model: ReferenceStore, lease: object) -> None:
    problem = model.new_lease_problem(lease)
    if problem is not None:
        raise _NotNew(problem)
