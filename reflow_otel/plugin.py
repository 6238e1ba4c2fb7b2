"""The ``otel`` entry point of the ``reflow`` group: one :class:`ReflowTelemetry` for every
engine in the process, reporting to the global OpenTelemetry providers.

It must load cleanly everywhere Reflow is installed, because the entry point is always
there: without the ``otel`` extra (or with ``OTEL_SDK_DISABLED=true``) :data:`plugin`
implements no hook, so engines build no events for it.
"""

from __future__ import annotations

import os

__all__ = ["plugin"]


class _Inert:
    """Stands in for the telemetry when OpenTelemetry is absent or disabled."""

    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<reflow_otel plugin: off, {self.reason}>"


def _build() -> object:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return _Inert("OTEL_SDK_DISABLED is true")
    try:
        from reflow_otel.telemetry import ReflowTelemetry
    except ImportError:
        return _Inert("OpenTelemetry is not installed: pip install 'reflow[otel]'")
    return ReflowTelemetry()


plugin: object = _build()
"""What the entry point registers: the process's telemetry, or an inert stand-in."""
