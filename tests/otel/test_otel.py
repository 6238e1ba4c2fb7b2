"""The OpenTelemetry plugin, checked with the SDK's in-memory span exporter and metric
reader: the span tree of a run with a retry, a sleep and a failure; its metrics; the
entry-point registration; and a clean stand-in without the extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flow_support import open_engine
from helpers import FakeClock, run

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from reflow_core import RetryPolicy, RunStatus, StepContext, Workflow
from reflow_otel import ReflowTelemetry

ROOT = Path(__file__).resolve().parents[2]


class Pipeline:
    """An isolated tracer and meter provider, read back in memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.telemetry = ReflowTelemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metrics(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Instrument name -> [(attributes, value or histogram count)]."""
        data = self.reader.get_metrics_data()
        found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = (point.count, point.sum)  # type: ignore[attr-defined]
                        found.setdefault(metric.name, []).append((dict(point.attributes), value))
        return found


def _trip(failures: dict[str, int]) -> Workflow[Any]:
    """A step retried once in place, a one-hour sleep, then a step that fails for good."""
    wf: Workflow[Any] = Workflow("trip")

    @wf.step(retry=RetryPolicy(max_attempts=2, backoff="fixed", initial_delay=0))
    def book(ctx: StepContext[Any]) -> str:
        failures["book"] = failures.get("book", 0) + 1
        if failures["book"] == 1:
            raise ConnectionError("booking service unavailable")
        return "booked"

    wf.sleep("nap", "1h")

    @wf.step
    def pay(ctx: StepContext[Any]) -> None:
        raise ValueError("card declined")

    return wf


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_span_tree_of_a_run_with_a_retry_a_sleep_and_a_failure(
    storage_factory: Any, clock: FakeClock
) -> None:
    pipe = Pipeline()
    wf = _trip({})

    async def scenario() -> str:
        hooks = [pipe.telemetry]
        async with open_engine(storage_factory, [wf], clock, hooks=hooks) as engine:
            run_ = await engine.enqueue(wf)
            assert await engine.run_until_idle() == 1  # book (retried), then nap sleeps
            clock.advance(3600)
            assert await engine.run_until_idle() == 1  # nap ends, pay fails
            view = await engine.get_run(run_.id)
            assert view is not None and view.run.status is RunStatus.FAILED
            return run_.id

    run_id = run(scenario())
    spans = pipe.finished()
    runs = sorted(
        (s for s in spans if s.name == "run trip"), key=lambda s: _attrs(s)["reflow.run.attempt"]
    )
    assert len(runs) == 2, [s.name for s in spans]
    first, second = runs
    for span, attempt in ((first, 1), (second, 2)):
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is None
        assert _attrs(span)["reflow.run.id"] == run_id
        assert _attrs(span)["reflow.workflow"] == "trip"
        assert _attrs(span)["reflow.run.attempt"] == attempt

    def children(parent: ReadableSpan) -> list[tuple[str, str, int | None]]:
        kids = [
            s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
        ]
        kids.sort(key=lambda s: s.start_time or 0)
        for kid in kids:
            assert kid.context.trace_id == parent.context.trace_id
            assert _attrs(kid)["reflow.run.id"] == run_id
        return [
            (s.name, _attrs(s)["reflow.outcome"], _attrs(s).get("reflow.step.attempts"))
            for s in kids
        ]

    # Attempt 1: book retried once then completed; the run stopped inside the sleep.
    assert children(first) == [("step book", "completed", 2), ("step nap", "suspended", None)]
    assert _attrs(first)["reflow.outcome"] == "suspended"
    assert first.status.status_code is StatusCode.UNSET
    suspended = [e for e in first.events if e.name == "reflow.suspended"]
    assert len(suspended) == 1
    assert dict(suspended[0].attributes or {})["reflow.suspend.reason"] == "sleep"
    book = next(s for s in spans if s.name == "step book")
    retries = [e for e in book.events if e.name == "reflow.retry"]
    assert len(retries) == 1
    retry = dict(retries[0].attributes or {})
    assert retry["reflow.step.attempt"] == 1
    assert retry["exception.type"] == "ConnectionError"
    assert retry["reflow.retry.durable"] is False

    # Attempt 2: the sleep ends, pay fails, and so does the run, both with the error.
    assert children(second) == [("step nap", "completed", 0), ("step pay", "failed", 1)]
    assert _attrs(second)["reflow.outcome"] == "failed"
    pay = next(s for s in spans if s.name == "step pay")
    for failed in (pay, second):
        assert failed.status.status_code is StatusCode.ERROR
        assert "card declined" in (failed.status.description or "")
        (exc,) = [e for e in failed.events if e.name == "exception"]
        details = dict(exc.attributes or {})
        assert details["exception.type"] == "ValueError"
        assert details["exception.message"] == "card declined"
        assert "Traceback" in str(details["exception.stacktrace"])
    assert all(s.end_time is not None for s in spans)

    metrics = pipe.metrics()
    trip = {"reflow.workflow": "trip"}
    assert metrics["reflow.runs.started"] == [(trip, 1)]  # first claims only
    assert metrics["reflow.runs.failed"] == [(trip, 1)]
    assert "reflow.runs.completed" not in metrics
    (latency,) = metrics["reflow.run.claim_latency"]
    assert latency == (trip, (1, 0.0))  # one first claim, at the enqueue's (fake) instant
    durations = {
        a["reflow.step"]: (a["reflow.outcome"], v) for a, v in metrics["reflow.step.duration"]
    }
    assert {k: (o, n) for k, (o, (n, _)) in durations.items()} == {
        "book": ("completed", 1),
        "nap": ("completed", 1),
        "pay": ("failed", 1),
    }
    assert durations["nap"][1][1] == 3600.0  # how long the sleep lasted


def test_completed_runs_are_counted_and_a_clean_run_has_no_error(storage_factory: Any) -> None:
    pipe = Pipeline()
    wf: Workflow[Any] = Workflow("quick")

    @wf.step
    def only(ctx: StepContext[Any]) -> int:
        return 1

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], hooks=[pipe.telemetry]) as engine:
            for _ in range(3):
                await engine.enqueue(wf)
            assert await engine.run_until_idle() == 3

    run(scenario())
    spans = pipe.finished()
    assert sorted(s.name for s in spans) == ["run quick"] * 3 + ["step only"] * 3
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)
    assert all(_attrs(s)["reflow.outcome"] == "completed" for s in spans)
    metrics = pipe.metrics()
    assert metrics["reflow.runs.started"] == [({"reflow.workflow": "quick"}, 3)]
    assert metrics["reflow.runs.completed"] == [({"reflow.workflow": "quick"}, 3)]


_THROUGH_THE_ENTRY_POINT = textwrap.dedent(
    """
    import asyncio, json
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from reflow_core import Engine, StepContext, Workflow

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # configured as an application would, globally

    wf = Workflow("global")

    @wf.step
    def only(ctx: StepContext) -> int:
        return 1

    async def main() -> None:
        async with Engine("memory://", [wf]) as engine:  # plugins on: the default
            run = await engine.enqueue(wf)
            await engine.wait_for(run.id, within=30)

    asyncio.run(main())
    print(json.dumps(sorted(s.name for s in exporter.get_finished_spans())))
    """
)


def test_the_entry_point_plugin_reports_to_the_global_providers() -> None:
    """Installing the extra is enough: the `reflow` entry point registers the plugin."""
    from importlib.metadata import entry_points

    (point,) = [e for e in entry_points(group="reflow") if e.name == "otel"]
    assert isinstance(point.load(), ReflowTelemetry)
    result = subprocess.run(
        [sys.executable, "-c", _THROUGH_THE_ENTRY_POINT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "OTEL_SDK_DISABLED"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["run global", "step only"]


_WITHOUT_OPENTELEMETRY = textwrap.dedent(
    """
    import json, sys
    sys.modules["opentelemetry"] = None  # as if the extra were not installed
    import reflow_otel.plugin as plugin
    hooks = [n for n in dir(plugin.plugin) if n.startswith("reflow_")]
    try:
        from reflow_otel import ReflowTelemetry
    except ImportError as exc:
        error = str(exc)
    print(json.dumps({"hooks": hooks, "plugin": repr(plugin.plugin), "error": error}))
    """
)


def test_without_the_extra_the_plugin_is_inert_and_says_what_to_install() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENTELEMETRY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hooks"] == []
    assert "pip install 'reflow[otel]'" in report["plugin"]
    assert "pip install 'reflow[otel]'" in report["error"]


def test_otel_sdk_disabled_turns_the_plugin_off() -> None:
    code = "import reflow_otel.plugin as p; print(repr(p.plugin))"
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "OTEL_SDK_DISABLED" in result.stdout


def test_without_a_recording_tracer_nothing_is_kept(storage_factory: Any) -> None:
    """No SDK (the API's no-op tracer): runs still count, and no span is kept open."""
    from opentelemetry.trace import NoOpTracerProvider

    reader = InMemoryMetricReader()
    quiet = ReflowTelemetry(
        tracer_provider=NoOpTracerProvider(),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    recording = Pipeline().telemetry
    kept: list[bool] = []
    wf: Workflow[Any] = Workflow("peek")

    @wf.step
    def peek(ctx: StepContext[Any]) -> None:
        kept.append(ctx.run_id in quiet._open)
        kept.append(ctx.run_id in recording._open)

    async def scenario() -> None:
        hooks = [quiet, recording]
        async with open_engine(storage_factory, [wf], hooks=hooks) as engine:
            await engine.enqueue(wf)
            assert await engine.run_until_idle() == 1

    run(scenario())
    assert kept == [False, True]  # only the recording instance keeps the attempt open
    assert quiet._open == {} and recording._open == {}
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    assert {"reflow.runs.started", "reflow.runs.completed"} <= names
