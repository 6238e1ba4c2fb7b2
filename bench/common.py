"""Shared helpers for the benchmarks: the workload, adapters, statistics, the machine.

Every benchmark prints :func:`machine_description` first, so a figure never travels
without the hardware and versions that produced it. Nothing here asserts a timing:
benchmarks report, tests assert behaviour.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reflow_core import StepContext, StorageAdapter, Workflow

__all__ = [
    "DEFAULT_POSTGRES_DSN",
    "Spread",
    "busy_fraction",
    "cpu_ticks",
    "drop_schema",
    "fmt_ms",
    "fmt_rate",
    "fresh_schema",
    "fsync_latency",
    "machine_description",
    "make_storage",
    "make_workflow",
    "percentile",
    "postgres_dsn",
    "postgres_unavailable",
    "print_header",
]

DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"


# -- the workload -------------------------------------------------------------------


def make_workflow(steps: int, name: str | None = None) -> Workflow[Any]:
    """A workflow of ``steps`` trivial async steps, each returning a small dict.

    The steps do no work on purpose: the figure is the engine's and the storage's cost
    per checkpoint, which is what a real step pays on top of its own work.
    """
    workflow: Workflow[Any] = Workflow(name or f"bench_{steps}step")
    for index in range(steps):

        async def step(ctx: StepContext[Any], index: int = index) -> dict[str, Any]:
            return {"step": index, "ok": True}

        workflow.step(step, name=f"s{index}")
    return workflow


# -- adapters -----------------------------------------------------------------------


def postgres_dsn() -> str:
    """The DSN to benchmark against: REFLOW_BENCH_POSTGRES_DSN, REFLOW_TEST_POSTGRES_DSN,
    else a local server with trust auth."""
    return (
        os.environ.get("REFLOW_BENCH_POSTGRES_DSN")
        or os.environ.get("REFLOW_TEST_POSTGRES_DSN")
        or DEFAULT_POSTGRES_DSN
    )


def postgres_unavailable(dsn: str) -> str | None:
    """``None`` if PostgreSQL answers at ``dsn`` and the adapter imports; else the reason."""
    try:
        import psycopg

        import reflow_adapters.postgres  # noqa: F401
    except ImportError as exc:
        return f"the PostgreSQL adapter cannot be imported ({exc})"
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL server at {dsn} ({str(exc).strip()})"
    return None


def fresh_schema() -> str:
    """A schema name no other benchmark run uses."""
    return f"bench_{uuid.uuid4().hex[:12]}"


def drop_schema(dsn: str, schema: str) -> None:
    """Remove a benchmark's schema (best effort)."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    except psycopg.Error as exc:
        print(f"  (could not drop schema {schema}: {exc})")


def make_storage(
    adapter: str, directory: Path | None = None, *, schema: str | None = None
) -> StorageAdapter:
    """A fresh, empty store in the adapter's DEFAULT configuration.

    SQLite and APSW get a new file in ``directory`` (WAL, synchronous=FULL: the
    durability users get); PostgreSQL gets ``schema`` (a fresh one if not given).
    """
    if adapter == "memory":
        from reflow_adapters.memory import MemoryStorage

        return MemoryStorage()
    if adapter in ("sqlite", "apsw"):
        if directory is None:
            raise ValueError(f"{adapter} needs a directory for its file")
        path = directory / f"reflow-bench-{uuid.uuid4().hex[:8]}.db"
        if adapter == "sqlite":
            from reflow_adapters.sqlite import SQLiteStorage

            return SQLiteStorage(path)
        from reflow_adapters.apsw import APSWStorage

        return APSWStorage(path)
    if adapter == "postgres":
        from reflow_adapters.postgres import PostgresStorage

        return PostgresStorage(postgres_dsn(), schema=schema or fresh_schema())
    raise ValueError(f"unknown adapter {adapter!r}; use memory, sqlite, apsw or postgres")


# -- statistics -----------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), nearest-rank on the sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Spread:
    """Best, median and worst of repeated passes of a rate (higher is better)."""

    values: tuple[float, ...]

    @property
    def best(self) -> float:
        return max(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def worst(self) -> float:
        return min(self.values)

    @property
    def spread(self) -> float:
        """1 - worst/best: how much the passes disagree (reflow-ts warns above 25%)."""
        return 1 - self.worst / self.best if self.best else 0.0


def fmt_rate(value: float) -> str:
    """A rate with thousands separators."""
    return f"{value:,.0f}"


def fmt_ms(ns: float) -> str:
    """Nanoseconds as milliseconds with two decimals."""
    return f"{ns / 1e6:.2f}"


# -- the machine ----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat; (0, 0) elsewhere.

    The difference of two readings gives how busy the whole machine was in between,
    including the database server and anything else running.
    """
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return (0, 0)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle, sum(fields))


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of all cores' time spent busy between two :func:`cpu_ticks` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else float("nan")


def _load() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def _filesystem(path: str) -> str:
    """The device and filesystem type holding ``path`` (fsync cost depends on it)."""
    best = ("?", "?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if path.startswith(mount) and len(mount) >= len(best[2]):
                best = (device, fstype, mount)
    except (OSError, ValueError):
        pass
    return f"{path} on {best[0]} ({best[1]})"


def fsync_latency(directory: str | None = None, samples: int = 200) -> str:
    """p50/p99 of a 4 KiB write + fsync in ``directory``: what one durable commit costs."""
    times: list[float] = []
    with tempfile.NamedTemporaryFile(dir=directory) as handle:
        block = b"x" * 4096
        for _ in range(samples):
            start = time.perf_counter_ns()
            handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
            times.append(time.perf_counter_ns() - start)
    p50, p99 = fmt_ms(percentile(times, 50)), fmt_ms(percentile(times, 99))
    return f"write+fsync 4 KiB p50 {p50} ms, p99 {p99} ms"


def _postgres_version(dsn: str) -> str:
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            sync = conn.execute("SHOW synchronous_commit").fetchone()
            fsync = conn.execute("SHOW fsync").fetchone()
        if row is None or sync is None or fsync is None:
            return "unknown"
        return f"{row[0]} (fsync={fsync[0]}, synchronous_commit={sync[0]})"
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def machine_description(*, postgres: bool = False) -> list[str]:
    """Lines describing the hardware and software a figure was measured on."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    lines = [
        f"date        {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"cpu         {_cpu_model()}, {cores} logical cores ({usable} usable), {_memory_gib()} RAM",
        f"os          {platform.system()} {platform.release()}; load average {_load()}",
        f"python      {sys.version.split()[0]} ({platform.python_implementation()})",
        f"sqlite      {sqlite3.sqlite_version} (stdlib sqlite3)",
        f"temp dir    {_filesystem(tempfile.gettempdir())}; {fsync_latency()}",
    ]
    try:
        import apsw

        lines.append(f"apsw        {apsw.apsw_version()} (SQLite {apsw.sqlite_lib_version()})")
    except (ImportError, AttributeError):
        pass
    if postgres:
        lines.append(f"postgresql  {_postgres_version(postgres_dsn())}")
    return lines


def print_header(title: str, *, postgres: bool = False) -> None:
    """The benchmark's title and the machine description."""
    print(title)
    print("=" * len(title))
    for line in machine_description(postgres=postgres):
        print(f"  {line}")
    print()
