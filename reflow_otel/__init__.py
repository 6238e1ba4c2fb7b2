"""OpenTelemetry for Reflow: a span per run attempt and per step, and run and step metrics.

Install the extra (``pip install 'reflow[otel]'``) and configure OpenTelemetry as usual
(a ``TracerProvider`` and a ``MeterProvider`` with your exporters): the plugin is
registered in the ``reflow`` entry-point group like any plugin, so every engine in the
process reports to the global providers. To report elsewhere (a test, a second
pipeline), give an engine its own instance and no plugins::

    from reflow_otel import ReflowTelemetry

    telemetry = ReflowTelemetry(tracer_provider=provider, meter_provider=meters)
    engine = Engine(storage, [wf], hooks=[telemetry], use_plugins=False)

``OTEL_SDK_DISABLED=true`` turns the plugin off; so does ``Engine(use_plugins=False)``.
See :mod:`reflow_otel.telemetry` for the spans, attributes and instruments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflow_otel.telemetry import ReflowTelemetry

__all__ = ["ReflowTelemetry"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package never fails without the extra: only asking
    # for the telemetry does, with the command that fixes it.
    if name == "ReflowTelemetry":
        from reflow_otel.telemetry import ReflowTelemetry

        return ReflowTelemetry
    raise AttributeError(f"module 'reflow_otel' has no attribute {name!r}")
