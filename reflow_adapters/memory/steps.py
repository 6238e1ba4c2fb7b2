"""The step table behind ``MemoryStorage``: checkpoint rows, their identity, write-once.

Plain synchronous code with no clock and no awaits: :class:`MemoryStorage` calls it
from inside its method bodies, so each call is part of one atomic adapter method.
Outputs are held as codec bytes next to a copy of the row without its output.

A kept row holds its status as the plain ``str`` value, not the enum member: msgspec
leaves a Struct of untracked fields (str, int, None) untracked by the garbage collector,
so each kept row is one object fewer for every later collection to walk (a store of
10,000 runs holds 50,000 rows). :func:`as_record` gives the member back.
"""

from __future__ import annotations

from typing import Any

import msgspec

from reflow_core.errors import StorageError
from reflow_core.types import StepResult, StepStatus

__all__ = ["StepTable", "as_record"]

_Stored = tuple[StepResult, bytes | None]
"""A stored step row: the record with ``output=None`` (and a plain-``str`` status), and
its encoded output."""

_PLAIN: dict[Any, str] = {status: status.value for status in StepStatus}
_MEMBER: dict[Any, StepStatus] = {status.value: status for status in StepStatus}


def _kept(result: StepResult, created_at: int) -> StepResult:
    """``result`` as the table keeps it: no output, the status as its plain ``str``."""
    status: Any = result.status
    if status.__class__ is StepStatus:
        status = _PLAIN[status]
    return msgspec.structs.replace(result, output=None, status=status, created_at=created_at)


def as_record(row: StepResult, output: Any) -> StepResult:
    """A kept row as the record a reader gets: its status a :class:`StepStatus` again
    (one the enum does not know is left as stored), with ``output``."""
    status: Any = row.status
    if status.__class__ is str:
        status = _MEMBER.get(status, status)
    return msgspec.structs.replace(row, output=output, status=status)


def _is_final(step: StepResult) -> bool:
    # StepStatus() also accepts the plain string values a caller may have passed.
    return StepStatus(step.status).is_done


class StepTable:
    """Every run's step rows; ``(run_id, name)`` and ``id`` are both unique."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, _Stored]] = {}  # run id -> step name -> row
        self._ids: dict[str, tuple[str, str]] = {}  # step id -> (run id, step name)
        self.owner = self._ids.get
        """The ``(run_id, name)`` a step id names, or ``None`` (read-only, and no call
        of its own: asked on every checkpoint)."""

    def clear(self) -> None:
        """Drop every row."""
        self._rows.clear()
        self._ids.clear()

    def existing(self, result: StepResult, operation: str) -> StepResult | None:
        """The stored row an upsert of ``result`` would replace, or ``None``.

        Raises ``StorageError`` (naming ``operation``) on an identity clash: the id
        already names another ``(run_id, name)``, or the pair already has another id.
        Checks only, so a caller that must change other state as well (consume_event)
        can raise before it has changed anything.
        """
        owner = self._ids.get(result.id)
        if owner is not None and owner != (result.run_id, result.name):
            raise StorageError(
                operation,
                f"step id {result.id!r} already names step {owner[1]!r} of run {owner[0]!r}",
            )
        stored = self._rows.get(result.run_id, {}).get(result.name)
        if stored is None:
            return None
        if stored[0].id != result.id:
            raise StorageError(
                operation,
                f"step {result.name!r} of run {result.run_id!r} already has id "
                f"{stored[0].id!r}, not {result.id!r}",
            )
        return stored[0]

    def is_final(self, result: StepResult) -> bool:
        """Whether a final row (completed, completed-early, skipped) stands for ``result``.

        Such a row is never written again (write-once checkpoints). Never raises: an
        identity clash is left to :meth:`existing`.
        """
        stored = self._rows.get(result.run_id, {}).get(result.name)
        return stored is not None and stored[0].id == result.id and _is_final(stored[0])

    def put(self, result: StepResult, existing: StepResult | None, output: bytes | None) -> None:
        """Upsert ``result`` with its encoded ``output``, keeping ``existing.created_at``.

        ``existing`` is what :meth:`existing` answered, and must not be final.
        """
        created_at = result.created_at if existing is None else existing.created_at
        self._rows.setdefault(result.run_id, {})[result.name] = (_kept(result, created_at), output)
        self._ids[result.id] = (result.run_id, result.name)

    def upsert(self, result: StepResult, output: bytes | None, operation: str) -> bool:
        """:meth:`existing`, :meth:`is_final` and :meth:`put` in one walk: store ``result``
        with its encoded ``output`` unless a final row stands for it (``False``).

        Raises ``StorageError`` (naming ``operation``) on an identity clash, before any
        change.
        """
        run_id, name = result.run_id, result.name
        owner = self._ids.get(result.id)
        if owner is not None and (owner[1] != name or owner[0] != run_id):
            raise StorageError(
                operation,
                f"step id {result.id!r} already names step {owner[1]!r} of run {owner[0]!r}",
            )
        steps = self._rows.get(run_id)
        stored = None if steps is None else steps.get(name)
        created_at = result.created_at
        if stored is not None:
            row = stored[0]
            if row.id != result.id:
                raise StorageError(
                    operation,
                    f"step {name!r} of run {run_id!r} already has id {row.id!r}, not {result.id!r}",
                )
            if _is_final(row):
                return False  # write-once: the first writer won
            created_at = row.created_at
        if steps is None:
            steps = self._rows[run_id] = {}
        steps[name] = (_kept(result, created_at), output)
        if owner is None:
            self._ids[result.id] = (run_id, name)
        return True

    def rows(self, run_id: str) -> list[_Stored]:
        """The run's rows (output still encoded), ordered by ``(created_at, id)``."""
        return sorted(self._rows.get(run_id, {}).values(), key=lambda r: (r[0].created_at, r[0].id))

    def drop_failed(self, run_id: str) -> None:
        """Delete the run's ``failed`` rows (and free their ids); every other row stays."""
        steps = self._rows.get(run_id, {})
        for name, (step, _) in list(steps.items()):
            if StepStatus(step.status) is StepStatus.FAILED:
                del steps[name]
                del self._ids[step.id]

    def drop_run(self, run_id: str) -> None:
        """Delete every row of the run (a purge) and free their ids."""
        for step, _ in self._rows.pop(run_id, {}).values():
            self._ids.pop(step.id, None)
