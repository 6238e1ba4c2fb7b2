"""The identifiers area catches adapters that mishandle ids, names and keys.

Each adapter here is the intact ``MemoryStorage`` with one identifier bug of the kind real
adapters have: a ``workflow:key`` index, ``LIKE`` or case-insensitive matching, a name
list bound as a hand-built array literal, locale or UTF-16 ordering, trimmed or
normalised names, ``run_id:key`` or ``run_id/name`` composite keys, a ``VARCHAR(128)``
column, columns sized in bytes, no validation at all, the wrong error, or a check made too
late. Each must fail at least the named ``identifiers.*`` cases, and together they fail
every case of the area: no case is vacuous.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

import reflow_adapters.memory.storage as memory_module
import reflow_core.identifiers as identifiers
from reflow_adapters.memory import MemoryStorage
from reflow_conformance import render_table, run_spec, select_cases
from reflow_conformance.report import Outcome, Report
from reflow_core import AdapterSpec, codec
from reflow_core.errors import InvalidIdentifierError, StorageError
from reflow_core.identifiers import check_holder, check_names, is_identifier
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    EventRecord,
    LeaseHolder,
    RunFilter,
    Schedule,
    StepResult,
    WorkflowRun,
)

AREA = "identifiers"


def _fold(text: str) -> str:
    """What a "friendly" store does to names: NFKC, case folding, trimming."""
    return unicodedata.normalize("NFKC", text).casefold().strip()


def _like(pattern: str, value: str) -> bool:
    """SQL ``value LIKE pattern`` as SQLite does it: % and _ are wildcards, case ignored."""
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE | re.DOTALL) is not None


def _naive_array(names: Collection[str]) -> list[str]:
    """Names bound as ``"{" + ",".join(names) + "}"`` and parsed as PostgreSQL parses an
    array literal: split at commas, blanks trimmed, ``NULL`` is no name, quotes removed,
    a backslash escapes the next character."""
    literal = "{" + ",".join(names) + "}"
    parsed = []
    for item in literal[1:-1].split(","):
        item = item.strip()
        if item.upper() == "NULL":
            continue
        if len(item) >= 2 and item[0] == item[-1] == '"':
            item = item[1:-1]
        parsed.append(re.sub(r"\\(.)", r"\1", item))
    return [n for n in parsed if is_identifier(n)]


class JoinedIdempotencyKeys(MemoryStorage):
    """Finds an idempotency key by ``f"{workflow}:{key}"``."""

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        if run.idempotency_key is not None:
            joined = f"{run.workflow}:{run.idempotency_key}"
            for (workflow, key), run_id in self._keys.items():
                if f"{workflow}:{key}" == joined:
                    return CreateRunResult(self._runs[run_id].record(), False)
        return await super().create_run(run)


class NormalisedNames(MemoryStorage):
    """Stores and matches workflow names and idempotency keys NFKC-normalised,
    case-folded and trimmed (a case-insensitive, trimming collation)."""

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        key = None if run.idempotency_key is None else _fold(run.idempotency_key)
        folded = msgspec.structs.replace(run, workflow=_fold(run.workflow), idempotency_key=key)
        return await super().create_run(folded)

    async def claim_next_run(
        self, workflow_names: Collection[str], *, lease_ms: int, holder: LeaseHolder | None = None
    ) -> ClaimedRun | None:
        names = [_fold(n) for n in workflow_names]
        return await super().claim_next_run(names, lease_ms=lease_ms, holder=holder)

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        workflow = None if filter.workflow is None else _fold(filter.workflow)
        return await super().list_runs(msgspec.structs.replace(filter, workflow=workflow))


class LikeMatchedWorkflows(MemoryStorage):
    """Matches workflow names with ``LIKE`` (claims, listings, due schedules)."""

    def _matching(self, patterns: Collection[str], stored: Collection[str]) -> list[str]:
        return sorted({name for name in stored for p in patterns if _like(p, name)})

    async def claim_next_run(
        self, workflow_names: Collection[str], *, lease_ms: int, holder: LeaseHolder | None = None
    ) -> ClaimedRun | None:
        names = self._matching(workflow_names, {row.workflow for row in self._runs.values()})
        return await super().claim_next_run(names, lease_ms=lease_ms, holder=holder)

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        if filter.workflow is None:
            return await super().list_runs(filter)
        every = await super().list_runs(msgspec.structs.replace(filter, workflow=None, limit=10**9))
        return [r for r in every if _like(filter.workflow, r.workflow)][: filter.limit]

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        stored = {s.workflow for s in await self.list_schedules()}
        return await super().claim_due_schedule(self._matching(workflow_names, stored))


class NaiveArrayLiteral(MemoryStorage):
    """Binds the name list of a claim as an unquoted ``{a,b}`` array literal."""

    async def claim_next_run(
        self, workflow_names: Collection[str], *, lease_ms: int, holder: LeaseHolder | None = None
    ) -> ClaimedRun | None:
        names = _naive_array(workflow_names)
        return await super().claim_next_run(names, lease_ms=lease_ms, holder=holder)

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        return await super().claim_due_schedule(_naive_array(workflow_names))


class Utf16KeyOrder(MemoryStorage):
    """Lists schedules in UTF-16 order (as Java, .NET or JavaScript strings compare)."""

    async def list_schedules(self) -> list[Schedule]:
        return sorted(await super().list_schedules(), key=lambda s: s.key.encode("utf-16-be"))


class CaseInsensitiveEventNames(MemoryStorage):
    """Buffers, takes and waits on case-folded event names."""

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        return await super().deliver_event(run_id, event_name.casefold(), payload, key=key)

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        return await super().take_event(run_id, event_name.casefold())

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        return await super().wait_run(run_id, lease_id, event_name.casefold(), wake_at)

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        return await super().consume_event(event_name.casefold(), checkpoint, lease_id)


class PaddedEventNames(MemoryStorage):
    """Compares event names ignoring trailing spaces (SQL ``PAD SPACE`` collations)."""

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        return await super().deliver_event(run_id, event_name.rstrip(" "), payload, key=key)

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        return await super().take_event(run_id, event_name.rstrip(" "))

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        return await super().wait_run(run_id, lease_id, event_name.rstrip(" "), wake_at)

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        return await super().consume_event(event_name.rstrip(" "), checkpoint, lease_id)


class JoinedEventKeys(MemoryStorage):
    """Remembers delivery keys as ``f"{run_id}:{key}"`` in one set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._joined: set[str] = set()

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        if key is not None:
            if f"{run_id}:{key}" in self._joined:
                return True
            self._joined.add(f"{run_id}:{key}")
        return await super().deliver_event(run_id, event_name, payload, key=key)


