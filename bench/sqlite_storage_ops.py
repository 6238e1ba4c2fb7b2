"""Storage-level throughput of the SQLite adapters: five-step runs per second.

Each of ``--concurrency`` coroutines loops over the storage calls one engine run makes
(create, claim, five lease-checked step saves, complete: eight writes), against a fresh
file in a temporary directory, and the script prints runs/s, writes/s and how group
commit batched the writes. It measures the adapter alone; the engine adds its own cost.

    python bench/sqlite_storage_ops.py --adapter sqlite --runs 5000 --concurrency 25
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from reflow_adapters.sqlite_common import SQLiteStorageBase
from reflow_core import RunStatus, StepResult, StepStatus, WorkflowRun


def _storage(adapter: str, path: Path, synchronous: str) -> SQLiteStorageBase:
    if adapter == "apsw":
        from reflow_adapters.apsw import APSWStorage

        return APSWStorage(path, synchronous=synchronous)
    from reflow_adapters.sqlite import SQLiteStorage

    return SQLiteStorage(path, synchronous=synchronous)


async def _one_run(storage: SQLiteStorageBase, index: int) -> None:
    now = time.time_ns() // 1_000_000
    run_id = str(uuid.uuid4())
    run = WorkflowRun(
        id=run_id,
        workflow="bench",
        input={"n": index, "tags": ["a", "b"]},
        status=RunStatus.PENDING,
        created_at=now,
        updated_at=now,
    )
    await storage.create_run(run)
    claimed = await storage.claim_next_run(["bench"], lease_ms=30_000)
    assert claimed is not None, "every coroutine creates the run it claims"
    for step in range(5):
        result = StepResult(
            id=f"{claimed.run.id}:step-{step}",
            run_id=claimed.run.id,
            name=f"step-{step}",
            status=StepStatus.COMPLETED,
            output={"step": step, "value": index * step},
            attempts=1,
            created_at=now,
            updated_at=now,
        )
        saved = await storage.save_step_result(result, claimed.lease_id)
        assert saved, "the lease is held"
    done = await storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output={"ok": True}
    )
    assert done


async def _bench(adapter: str, runs: int, concurrency: int, synchronous: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        storage = _storage(adapter, Path(directory) / "bench.db", synchronous)
        await storage.initialize()
        counter = iter(range(runs))

        async def worker() -> None:
            for index in counter:
                await _one_run(storage, index)

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        stats = storage.group_commit_stats()
        await storage.close()
    writes = stats["writes"]
    print(
        f"{adapter} synchronous={synchronous} concurrency={concurrency}: "
        f"{runs / elapsed:,.0f} runs/s, {writes / elapsed:,.0f} writes/s "
        f"({runs} runs in {elapsed:.2f}s; {stats['batches']} commits, "
        f"mean batch {writes / max(stats['batches'], 1):.1f}, largest {stats['largest_batch']}; "
        f"{cpu / elapsed:.0%} of one core busy: compare runs/s on a loaded machine with care)"
    )


def main() -> None:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", choices=["sqlite", "apsw"], default="sqlite")
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=25)
    parser.add_argument("--synchronous", default="FULL")
    args = parser.parse_args()
    asyncio.run(_bench(args.adapter, args.runs, args.concurrency, args.synchronous))


if __name__ == "__main__":
    main()
