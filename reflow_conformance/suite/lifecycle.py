"""Lifecycle: initialize is idempotent, close is safe twice, durable stores survive reopening."""

from __future__ import annotations

import asyncio

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, HarnessError, expect
from reflow_core.registry import Capability
from reflow_core.storage import StorageAdapter, WorkNotifier
from reflow_core.types import RunFilter, RunStatus


@case("lifecycle.implements_protocol")
async def implements_protocol(h: Harness) -> None:
    """The adapter has every method of StorageAdapter, and a url attribute."""
    expect(isinstance(h.storage, StorageAdapter), True, "isinstance(adapter, StorageAdapter)")


@case("lifecycle.initialize_idempotent")
async def initialize_idempotent(h: Harness) -> None:
    """initialize() again on a store with data keeps the data."""
    run = await h.create("wf", {"kept": True})
    await h.storage.initialize()
    await h.storage.initialize()
    expect((await h.get(run.id)).input, {"kept": True}, "run after re-initialize")


@case("lifecycle.close_twice")
async def close_twice(h: Harness) -> None:
    """close() may be called twice."""
    storage = await h.fresh_storage()
    await storage.close()
    await storage.close()


@case("lifecycle.reopen_keeps_state", requires=[Capability.DURABLE])
async def reopen_keeps_state(h: Harness) -> None:
    """Closing and opening the same url again finds runs, steps, events and schedules."""
    url = h.url
    claimed = await h.created_and_claimed("wf", {"n": 1})
    run_id = claimed.run.id
    await h.storage.save_step_result(h.step(run_id, "s", output=[1, 2]), claimed.lease_id)
    await h.storage.deliver_event(run_id, "ev", "payload")
    await h.storage.upsert_schedule(h.schedule("k", input="i"))
    before = await h.snapshot([run_id])
    await h.storage.close()
    reopened = h.open_url(url)
    try:
        await reopened.initialize()
        runs = [await reopened.get_run(run_id)]
        steps = [await reopened.get_step_results(run_id)]
        listed = await reopened.list_runs(RunFilter(limit=10_000))
        after = (runs, steps, listed, await reopened.list_schedules())
        expect(after, before, "state after reopening")
        heartbeat = await reopened.heartbeat_run(run_id, claimed.lease_id)
        expect(heartbeat, True, "the lease survives reopening")
        record = await reopened.take_event(run_id, "ev")
        expect(record.payload if record else None, "payload", "buffered event")
    finally:
        await reopened.close()


@case("lifecycle.second_handle_sees_writes", requires=[Capability.THREADS])
async def second_handle_sees_writes(h: Harness) -> None:
    """A handle opened from url sees what the first wrote, and the reverse."""
    other = await h.open_another()
    run = await h.create("wf", "x")
    seen = await other.get_run(run.id)
    expect(seen.input if seen else None, "x", "run seen through the second handle")
    claimed = await h.claim_any(["wf"], storage=other)
    expect(claimed is not None, True, "claim through the second handle")
    expect((await h.get(run.id)).status, RunStatus.RUNNING, "status seen by the first handle")


@case("lifecycle.concurrent_initialize", requires=[Capability.THREADS])
async def concurrent_initialize(h: Harness) -> None:
    """initialize() from several handles at once succeeds (workers starting together)."""

    async def init(storage: StorageAdapter, _: int) -> None:
        await storage.initialize()
        await storage.list_runs(RunFilter(limit=1))

    await h.race_threads(4, init)


@case("lifecycle.notifies_new_work", requires=[Capability.NOTIFY])
async def notifies_new_work(h: Harness) -> None:
    """An adapter declaring 'notify' calls on_work when a run is created."""
    if not isinstance(h.storage, WorkNotifier):
        raise AssertionError("declares 'notify' but has no listen_for_work method")
    listener = await h.open_another() if h.has(Capability.THREADS) else h.storage
    notified = asyncio.Event()
    task = asyncio.create_task(listener.listen_for_work(notified.set))  # type: ignore[attr-defined]
    try:
        # The listener subscribes asynchronously; keep creating runs until it hears one.
        for _ in range(100):
            await h.create()
            try:
                await asyncio.wait_for(notified.wait(), 0.1)
                return
            except TimeoutError:
                continue
        raise AssertionError("listen_for_work never called on_work after 100 create_run calls")
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            raise HarnessError(f"listen_for_work raised on cancel: {exc!r}") from exc