class JoinedEventBuffers(MemoryStorage):
    """Buffers events under ``f"{run_id}:{event_name}"``."""

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        row = self._runs.get(run_id)
        if row is None or row.status.is_terminal:
            return False
        self._events.push(f"{run_id}:{event_name}", "-", codec.encode(payload), self._clock(), key)
        return True

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        event = self._events.pop(f"{run_id}:{event_name}", "-")
        return None if event is None else EventRecord(codec.decode(event[0] or b""), event[1])


class StepIdsFromPath(MemoryStorage):
    """Keys step rows by ``f"{run_id}/{name}"`` whatever id it is given."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        path = msgspec.structs.replace(result, id=f"{result.run_id}/{result.name}")
        return await super().save_step_result(path, lease_id)


class PrefixStepRows(MemoryStorage):
    """Reads a run's steps with ``run_id LIKE :run_id || '%'``."""

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        rows: list[StepResult] = []
        for other in list(self._runs):
            if other.startswith(run_id):
                rows.extend(await super().get_step_results(other))
        return sorted(rows, key=lambda r: (r.created_at, r.id))


class PrefixRequeue(MemoryStorage):
    """Requeues with ``DELETE ... WHERE run_id LIKE :run_id || '%' AND status = 'failed'``."""

    async def requeue_run(self, run_id: str) -> bool:
        requeued = await super().requeue_run(run_id)
        if requeued:
            for other in list(self._runs):
                if other.startswith(run_id):
                    self._steps.drop_failed(other)
        return requeued


class CaseInsensitiveScheduleKeys(MemoryStorage):
    """Stores and deletes schedules under case-folded keys."""

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        return await super().upsert_schedule(
            msgspec.structs.replace(schedule, key=schedule.key.casefold())
        )

    async def delete_schedule(self, key: str) -> bool:
        return await super().delete_schedule(key.casefold())


class Varchar128(MemoryStorage):
    """Silently cuts run ids, workflow names and keys to 128 characters."""

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        key = run.idempotency_key
        cut = msgspec.structs.replace(
            run, id=run.id[:128], workflow=run.workflow[:128], idempotency_key=key and key[:128]
        )
        return await super().create_run(cut)


