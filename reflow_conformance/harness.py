"""What a conformance case works with: a fresh adapter, builders, racers, strict asserts.

A :class:`Harness` is built by :mod:`reflow_conformance.runner` for one case and torn
down after it; every handle it opens is closed then, even when the case failed.

Time is the kit's: every case gets a :class:`KitClock`, a manual clock that starts near
real time and moves only when the case calls :meth:`Harness.advance`. The conformance
factory receives it as ``clock=`` and the adapter must use it as the store's "now"
(:meth:`~reflow_core.storage.StorageAdapter.now`), so a case can put a lease exactly one
millisecond before or at its expiry, and never sleeps. Every handle the harness opens in
this process (another handle from ``url``, one per racer thread) shares that clock.
Handles in other processes cannot: they use the store's own clock, and the cases that
race them wait (a bounded poll of ``now()``) for that clock to pass an expiry instead.

Before any case opens another handle onto the store (a racer thread or process, a second
handle, a reopening), the harness checks that ``open_storage(storage.url)`` builds the
adapter under test again (:meth:`Harness.verify_url`): otherwise those cases would test
whatever adapter the URL's scheme belongs to, and pass for the wrong reason.

Every handle the harness opens in this process for a case is a
:class:`~reflow_conformance.differential.CheckedStorage`: after each contract call the
adapter's answer and complete observable state are compared with the reference model
(see :mod:`reflow_conformance.differential`; race cases, cases that opt out, and
``REFLOW_DIFFERENTIAL=off`` run without it). :meth:`Harness.finish` drains the buffered
events the model still holds when the case ends.

Failures point at the case's own line: the helpers here set ``__tracebackhide__`` (pytest
hides their frames) and :func:`case_location` finds the case's frame for the runner.
"""

from __future__ import annotations

import asyncio
import difflib
import enum
import inspect
import itertools
import linecache
import os
import re
import threading
import types
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec

