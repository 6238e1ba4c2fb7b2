"""Engine events to OpenTelemetry spans and metrics.

Spans (tracer ``reflow``):

* ``run <workflow>`` (kind CONSUMER), one per run *attempt* (claim): from the claim to
  the attempt's end. Attributes ``reflow.workflow``, ``reflow.run.id``,
  ``reflow.run.attempt``, ``reflow.run.recoveries`` and, at the end, ``reflow.outcome``:
  ``completed``, ``failed``, ``suspended``, ``cancelled``, ``lease_lost`` or
  ``interrupted``. Status ERROR, with the error recorded as an ``exception`` event, when
  the run failed, lost its lease or was interrupted by an error. Events
  ``reflow.suspended`` (reason, step, wake time, awaited event), ``reflow.cancelled`` and
  ``reflow.lease_lost`` (reason).
* ``step <step>`` (INTERNAL), child of its run attempt's span, one per step (sleep, wait,
  parallel branch) per attempt it executes in: attributes ``reflow.workflow``,
  ``reflow.run.id``, ``reflow.step``, ``reflow.step.attempt`` (the first attempt in
  this claim), ``reflow.step.attempts`` and ``reflow.outcome`` (``completed``,
  ``skipped``, ``failed``, or the run's outcome when the run stopped during the step, e.g.
  ``suspended`` for a sleep). A ``reflow.retry`` event per failed attempt that will be
  retried (attempt, delay, error). A failed step has status ERROR and an ``exception``
  event.

Metrics (meter ``reflow``), each with the ``reflow.workflow`` attribute:

* ``reflow.runs.started``, ``reflow.runs.completed``, ``reflow.runs.failed`` (counters;
  started counts first claims, so started minus completed and failed is what is in flight
  or suspended);
* ``reflow.step.duration`` (histogram, seconds; with ``reflow.step`` and
  ``reflow.outcome``): how long each step took in the claim that finished it;
* ``reflow.run.claim_latency`` (histogram, seconds): from enqueue to first claim, how
  long work waits for a worker.

Hooks run on the engine's event loop; the bookkeeping is guarded by a lock because one
instance (the plugin's) serves every engine of the process, on whatever thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

try:
    from opentelemetry import metrics, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "reflow_otel needs OpenTelemetry: pip install 'reflow[otel]' "
        f"(it could not import it: {exc})"
    ) from exc

from reflow_core import __version__
from reflow_core.events import (
    LeaseLost,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunInterrupted,
    RunStarted,
    RunSuspended,
    StepCompleted,
    StepFailed,
    StepSkipped,
    StepStarted,
)
from reflow_core.hookspecs import hookimpl
from reflow_core.types import ErrorInfo

__all__ = ["ReflowTelemetry"]

Attributes = dict[str, str | int | float | bool]


@dataclass(slots=True)
class _Attempt:
    """The open spans of one run attempt."""

    span: trace.Span
    attempt: int
    steps: dict[str, trace.Span] = field(default_factory=dict)


def _record_error(span: trace.Span, error: ErrorInfo) -> None:
    """Mark ``span`` failed with ``error`` as an ``exception`` event (the semantic
    conventions' attributes; the exception object itself is gone, only its record is)."""
    attributes: Attributes = {
        "exception.type": error.type,
        "exception.message": error.message,
    }
    if error.traceback:
        attributes["exception.stacktrace"] = error.traceback
    if error.code:
        attributes["reflow.error.code"] = error.code
    span.add_event("exception", attributes)
    span.set_status(Status(StatusCode.ERROR, f"{error.type}: {error.message}"))


class ReflowTelemetry:
    """Reports engine events as OpenTelemetry spans and metrics.

    Pass it in ``Engine(hooks=[...])``, or rely on the plugin instance the ``reflow``
    entry point registers (global providers). ``tracer_provider`` and
    ``meter_provider`` default to the global ones, looked up when used, so providers
    configured after this is built still receive everything.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("reflow", __version__, tracer_provider)
        meter = metrics.get_meter("reflow", __version__, meter_provider)
        self._started = meter.create_counter(
            "reflow.runs.started", unit="{run}", description="Runs claimed for the first time"
        )
        self._completed = meter.create_counter(
            "reflow.runs.completed", unit="{run}", description="Runs that completed"
        )
        self._failed = meter.create_counter(
            "reflow.runs.failed", unit="{run}", description="Runs that failed"
        )
        self._step_duration = meter.create_histogram(
            "reflow.step.duration",
            unit="s",
            description="How long a step took in the claim that finished it",
        )
        self._claim_latency = meter.create_histogram(
            "reflow.run.claim_latency",
            unit="s",
            description="Time from enqueueing a run to its first claim",
        )
        self._open: dict[str, _Attempt] = {}
        self._lock = threading.Lock()

    # -- runs -----------------------------------------------------------------

    @hookimpl
    def reflow_run_started(self, event: RunStarted) -> None:
        """Open the attempt's span."""
        span = self._tracer.start_span(
            f"run {event.workflow}",
            kind=SpanKind.CONSUMER,
            attributes={
                "reflow.workflow": event.workflow,
                "reflow.run.id": event.run_id,
                "reflow.run.attempt": event.attempt,
                "reflow.run.recoveries": event.recoveries,
            },
        )
        with self._lock:
            # A run this process still had open was taken over by another execution
            # here (its lease was lost meanwhile): that attempt is over.
            stale = self._open.pop(event.run_id, None)
            # A span that records nothing (no SDK configured, or not sampled) is not
            # kept: the run's other hooks then return at once.
            if span.is_recording():
                self._open[event.run_id] = _Attempt(span, event.attempt)
        if stale is not None:
            self._finish(stale, "superseded")
        workflow = {"reflow.workflow": event.workflow}
        if event.attempt == 1:
            self._started.add(1, workflow)
        if event.claim_latency is not None:
            self._claim_latency.record(event.claim_latency, workflow)

    @hookimpl
    def reflow_run_completed(self, event: RunCompleted) -> None:
        """Close the attempt: completed."""
        self._end(event.run_id, event.attempt, "completed")
        self._completed.add(1, {"reflow.workflow": event.workflow})

    @hookimpl
    def reflow_run_failed(self, event: RunFailed) -> None:
        """Close the attempt: failed, with the run's error."""
        self._end(event.run_id, event.attempt, "failed", error=event.error)
        self._failed.add(1, {"reflow.workflow": event.workflow})

    @hookimpl
    def reflow_run_suspended(self, event: RunSuspended) -> None:
        """Close the attempt: suspended (sleep, wait or durable retry)."""
        details: Attributes = {"reflow.suspend.reason": event.reason, "reflow.step": event.step}
        if event.wake_at is not None:
            details["reflow.wake_at"] = event.wake_at
        if event.event is not None:
            details["reflow.event"] = event.event
        self._end(event.run_id, event.attempt, "suspended", event=("reflow.suspended", details))

    @hookimpl
    def reflow_run_cancelled(self, event: RunCancelled) -> None:
        """Close the attempt if it was executing here: cancelled."""
        if event.executing and event.attempt is not None:
            self._end(event.run_id, event.attempt, "cancelled", event=("reflow.cancelled", {}))

    @hookimpl
    def reflow_lease_lost(self, event: LeaseLost) -> None:
        """Close the attempt: its lease was lost (status ERROR: the attempt was aborted)."""
        self._end(
            event.run_id,
            event.attempt,
            "lease_lost",
            event=("reflow.lease_lost", {"reflow.reason": event.reason}),
            status=Status(StatusCode.ERROR, f"lease lost: {event.reason}"),
        )

    @hookimpl
    def reflow_run_interrupted(self, event: RunInterrupted) -> None:
        """Close the attempt: interrupted (engine stopping, or an error outside steps)."""
        self._end(
            event.run_id,
            event.attempt,
            "interrupted",
            event=("reflow.interrupted", {"reflow.reason": event.reason}),
            error=event.error,
        )

    # -- steps ----------------------------------------------------------------

    @hookimpl
    def reflow_step_started(self, event: StepStarted) -> None:
        """Open the step's span under its run attempt's."""
        with self._lock:
            opened = event.run_id in self._open
        if not opened:
            return  # its run's claim began before this instance listened
        span = self._step_span(event.run_id, event.workflow, event.step, event.attempt)
        with self._lock:
            current = self._open.get(event.run_id)
            if current is not None:
                current.steps[event.step] = span
                return
        span.end()  # the attempt ended meanwhile (on another thread)

    @hookimpl
    def reflow_step_completed(self, event: StepCompleted) -> None:
        """Close the step's span: completed."""
        span = self._take_step(event.run_id, event.workflow, event.step)
        if span is not None:
            span.set_attribute("reflow.step.attempts", event.attempts)
            span.set_attribute("reflow.outcome", "completed")
            span.end()
        self._step_time(event.workflow, event.step, "completed", event.duration)

    @hookimpl
    def reflow_step_skipped(self, event: StepSkipped) -> None:
        """A skipped step gets a span of its own, for the record."""
        with self._lock:
            opened = event.run_id in self._open
        if opened:
            span = self._step_span(event.run_id, event.workflow, event.step, None)
            span.set_attribute("reflow.outcome", "skipped")
            span.end()

    @hookimpl
    def reflow_step_failed(self, event: StepFailed) -> None:
        """Close the step's span: failed, with its error."""
        span = self._take_step(event.run_id, event.workflow, event.step)
        if span is not None:
            span.set_attribute("reflow.step.attempts", event.attempts)
            span.set_attribute("reflow.outcome", "failed")
            _record_error(span, event.error)
            span.end()
        self._step_time(event.workflow, event.step, "failed", event.duration)

    @hookimpl
    def reflow_retry_scheduled(self, event: RetryScheduled) -> None:
        """A ``reflow.retry`` event on the step's span."""
        details: Attributes = {
            "reflow.step.attempt": event.attempt,
            "reflow.retry.delay": event.delay,
            "reflow.retry.durable": event.durable,
            "exception.type": event.error.type,
            "exception.message": event.error.message,
        }
        if event.retry_at is not None:
            details["reflow.retry.at"] = event.retry_at
        with self._lock:
            current = self._open.get(event.run_id)
            span = None if current is None else current.steps.get(event.step, current.span)
        if span is not None:
            span.add_event("reflow.retry", details)

    # -- bookkeeping ----------------------------------------------------------

    def _step_span(self, run_id: str, workflow: str, step: str, attempt: int | None) -> trace.Span:
        with self._lock:
            current = self._open.get(run_id)
        parent = None if current is None else trace.set_span_in_context(current.span)
        attributes: Attributes = {
            "reflow.workflow": workflow,
            "reflow.run.id": run_id,
            "reflow.step": step,
        }
        if attempt is not None:
            attributes["reflow.step.attempt"] = attempt
        return self._tracer.start_span(f"step {step}", context=parent, attributes=attributes)

    def _take_step(self, run_id: str, workflow: str, step: str) -> trace.Span | None:
        """The step's open span, or a new one (a sleep or wait resumed in a later claim
        ends without having started in it); ``None`` if its run's attempt is not open."""
        with self._lock:
            current = self._open.get(run_id)
            if current is None:
                return None
            span = current.steps.pop(step, None)
        return span or self._step_span(run_id, workflow, step, None)

    def _step_time(self, workflow: str, step: str, outcome: str, seconds: float | None) -> None:
        if seconds is not None:
            self._step_duration.record(
                seconds,
                {"reflow.workflow": workflow, "reflow.step": step, "reflow.outcome": outcome},
            )

    def _end(
        self,
        run_id: str,
        attempt: int,
        outcome: str,
        *,
        event: tuple[str, Mapping[str, str | int | float | bool]] | None = None,
        error: ErrorInfo | None = None,
        status: Status | None = None,
    ) -> None:
        with self._lock:
            current = self._open.get(run_id)
            if current is None or current.attempt != attempt:
                return  # not opened here, or a later attempt has taken over
            del self._open[run_id]
        if event is not None:
            current.span.add_event(event[0], event[1])
        if error is not None:
            _record_error(current.span, error)
        elif status is not None:
            current.span.set_status(status)
        self._finish(current, outcome)

    @staticmethod
    def _finish(current: _Attempt, outcome: str) -> None:
        for span in current.steps.values():  # steps the run stopped in (a sleep, say)
            span.set_attribute("reflow.outcome", outcome)
            span.end()
        current.span.set_attribute("reflow.outcome", outcome)
        current.span.end()