class Varchar255Bytes(MemoryStorage):
    """Sizes columns in bytes (Oracle ``VARCHAR2(255 BYTE)``, MySQL ``utf8mb3``): an id,
    workflow name or key over 255 bytes of UTF-8 fails like a driver would."""

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        for value in (run.id, run.workflow, run.idempotency_key or ""):
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > 255:
                raise StorageError("create_run", f"value too large for column ({size} > 255)")
        return await super().create_run(run)


class TrimmedHolder(MemoryStorage):
    """Stores a holder's worker and host trimmed."""

    async def claim_next_run(
        self, workflow_names: Collection[str], *, lease_ms: int, holder: LeaseHolder | None = None
    ) -> ClaimedRun | None:
        if holder is not None:
            holder = LeaseHolder(worker=holder.worker.strip(), host=holder.host.strip(), pid=1)
        return await super().claim_next_run(workflow_names, lease_ms=lease_ms, holder=holder)


class UncheckedReads(MemoryStorage):
    """Answers "not found" for an invalid identifier instead of refusing it."""

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        return await super().get_run(run_id) if is_identifier(run_id) else None

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        return await super().get_step_results(run_id) if is_identifier(run_id) else []


class LeaseCheckedFirst(MemoryStorage):
    """Answers ``False`` (not held) before checking the identifiers."""

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        if self._runs.get(run_id) is None or self._runs[run_id].lease_id != lease_id:
            return False
        return await super().heartbeat_run(run_id, lease_id)


def _bind(lease_id: str) -> None:
    """What PostgreSQL's driver does with a string it cannot send."""
    if "\x00" in lease_id:
        raise StorageError("bind", "PostgreSQL text fields cannot contain NUL (0x00) bytes")
    lease_id.encode()  # UnicodeEncodeError for a surrogate


class LeaseIdsSentToDriver(MemoryStorage):
    """Sends a presented lease id to the driver unchecked, which fails on NUL or a
    surrogate instead of answering "not held"."""

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        _bind(lease_id)
        return await super().heartbeat_run(run_id, lease_id)

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        if lease_id is not None:
            _bind(lease_id)
        return await super().save_step_result(result, lease_id)


class ClaimsBeforeChecking(MemoryStorage):
    """Claims with the valid names first, and refuses the invalid ones afterwards."""

    async def claim_next_run(
        self, workflow_names: Collection[str], *, lease_ms: int, holder: LeaseHolder | None = None
    ) -> ClaimedRun | None:
        valid = [n for n in workflow_names if is_identifier(n)]
        claimed = await super().claim_next_run(valid, lease_ms=lease_ms)
        check_names(workflow_names)
        check_holder(holder)
        return claimed


@dataclass(frozen=True)
class Mutation:
    name: str
    adapter: type[MemoryStorage]
    caught_by: frozenset[str]
    patch: str | None = None
    """``"none"``: the adapter's identifier checks do nothing; ``"wrong-error"``: they
    raise ``StorageError`` (a driver's error) instead of ``InvalidIdentifierError``."""


def _ids(*names: str) -> frozenset[str]:
    return frozenset(f"{AREA}.{n}" for n in names)


REFUSALS = _ids(
    "refused_by_create_run",
    "refused_by_reads",
    "refused_by_claims",
    "refused_by_lease_methods",
    "refused_by_step_methods",
    "refused_by_deliver_event",
    "refused_by_schedule_methods",
)

