"""Stored values as an operator reads them, a damaged one never passed off as a value.

An adapter stands a :class:`~reflow_core.types.DamagedValue` in for a stored value it
cannot decode. Converted like any other struct it would read as the value
``{"error": ..., "stored": ...}``, which a real input may well be. So:

- text prints it as ``damaged: <error> (stored: <start of the stored text>)``
  (:func:`value_text`);
- JSON puts ``null`` in the value's place and says what is damaged in a ``damaged``
  field of the record, ``{}`` when nothing is (:func:`record_json`);
- :func:`damaged_values` lists every damaged value of a run and its steps, for
  ``reflow runs explain``.

No click, no rich: :mod:`reflow_cli.explain` uses this module and stays pure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from reflow_core.types import DamagedValue, Schedule, StepResult, WorkflowRun

__all__ = ["Damage", "damage_text", "damaged_values", "is_damaged", "record_json", "value_text"]

_VALUE_FIELDS: dict[type, tuple[str, ...]] = {
    WorkflowRun: ("input", "output"),
    StepResult: ("output",),
    Schedule: ("input",),
}
"""The fields of each record that hold a stored value (and so may hold the marker)."""


def is_damaged(value: Any) -> bool:
    """Whether ``value`` is the marker of a value that could not be decoded."""
    return isinstance(value, DamagedValue)


def damage_text(value: DamagedValue) -> str:
    """The marker as one line: why decoding failed, then the start of the stored text."""
    stored = " ".join(value.stored.split())
    return f"damaged: {value.error} (stored: {stored})"


def value_text(value: Any, width: int = 60) -> str:
    """A stored value as one JSON line (a damaged one as :func:`damage_text`), cut at
    ``width`` characters."""
    if isinstance(value, DamagedValue):
        text = damage_text(value)
    else:
        text = json.dumps(msgspec.to_builtins(value), default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def record_json(record: WorkflowRun | StepResult | Schedule) -> dict[str, Any]:
    """``record`` as plain JSON values, each damaged value replaced by ``None`` and
    described under ``damaged`` (``{"input": {"error": ..., "stored": ...}}``)."""
    data: dict[str, Any] = msgspec.to_builtins(record)
    damaged: dict[str, dict[str, str]] = {}
    for name in _VALUE_FIELDS[type(record)]:
        value = getattr(record, name)
        if isinstance(value, DamagedValue):
            data[name] = None
            damaged[name] = {"error": value.error, "stored": value.stored}
    data["damaged"] = damaged
    return data


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged value of a run: its input or output, or a step's stored output."""

    value: str
    """``"input"`` or ``"output"``."""
    step: str | None
    """The step whose stored output it is; ``None`` for the run's own values."""
    marker: DamagedValue

    @property
    def what(self) -> str:
        """The value named as the engine's ``DAMAGED_VALUE`` error names it."""
        if self.step is None:
            return f"the {self.value}"
        return f"the stored output of step {self.step!r}"

    def to_json(self) -> dict[str, Any]:
        """The ``damaged`` entries of ``reflow runs explain --json``."""
        return {
            "value": self.value,
            "step": self.step,
            "error": self.marker.error,
            "stored": self.marker.stored,
        }


def damaged_values(run: WorkflowRun, steps: list[StepResult]) -> list[Damage]:
    """Every damaged value of ``run`` and its ``steps``: input, output, then steps in order."""
    found = [
        Damage(name, None, getattr(run, name))
        for name in ("input", "output")
        if isinstance(getattr(run, name), DamagedValue)
    ]
    found += [
        Damage("output", step.name, step.output)
        for step in steps
        if isinstance(step.output, DamagedValue)
    ]
    return found
