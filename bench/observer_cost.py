"""What observing runs costs: CPU per run with no observer, with the OpenTelemetry plugin
and no SDK configured (what an install with the ``otel`` extra and no exporter pays), and
with the SDK recording every span and metric into memory.

Each round executes ``--runs`` pre-enqueued runs of ``--steps`` trivial async steps on the
memory adapter with ``run_until_idle()`` (no storage I/O, so the engine's own cost shows),
once per variant, the variants interleaved in a rotating order; the median of
``--rounds`` rounds is printed as CPU microseconds per run, with wall time.

    python bench/observer_cost.py --runs 2000 --steps 3 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from reflow_adapters.memory import MemoryStorage
from reflow_core import Engine, StepContext, Workflow


def _workflow(steps: int) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("bench")
    for index in range(steps):

        async def step(ctx: StepContext[Any]) -> int:
            return 1

        wf.step(name=f"s{index}")(step)
    return wf


def _no_sdk() -> list[object]:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    from reflow_otel import ReflowTelemetry

    return [
        ReflowTelemetry(tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider())
    ]


def _sdk() -> list[object]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    meter = MeterProvider(metric_readers=[InMemoryMetricReader()])
    from reflow_otel import ReflowTelemetry

    return [ReflowTelemetry(tracer_provider=tracer, meter_provider=meter)]


VARIANTS: dict[str, Callable[[], list[object]]] = {
    "no observer": list,
    "otel, no SDK": _no_sdk,
    "otel + SDK in memory": _sdk,
}


async def _round(runs: int, steps: int, hooks: list[object]) -> tuple[float, float]:
    wf = _workflow(steps)
    engine = Engine(MemoryStorage(), [wf], hooks=hooks, use_plugins=False, concurrency=50)
    for _ in range(runs):
        await engine.enqueue(wf)
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    done = await engine.run_until_idle()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await engine.stop()
    assert done == runs
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    names = list(VARIANTS)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    asyncio.run(_round(200, args.steps, []))  # warm-up: imports, caches
    for index in range(args.rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            c, w = asyncio.run(_round(args.runs, args.steps, VARIANTS[name]()))
            cpu[name].append(c)
            wall[name].append(w)
    base = statistics.median(cpu[names[0]])
    print(f"{args.runs} runs x {args.steps} steps, memory adapter, {args.rounds} rounds (median)")
    for name in names:
        c = statistics.median(cpu[name])
        w = statistics.median(wall[name])
        print(
            f"  {name:22} CPU {c / args.runs * 1e6:8.1f} us/run  wall {w:6.3f}s  "
            f"x{c / base:.2f} CPU"
        )


if __name__ == "__main__":
    main()