from reflow_conformance.differential import CheckedStorage, StoreCheck, opt_out_reason
from reflow_core.registry import AdapterSpec, Capability, adapter_specs, open_storage
from reflow_core.storage import StorageAdapter, system_clock
from reflow_core.types import (
    ClaimedRun,
    ErrorInfo,
    LeaseHolder,
    Recurrence,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

__all__ = [
    "KIT_HOLDER",
    "LEASE_MS",
    "ContractViolation",
    "Harness",
    "HarnessError",
    "KitClock",
    "assert_exact",
    "case_location",
    "expect",
]

if TYPE_CHECKING:
    from reflow_conformance.cases import Case

T = TypeVar("T")

FAR = 10**9
"""Milliseconds (about 11.5 days): :meth:`Harness.past` and :meth:`Harness.future` are this
far from the kit clock, so no case's own advances reach them."""

LEASE_MS = 20_000
"""The lease length :meth:`Harness.claim` asks for unless told otherwise. Deliberately not
a round default such as 30 s, so an adapter that ignores ``lease_ms`` is caught."""

KIT_HOLDER = LeaseHolder(worker="kit-worker-\u00e9-1", host="kit-host.example", pid=4242)
"""The holder :meth:`Harness.claim` presents unless told otherwise."""

BARRIER_TIMEOUT_S = 60.0
"""A racer that never reaches the barrier is a harness failure, not a hang."""


SHARING = frozenset({Capability.THREADS, Capability.CROSS_PROCESS, Capability.DURABLE})
"""Capabilities whose cases open other handles from the store's ``url``."""


class ContractViolation(AssertionError):
    """An adapter broke a promise of the contract: says what, what was expected, what came.

    With ``detail`` (a diff, say), the message shows it instead of both values in full;
    ``expected`` and ``got`` are kept as attributes either way.
    """

    def __init__(
        self, what: str, expected: Any = None, got: Any = None, *, detail: str | None = None
    ) -> None:
        if detail is None:
            super().__init__(f"{what}\n  expected: {expected!r}\n  got:      {got!r}")
        else:
            super().__init__(f"{what}\n{detail}")
        self.what = what
        self.expected = expected
        self.got = got


class HarnessError(Exception):
    """The kit could not set up what the case needs (not the adapter's contract failing)."""


def expect(got: Any, expected: Any, what: str) -> None:
    """Raise :class:`ContractViolation` unless ``got == expected``."""
    __tracebackhide__ = True
    if got != expected:
        raise ContractViolation(what, expected, got)


def assert_exact(got: Any, expected: Any, what: str = "value", path: str = "$") -> None:
    """Equal *and* of the same type at every level: ``True``, ``1`` and ``1.0`` all differ.

    ``-0.0`` and ``0.0`` differ too (a replay must see the sign the step saw); datetimes
    must also keep their UTC offset (equal instants with other offsets differ). ``fold``
    is not compared: ``isoformat`` does not carry it and equal datetimes ignore it.
    """
    __tracebackhide__ = True
    if type(got) is not type(expected):
        raise ContractViolation(
            f"{what} at {path}: type changed", type(expected).__name__, type(got).__name__
        )
    if isinstance(expected, dict):
        if list(got) != list(expected) and set(got) != set(expected):
            raise ContractViolation(f"{what} at {path}: keys differ", sorted(expected), sorted(got))
        for key, item in expected.items():
            assert_exact(got[key], item, what, f"{path}[{key!r}]")
    elif isinstance(expected, list):
        if len(got) != len(expected):
            raise ContractViolation(f"{what} at {path}: length differs", len(expected), len(got))
        for index, item in enumerate(expected):
            assert_exact(got[index], item, what, f"{path}[{index}]")
    elif isinstance(expected, float):
        same = got == expected and str(got) == str(expected)  # str tells -0.0 from 0.0
        if not same:
            raise ContractViolation(f"{what} at {path}: float differs", expected, got)
    elif isinstance(expected, datetime):
        if got != expected or got.utcoffset() != expected.utcoffset():
            raise ContractViolation(f"{what} at {path}: datetime differs", expected, got)
    elif got != expected:
        raise ContractViolation(f"{what} at {path}: value differs", expected, got)


# -- where a failure happened ----------------------------------------------------------

_KIT_DIR = Path(__file__).resolve().parent
_KIT_MACHINERY = frozenset(
    str(_KIT_DIR / name)
    for name in (
        "harness.py",
        "runner.py",
        "plugin.py",
        "cases.py",
        "differential.py",
        "reference.py",
    )
)


def _frames(exc: BaseException) -> list[tuple[types.FrameType, int]]:
    """The frames ``exc`` passed through, outermost first, with their line numbers."""
    frames: list[tuple[types.FrameType, int]] = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def _hidden(frame: types.FrameType) -> bool:
    try:
        return bool(frame.f_locals.get("__tracebackhide__", False))
    except Exception:  # an exotic frame; never let the locator itself fail
        return False


def _case_files(function: Callable[..., Any] | None) -> set[str]:
    """Files holding case functions: this case's, and every registered case's."""
    from reflow_conformance.cases import _REGISTRY

    files = {_code_file(c.function) for c in _REGISTRY.values()}
    if function is not None:
        files.add(_code_file(function))
    files.discard("")
    return files


def _code_file(function: Callable[..., Any]) -> str:
    code = getattr(inspect.unwrap(function), "__code__", None)
    return os.path.realpath(code.co_filename) if code is not None else ""


def _in_kit(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(_KIT_DIR)


def display_path(filename: str) -> str:
    """``filename`` relative to the kit's installation root when inside the kit, relative
    to the working directory when below it, absolute otherwise."""
    path = Path(filename).resolve()
    for root in (_KIT_DIR.parent, Path.cwd()):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return str(path)


def case_location(
    exc: BaseException, function: Callable[..., Any] | None = None, *, source: bool = False
) -> str:
    """``file:line`` of the case's own line that ``exc`` came from, or ``""``.

    Walks the traceback from the innermost frame outwards and takes the first frame in a
    file of case functions (``function``'s, or any registered case's) that is not a
    helper (a frame with ``__tracebackhide__``, or one of the kit's own modules): the line
    that called ``expect()`` or ``assert_exact()``, or the call into the adapter that
    raised. Failing that, the innermost such frame in the kit's own modules. With
    ``source``, the line's text follows on a second line.
    """
    candidates = [
        (frame, line)
        for frame, line in _frames(exc)
        if not _hidden(frame) and os.path.realpath(frame.f_code.co_filename) not in _KIT_MACHINERY
    ]
    if not candidates and isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return case_location(exc.exceptions[0], function, source=source)
    files = _case_files(function)
    chosen = next(
        (c for c in reversed(candidates) if os.path.realpath(c[0].f_code.co_filename) in files),
        None,
    )
    if chosen is None:
        chosen = next((c for c in reversed(candidates) if _in_kit(c[0].f_code.co_filename)), None)
    if chosen is None:
        return ""
    frame, line = chosen
    where = f"{display_path(frame.f_code.co_filename)}:{line}"
    if source:
        text = linecache.getline(frame.f_code.co_filename, line).strip()
        if text:
            where += f"\n    {text}"
    return where


# -- "nothing changed": a diff of two snapshots -----------------------------------------

_DIFF_LINES = 60
_VALUE_CHARS = 200


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return repr(value.value)
    return repr(value)


def _fields(prefix: str, record: Any) -> list[str]:
    if record is None:
        return [f"{prefix} = None"]
    if isinstance(record, msgspec.Struct):
        return [
            f"{prefix}.{name} = {_show(getattr(record, name))}" for name in record.__struct_fields__
        ]
    return [f"{prefix} = {_show(record)}"]


def snapshot_lines(snapshot: Any, run_ids: Sequence[str]) -> list[str]:
    """A :meth:`Harness.snapshot`, one ``read(...).field = value`` line per field."""
    runs, steps, listed, schedules = snapshot
    lines: list[str] = []
    read = dict(zip(run_ids, runs, strict=False))
    for run_id, run in read.items():
        lines += _fields(f"get_run({run_id!r})", run)
    for run_id, rows in zip(run_ids, steps, strict=False):
        lines.append(f"get_step_results({run_id!r}) = {len(rows)} rows")
        for row in rows:
            lines += _fields(f"get_step_results({run_id!r})[{row.name!r}]", row)
    lines.append(f"list_runs() ids = {[r.id for r in listed]!r}")
    for run in listed:
        if read.get(run.id) == run:  # shown once, under get_run, unless they differ
            lines.append(f"list_runs()[{run.id!r}] = the get_run({run.id!r}) record")
        else:
            lines += _fields(f"list_runs()[{run.id!r}]", run)
    lines.append(f"list_schedules() keys = {[s.key for s in schedules]!r}")
    for schedule in schedules:
        lines += _fields(f"list_schedules()[{schedule.key!r}]", schedule)
    return lines


def snapshot_diff(before: Any, after: Any, run_ids: Sequence[str]) -> str:
    """What differs between two snapshots, as a compact unified diff (no context lines);
    only the fields that changed, each named by the read and the record it came from."""
    old, new = snapshot_lines(before, run_ids), snapshot_lines(after, run_ids)
    changed = [
        line if line.startswith(("---", "+++")) else f"{line[0]} {line[1:]}"
        for line in difflib.unified_diff(old, new, "before", "after", n=0, lineterm="")
        if not line.startswith("@@")
    ]
    shown = [
        line if len(line) <= _VALUE_CHARS else f"{line[:_VALUE_CHARS]}... ({len(line)} chars)"
        for line in changed[:_DIFF_LINES]
    ]
    if len(changed) > _DIFF_LINES:
        shown.append(f"... {len(changed) - _DIFF_LINES} more diff lines")
    return "\n".join(f"  {line}" for line in shown)


def _unwrap(storage: StorageAdapter) -> StorageAdapter:
    inner = getattr(storage, "_inner", None) if isinstance(storage, CheckedStorage) else None
    return cast(StorageAdapter, inner) if inner is not None else storage


def _case_on_stack() -> Case | None:
    """The case a runner on the call stack is setting up (a ``CaseSession``'s), if any."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            found = getattr(owner, "case", None)
            if type(owner).__name__ == "CaseSession" and found is not None:
                return cast("Case", found)
            frame = frame.f_back
    finally:
        del frame
    return None


def _yielded(value: Any) -> StorageAdapter:
    if not _is_adapter(value):
        raise HarnessError(
            f"the conformance factory produced {value!r}, not a storage adapter (expected "
            "the adapter, or a generator or context manager yielding it)"
        )
    storage: StorageAdapter = value
    return storage


async def _run_teardown(teardown: Teardown) -> BaseException | None:
    """Run one factory teardown; what it raised, as a :class:`HarnessError`."""
    try:
        await teardown()
    except HarnessError as exc:
        return exc
    except Exception as exc:
        error = HarnessError(
            f"the conformance factory's teardown raised {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return error
    return None


# -- adapter identity behind a URL ---------------------------------------------------------


def _spec_for_url(url: str) -> AdapterSpec | None:
    """The spec ``open_storage(url)`` picks (the same resolution as the registry's)."""
    try:
        specs = adapter_specs()
    except Exception:
        return None
    if "://" in url or url.endswith(":"):
        scheme = url.split(":", 1)[0].lower()
        base_scheme = scheme.split("+", 1)[0]
        for spec in specs.values():
            if scheme in spec.schemes or base_scheme in spec.schemes:
                return spec
        return None
    return specs.get(url)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_adapter(value: Any) -> bool:
    return all(callable(getattr(value, m, None)) for m in ("initialize", "close", "get_run"))


Teardown = Callable[[], Awaitable[None]]


RaceFunction = Callable[[StorageAdapter, int], Awaitable[T]]

_DEFAULT: Any = object()


class KitClock:
    """A manual clock in epoch milliseconds: starts near real time, moves only by hand.

    Callable (it is a :data:`~reflow_core.storage.Clock`), safe to read and advance from
    several threads, and never moves backwards.
    """

    def __init__(self, start: int | None = None) -> None:
        self._now = system_clock() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return self._now

    def advance(self, ms: int) -> int:
        """Move forward by ``ms`` (>= 0) milliseconds; return the new time."""
        if ms < 0:
            raise HarnessError(f"the kit clock never moves backwards (advance({ms}))")
        with self._lock:
            self._now += ms
            return self._now

    def advance_to(self, at: int) -> int:
        """Move forward to ``at`` if it is later than now; return the new time."""
        with self._lock:
            self._now = max(self._now, at)
            return self._now

    def __repr__(self) -> str:
        return f"KitClock({self._now})"


class Harness:
    """A fresh, initialized adapter plus everything a case needs around it."""

    def __init__(
        self,
        spec: AdapterSpec,
        options: Mapping[str, str],
        tmp_path: Path,
        loop: asyncio.AbstractEventLoop,
        *,
        case: Case | None = None,
    ) -> None:
        self.spec = spec
        self.options = dict(options)
        self.tmp_path = tmp_path
        self.loop = loop
        self.clock = KitClock()
        """The case's clock: the store's "now" for every handle opened in this process."""
        self.case = case
        """The case this harness runs (``None`` outside the kit's runner: then the
        harness looks for it on the call stack at :meth:`setup`)."""
        self.differential: str | None = "no case to check"
        """Why differential checking is off for this case, or ``None`` when it is on
        (see :mod:`reflow_conformance.differential`)."""
        self._checks: list[StoreCheck] = []
        self._thread = threading.get_ident()
        self._storage: StorageAdapter | None = None
        self._handles: list[StorageAdapter] = []
        self._teardowns: list[tuple[StorageAdapter, Teardown]] = []
        self._verified_urls: set[str] = set()
        self._counter = itertools.count(1)

    # -- lifecycle (driven by the runner) -------------------------------------

    @property
    def storage(self) -> StorageAdapter:
        """The adapter under test: fresh, empty and initialized."""
        if self._storage is None:
            raise HarnessError("the harness has no storage (setup did not run)")
        return self._storage

    async def setup(self, *, verify_url: bool = False) -> None:
        """Build and initialize the adapter under test; raises :class:`HarnessError`.

        With ``verify_url`` (the case opens other handles from the store's url), also
        :meth:`verify_url`, so a URL that opens another adapter is a setup error.
        """
        if self.case is None:
            self.case = _case_on_stack()
        if self.case is not None:
            self.differential = opt_out_reason(self.case.id, self.case.function, self.case.race)
        self._storage = await self.fresh_storage()
        if verify_url:
            self.verify_url()

    async def fresh_storage(self) -> StorageAdapter:
        """Another fresh, empty, initialized adapter from the conformance factory, called
        as ``factory(tmp_path, options, clock=self.clock)``.

        The factory may return the adapter, or a generator / async generator yielding it
        once, or a (sync or async) context manager around it: the code after ``yield``,
        or the ``__exit__``, is its teardown, run by :meth:`close_all` (or
        :meth:`discard`) once the handles are closed, even when the case failed.
        """
        factory = self.spec.conformance_factory
        if factory is None:
            raise HarnessError(f"adapter {self.spec.name!r} has no conformance_factory")
        directory = self.tmp_path / f"store-{next(self._counter)}"
        directory.mkdir(parents=True, exist_ok=True)
        try:
            made = factory(directory, self.options, clock=self.clock)
            storage, teardown = await self._enter(made)
        except HarnessError:
            raise
        except TypeError as exc:
            if "clock" not in str(exc):
                raise HarnessError(f"conformance factory raised TypeError: {exc}") from exc
            raise HarnessError(
                f"conformance factory raised TypeError: {exc}; since storage contract 2.0 "
                "it is called as factory(tmp_path, options, clock=clock) and the adapter "
                "must use that clock as the store's now"
            ) from exc
        except Exception as exc:
            raise HarnessError(f"conformance factory raised {type(exc).__name__}: {exc}") from exc
        self._handles.append(storage)
        if teardown is not None:
            self._teardowns.append((storage, teardown))
        await self._initialize(storage)
        if self.differential is not None:
            return storage
        check = StoreCheck(self.clock, f"store {len(self._checks) + 1}")
        self._checks.append(check)
        return cast(StorageAdapter, CheckedStorage(storage, check, "handle 1"))

    @staticmethod
    async def _enter(made: Any) -> tuple[StorageAdapter, Teardown | None]:
        """The adapter a conformance factory's result stands for, and its teardown."""
        if inspect.isgenerator(made):
            generator = made
            try:
                storage = next(generator)
            except StopIteration:
                raise HarnessError(
                    "the conformance factory (a generator) yielded nothing"
                ) from None

            async def finish_generator() -> None:
                try:
                    next(generator)
                except StopIteration:
                    return
                generator.close()
                raise HarnessError("the conformance factory (a generator) yielded twice")

            return _yielded(storage), finish_generator
        if inspect.isasyncgen(made):
            agenerator = made
            try:
                storage = await anext(agenerator)
            except StopAsyncIteration:
                raise HarnessError(
                    "the conformance factory (an async generator) yielded nothing"
                ) from None

            async def finish_async_generator() -> None:
                try:
                    await anext(agenerator)
                except StopAsyncIteration:
                    return
                await agenerator.aclose()
                raise HarnessError("the conformance factory (an async generator) yielded twice")

            return _yielded(storage), finish_async_generator
        if _is_adapter(made):
            return made, None  # the plain kind (an adapter may itself be a context manager)
        if callable(getattr(made, "__aenter__", None)) and callable(
            getattr(made, "__aexit__", None)
        ):
            manager = made

            async def exit_async() -> None:
                await manager.__aexit__(None, None, None)

            return _yielded(await manager.__aenter__()), exit_async
        if callable(getattr(made, "__enter__", None)) and callable(getattr(made, "__exit__", None)):
            sync_manager = made

            async def exit_sync() -> None:
                sync_manager.__exit__(None, None, None)

            return _yielded(sync_manager.__enter__()), exit_sync
        return _yielded(made), None

    async def _initialize(self, storage: StorageAdapter) -> None:
        try:
            await storage.initialize()
        except Exception as exc:
            # A store that cannot even be set up (server unreachable, bad option) says
            # nothing about the contract; it is reported as an error, not a failure.
            raise HarnessError(f"initialize() raised {type(exc).__name__}: {exc}") from exc

    async def close_all(self) -> list[BaseException]:
        """Close every handle opened for this case, newest first, then run the conformance
        factory's teardowns, newest first; return what raised (a teardown's failure as a
        :class:`HarnessError`)."""
        errors: list[BaseException] = []
        try:
            await self.finish()
        except AssertionError as exc:
            errors.append(exc)
        while self._handles:
            handle = self._handles.pop()
            try:
                await handle.close()
            except Exception as exc:
                errors.append(exc)
        while self._teardowns:
            _, teardown = self._teardowns.pop()
            error = await _run_teardown(teardown)
            if error is not None:
                errors.append(error)
        return errors

    async def discard(self, storage: StorageAdapter) -> None:
        """Close one handle now (one :meth:`fresh_storage` made, say) and run its factory
        teardown, instead of at the end of the case: for cases that make many stores,
        such as the state machine (one per example)."""
        check = next(
            (
                c
                for c in self._checks
                if any(h is storage or h._inner is storage for h in c.handles)
            ),
            None,
        )
        if check is not None:
            self._checks.remove(check)
            await check.drain()
        storage = _unwrap(storage)
        self._handles = [h for h in self._handles if h is not storage]
        try:
            await storage.close()
        finally:
            for entry in [e for e in self._teardowns if e[0] is storage]:
                self._teardowns.remove(entry)
                error = await _run_teardown(entry[1])
                if error is not None:
                    raise error

    def sync(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the case's loop; for synchronous (Hypothesis) cases only."""
        __tracebackhide__ = True
        return self.loop.run_until_complete(awaitable)

    # -- other handles ----------------------------------------------------------

    @property
    def url(self) -> str:
        """URL of the store under test, checked by :meth:`verify_url`; a
        :class:`HarnessError` if it cannot be shared or opens another adapter."""
        return self.verify_url()

    def verify_url(self) -> str:
        """Check, once per URL, that ``open_storage(storage.url)`` builds the adapter under
        test again — the same class, through the same :class:`AdapterSpec` — and return
        the URL; otherwise raise :class:`HarnessError` saying what it built and how to fix
        it.

        Every case that opens another handle (racer threads and processes,
        :meth:`open_another`, a reopening) goes through the URL. A subclass of a built-in
        adapter that keeps the built-in's scheme would have those cases run against the
        built-in adapter and pass for the wrong reason, so this is an error, not a pass.
        The probe handle is built but not initialized (constructors do no I/O); it is
        closed with the others.
        """
        url = self.storage.url
        if not url:
            raise HarnessError(
                f"adapter {self.spec.name!r} declares a sharing capability but its url is "
                f"{url!r}; open_storage() cannot open the same store again"
            )
        if url not in self._verified_urls:
            probe = self._open_storage(url, shared_clock=True)
            self._handles.append(probe)
            self._check_same_adapter(url, probe)
            self._verified_urls.add(url)
        return url

    def _check_same_adapter(self, url: str, handle: StorageAdapter) -> None:
        expected, got = type(_unwrap(self.storage)), type(handle)
        resolved = _spec_for_url(url)
        same_spec = resolved is None or resolved.name == self.spec.name
        if got is expected and same_spec:
            return
        through = (
            f" through adapter {resolved.name!r} ({resolved.distribution or 'in-process'})"
            if resolved is not None
            else ""
        )
        other = repr(resolved.name) if resolved is not None else "another adapter"
        scheme = re.sub(r"[^a-z0-9+.-]", "-", self.spec.name.lower()) or "myadapter"
        raise HarnessError(
            f"open_storage({url!r}) built {_qualname(got)}{through}, but the adapter under "
            f"test is {self.spec.name!r} ({_qualname(expected)}); every case that opens "
            "another handle onto the store (racer threads and processes, a second handle, "
            f"reopening) would test {other} instead of yours, so the kit refuses to run it. "
            f"Fix: give {self.spec.name!r} a URL scheme of its own "
            f"(AdapterSpec(schemes=({scheme!r},), factory=...) building "
            f"{expected.__qualname__} from a {scheme}://... URL), make the adapter's url "
            f"use that scheme, and register the spec (a 'reflow' entry point, or "
            "reflow_core.register_adapter(spec) before the kit runs)"
        )

    def _open_storage(self, url: str, *, shared_clock: bool) -> StorageAdapter:
        options: dict[str, Any] = {"clock": self.clock} if shared_clock else {}
        try:
            return open_storage(url, **options)
        except Exception as exc:
            raise HarnessError(
                f"open_storage({url!r}{', clock=<kit clock>' if shared_clock else ''}) "
                f"raised {exc!r}; the URL factory must accept clock= (the store's 'now' "
                "for tests), and the URL's scheme must belong to the adapter under test "
                "(registered: a 'reflow' entry point or reflow_core.register_adapter)"
            ) from exc

    def open_url(self, url: str, *, shared_clock: bool = True) -> StorageAdapter:
        """``open_storage(url, clock=self.clock)`` (or without the clock), not initialized.

        The adapter's URL factory must accept ``clock=`` for the kit to share its clock
        with handles it opens in this process; a factory that refuses, or a URL that opens
        another adapter than the one under test, is a harness error saying so.
        """
        handle = self._open_storage(url, shared_clock=shared_clock)
        self._check_same_adapter(url, handle)
        check = self._check_for(url)
        if check is None or threading.get_ident() != self._thread:
            return handle
        label = f"handle {len(check.handles) + 1}"
        if not shared_clock:
            label += " (on the store's own clock)"
        wrapped = CheckedStorage(handle, check, label, ready=False, own_clock=not shared_clock)
        return cast(StorageAdapter, wrapped)

    def _check_for(self, url: str) -> StoreCheck | None:
        """The differential check of the store at ``url``, while it is still checked."""
        for check in self._checks:
            if check.active and any(h._inner.url == url for h in check.handles):
                return check
        return None

    def lose_track(self, reason: str) -> None:
        """Stop differential checking for the rest of the case: something the reference
        model cannot follow (another thread's or process's handle) writes to the store."""
        for check in self._checks:
            check.lose(reason)

    async def finish(self) -> None:
        """End of the case: take every event the reference model still buffers and
        compare them (:meth:`~reflow_conformance.differential.StoreCheck.drain`). Run
        once, before the handles are closed; a mismatch raises ``AssertionError``."""
        __tracebackhide__ = True
        checks, self._checks = self._checks, []
        for check in checks:
            await check.drain()

    async def open_another(self, *, shared_clock: bool = True) -> StorageAdapter:
        """A second initialized handle onto the same store, via ``open_storage(url)``,
        sharing the kit clock unless ``shared_clock=False`` (then it reads the store's own
        clock, as a handle in another process would)."""
        handle = self.open_url(self.url, shared_clock=shared_clock)
        self._handles.append(_unwrap(handle))
        await self._initialize(handle)
        return handle

    def has(self, capability: Capability) -> bool:
        """Whether the adapter declares ``capability``."""
        return capability in self.spec.capabilities

    # -- time -------------------------------------------------------------------

    def now(self) -> int:
        """The kit clock's time: what the adapter's ``now()`` must answer."""
        return self.clock()

    def advance(self, ms: int) -> int:
        """Move the kit clock (the store's "now") forward by ``ms``; return the new time."""
        return self.clock.advance(ms)

    def past(self) -> int:
        """A time certainly before the store's ``now`` for the whole case."""
        return self.clock() - FAR

    def future(self) -> int:
        """A time certainly after the store's ``now`` for the whole case."""
        return self.clock() + FAR

    async def expire(self, run_id: str, storage: StorageAdapter | None = None) -> int:
        """Advance the clock exactly to the run's ``lease_expires_at`` (when it is later),
        so its lease has just expired; return the new time.

        If the adapter reports no expiry, advance by :data:`LEASE_MS` (what
        :meth:`claim` asks for), so the cases that need a takeover still get one.
        """
        __tracebackhide__ = True
        run = await self.get(run_id, storage)
        target = run.lease_expires_at
        if target is None:
            target = self.now() + LEASE_MS
        return self.clock.advance_to(target)

    # -- builders ---------------------------------------------------------------

    def new_id(self, prefix: str = "run") -> str:
        """A unique id that sorts after earlier ones from this harness."""
        return f"{prefix}-{next(self._counter):05d}-{uuid.uuid4().hex[:8]}"

    def new_run(
        self,
        workflow: str = "wf",
        input: Any = None,
        *,
        id: str | None = None,
        created_at: int | None = None,
        idempotency_key: str | None = None,
    ) -> WorkflowRun:
        """A ``pending`` run record, ready for ``create_run``."""
        created = self.now() if created_at is None else created_at
        return WorkflowRun(
            id=id or self.new_id(),
            workflow=workflow,
            input=input,
            status=RunStatus.PENDING,
            created_at=created,
            updated_at=created,
            idempotency_key=idempotency_key,
        )

    def step(
        self,
        run_id: str,
        name: str,
        status: StepStatus = StepStatus.COMPLETED,
        output: Any = None,
        *,
        id: str | None = None,
        error: ErrorInfo | None = None,
        created_at: int | None = None,
        wake_at: int | None = None,
        attempts: int = 1,
    ) -> StepResult:
        """A step row; its id defaults to ``"{run_id}/{name}"``."""
        created = self.now() if created_at is None else created_at
        return StepResult(
            id=id or f"{run_id}/{name}",
            run_id=run_id,
            name=name,
            status=status,
            output=output,
            error=error,
            attempts=attempts,
            created_at=created,
            updated_at=created,
            wake_at=wake_at,
        )

    def schedule(
        self,
        key: str,
        workflow: str = "wf",
        input: Any = None,
        *,
        every_ms: int | None = None,
        cron: str | None = None,
        next_run_at: int = 1_000,
        catch_up: bool = False,
    ) -> Schedule:
        """A schedule record (every minute by default)."""
        if every_ms is None and cron is None:
            every_ms = 60_000
        return Schedule(
            key=key,
            workflow=workflow,
            input=input,
            recurrence=Recurrence(every_ms=every_ms, cron=cron, catch_up=catch_up),
            next_run_at=next_run_at,
            created_at=1,
            updated_at=1,
        )

    async def create(self, workflow: str = "wf", input: Any = None, **kwargs: Any) -> WorkflowRun:
        """Create a run and return the stored record, checking ``created``."""
        __tracebackhide__ = True
        result = await self.storage.create_run(self.new_run(workflow, input, **kwargs))
        expect(result.created, True, "create_run(...).created for a new run")
        return result.run

    async def get(self, run_id: str, storage: StorageAdapter | None = None) -> WorkflowRun:
        """Read a run that must exist."""
        __tracebackhide__ = True
        run = await (storage or self.storage).get_run(run_id)
        if run is None:
            raise ContractViolation(f"get_run({run_id!r}) after it was created", "a run", None)
        return run

    # -- racing -----------------------------------------------------------------

    async def race_coroutines(self, count: int, fn: RaceFunction[T]) -> list[T]:
        """``count`` coroutines on the one handle, released together by a barrier."""
        __tracebackhide__ = True
        barrier = asyncio.Barrier(count)

        async def racer(index: int) -> T:
            __tracebackhide__ = True
            await barrier.wait()
            return await fn(self.storage, index)

        return list(await asyncio.gather(*(racer(i) for i in range(count))))

    async def race_threads(self, count: int, fn: RaceFunction[T]) -> list[T]:
        """``count`` OS threads, each with its own handle and event loop, barrier-released.

        Each thread opens ``open_storage(url, clock=<kit clock>)`` and initializes it
        *before* the barrier, so the race is between the calls under test, not between
        connection set-ups. All share the kit clock.
        """
        __tracebackhide__ = True
        url = self.url
        self.lose_track("racer threads write through handles of their own")
        barrier = threading.Barrier(count)
        results: list[Any] = [None] * count
        errors: list[BaseException | None] = [None] * count

        async def thread_main(index: int) -> None:
            __tracebackhide__ = True
            handle = self.open_url(url)
            try:
                await handle.initialize()
                barrier.wait(BARRIER_TIMEOUT_S)
                results[index] = await fn(handle, index)
            finally:
                await handle.close()

        def target(index: int) -> None:
            __tracebackhide__ = True
            try:
                asyncio.run(thread_main(index))
            except BaseException as exc:
                errors[index] = exc
                barrier.abort()

        def run_all() -> None:
            threads = [
                threading.Thread(target=target, args=(i,), name=f"reflow-racer-{i}")
                for i in range(count)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        await asyncio.to_thread(run_all)
        for error in errors:
            if isinstance(error, AssertionError):
                raise error
            if isinstance(error, threading.BrokenBarrierError):
                continue  # another racer's error broke the barrier; that one is reported
            if error is not None:
                raise error
        if any(isinstance(e, threading.BrokenBarrierError) for e in errors):
            raise HarnessError("racer threads never all reached the start barrier")
        return results

    # -- shortcuts used by many cases -------------------------------------------

    async def claim_any(
        self,
        names: Collection[str] = ("wf",),
        *,
        lease_ms: int = LEASE_MS,
        holder: LeaseHolder | None = _DEFAULT,
        storage: StorageAdapter | None = None,
    ) -> ClaimedRun | None:
        """``claim_next_run(names, lease_ms=..., holder=...)``: whatever it claims, or None."""
        who = KIT_HOLDER if holder is _DEFAULT else holder
        return await (storage or self.storage).claim_next_run(names, lease_ms=lease_ms, holder=who)

    async def claim(
        self,
        run_id: str,
        names: Collection[str] = ("wf",),
        *,
        lease_ms: int = LEASE_MS,
        holder: LeaseHolder | None = _DEFAULT,
        storage: StorageAdapter | None = None,
    ) -> ClaimedRun:
        """Claim and check that the claimed run is ``run_id``."""
        __tracebackhide__ = True
        claimed = await self.claim_any(names, lease_ms=lease_ms, holder=holder, storage=storage)
        if claimed is None or claimed.run.id != run_id:
            raise ContractViolation(
                f"claim_next_run({list(names)!r}, lease_ms={lease_ms}) at {self.now()} should "
                f"claim run {run_id}",
                run_id,
                claimed.run.id if claimed else None,
            )
        return claimed

    async def take_over(
        self,
        run_id: str,
        names: Collection[str] = ("wf",),
        *,
        lease_ms: int = LEASE_MS,
        holder: LeaseHolder | None = _DEFAULT,
        storage: StorageAdapter | None = None,
    ) -> ClaimedRun:
        """Let the run's lease expire (:meth:`expire`), then claim it: a stale takeover."""
        __tracebackhide__ = True
        await self.expire(run_id, storage)
        return await self.claim(run_id, names, lease_ms=lease_ms, holder=holder, storage=storage)

    async def created_and_claimed(
        self,
        workflow: str = "wf",
        input: Any = None,
        *,
        lease_ms: int = LEASE_MS,
        holder: LeaseHolder | None = _DEFAULT,
    ) -> ClaimedRun:
        """A new run of ``workflow``, claimed (with ``lease_ms`` and ``holder``)."""
        __tracebackhide__ = True
        run = await self.create(workflow, input)
        return await self.claim(run.id, (workflow,), lease_ms=lease_ms, holder=holder)

    async def snapshot(self, run_ids: Collection[str]) -> Any:
        """Everything readable about these runs and all schedules, to prove "unchanged"."""
        runs = [await self.storage.get_run(run_id) for run_id in run_ids]
        steps = [await self.storage.get_step_results(run_id) for run_id in run_ids]
        listed = await self.storage.list_runs(RunFilter(limit=10_000))
        return runs, steps, listed, await self.storage.list_schedules()

    async def expect_unchanged(self, before: Any, run_ids: Collection[str], what: str) -> None:
        """Fail if anything readable changed since :meth:`snapshot` returned ``before``.

        The failure shows only what differs — per run, step row, listed run and schedule
        field, as a compact unified diff — not the two snapshots in full.
        """
        __tracebackhide__ = True
        after = await self.snapshot(run_ids)
        if after == before:
            return
        ids = list(run_ids)
        diff = snapshot_diff(before, after, ids)
        if not diff.strip():  # equal renderings of unequal values: show both in full
            raise ContractViolation(f"{what}: storage must be unchanged", before, after)
        raise ContractViolation(
            f"{what}: storage must be unchanged, but it changed (- before, + after):",
            before,
            after,
            detail=diff,
        )