MUTATIONS = [
    Mutation(
        "joined-idempotency-keys", JoinedIdempotencyKeys, _ids("idempotency_keys_are_not_joined")
    ),
    Mutation(
        "normalised-names",
        NormalisedNames,
        _ids(
            "lookalikes_are_distinct", "claims_match_workflow_names_exactly", "any_valid_identifier"
        ),
    ),
    Mutation(
        "like-matched-workflows",
        LikeMatchedWorkflows,
        _ids("claims_match_workflow_names_exactly", "list_runs_filter_is_exact", "schedules_exact"),
    ),
    Mutation("naive-array-literal", NaiveArrayLiteral, _ids("claims_with_tricky_name_lists")),
    Mutation("utf16-key-order", Utf16KeyOrder, _ids("code_point_order")),
    Mutation(
        "case-insensitive-event-names",
        CaseInsensitiveEventNames,
        _ids("event_names_and_keys_exact", "waits_match_event_names_exactly"),
    ),
    Mutation(
        "padded-event-names",
        PaddedEventNames,
        _ids("event_names_and_keys_exact", "waits_match_event_names_exactly"),
    ),
    Mutation("joined-event-keys", JoinedEventKeys, _ids("event_names_and_keys_exact")),
    Mutation("joined-event-buffers", JoinedEventBuffers, _ids("event_names_and_keys_exact")),
    Mutation("step-ids-from-path", StepIdsFromPath, _ids("step_rows_exact")),
    Mutation("prefix-step-rows", PrefixStepRows, _ids("step_rows_exact")),
    Mutation("prefix-requeue", PrefixRequeue, _ids("step_rows_exact")),
    Mutation(
        "case-insensitive-schedule-keys", CaseInsensitiveScheduleKeys, _ids("schedules_exact")
    ),
    Mutation("varchar-128", Varchar128, _ids("longest_valid_identifiers")),
    Mutation("varchar-255-bytes", Varchar255Bytes, _ids("longest_valid_identifiers")),
    Mutation("trimmed-holder", TrimmedHolder, _ids("holder_fields_exact")),
    Mutation("no-validation", MemoryStorage, REFUSALS, patch="none"),
    Mutation("driver-error", MemoryStorage, REFUSALS, patch="wrong-error"),
    Mutation("unchecked-reads", UncheckedReads, _ids("refused_by_reads")),
    Mutation("lease-checked-first", LeaseCheckedFirst, _ids("refused_by_lease_methods")),
    Mutation(
        "lease-ids-sent-to-driver",
        LeaseIdsSentToDriver,
        _ids("refused_by_lease_methods", "refused_by_step_methods"),
    ),
    Mutation("claims-before-checking", ClaimsBeforeChecking, _ids("refused_by_claims")),
]

_CHECKS = (
    "check_holder",
    "check_identifier",
    "check_names",
    "check_run",
    "check_schedule",
    "check_step",
)


def _unchecked(*args: Any, **kwargs: Any) -> None:
    """An identifier check that lets everything through."""


def _driver_error(check: Callable[..., Any]) -> Callable[..., Any]:
    """An identifier check that raises what a driver would: ``StorageError``."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return check(*args, **kwargs)
        except InvalidIdentifierError as exc:
            raise StorageError("bind", f"the driver refused the value: {exc}") from None

    return wrapped


@pytest.fixture
def patched(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaces the identifier checks ``MemoryStorage`` calls, as the mutation says."""
    mode = request.param
    for name in _CHECKS if mode is not None else ():
        check = getattr(identifiers, name)
        monkeypatch.setattr(
            memory_module, name, _unchecked if mode == "none" else _driver_error(check)
        )


def _spec(adapter: type[MemoryStorage], name: str) -> AdapterSpec:
    return AdapterSpec(
        name=name,
        factory=lambda url=None, clock=None: adapter(clock=clock),
        conformance_factory=lambda tmp_path, options, clock=None: adapter(clock=clock),
    )


def _outcomes(report: Report, outcome: Outcome) -> set[str]:
    return {c.id for c in report.cases if c.outcome is outcome}


def test_every_identifiers_case_is_caught_by_some_mutation() -> None:
    cases = {c.id for c in select_cases(AREA)}
    caught = set().union(*(m.caught_by for m in MUTATIONS))
    assert caught == cases, sorted(cases ^ caught)


@pytest.mark.parametrize(
    ("mutation", "patched"),
    [pytest.param(m, m.patch, id=m.name) for m in MUTATIONS],
    indirect=["patched"],
)
def test_identifiers_area_catches_mutation(mutation: Mutation, patched: None) -> None:
    report = run_spec(_spec(mutation.adapter, mutation.name), {}, select=AREA)
    failed = _outcomes(report, Outcome.FAILED)
    missing = sorted(mutation.caught_by - failed)
    assert not missing, (
        f"{mutation.name} should fail {missing}; it failed {sorted(failed)}\n"
        + render_table(report)
    )
    assert _outcomes(report, Outcome.ERROR) == set(), render_table(report)


def test_intact_memory_adapter_passes_the_identifiers_area() -> None:
    report = run_spec(_spec(MemoryStorage, "intact-memory"), {}, select=AREA)
    assert report.ok and report.totals.failed == 0, render_table(report)
    assert report.totals.passed == len(select_cases(AREA))
