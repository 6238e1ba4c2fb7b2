"""``reflow runs explain``: one test per situation, each on a real store (SQLite and
PostgreSQL) brought into that situation through the storage contract, read back through
the command (text and ``--json``). Times are the store's own clock."""

from __future__ import annotations

import re
from typing import Any

from cli_stores import invoke, invoke_json, new_run, with_store

from reflow_core.storage import StorageAdapter
from reflow_core.types import ErrorInfo, LeaseHolder, RunStatus, StepResult, StepStatus

MINUTE_MS = 60_000


def explained(url: str, run_id: str) -> dict[str, Any]:
    """The ``--json`` explanation; the text form must say the same sentences."""
    data: dict[str, Any] = invoke_json("runs", "explain", run_id, "--storage", url)
    text = invoke("runs", "explain", run_id, "--storage", url)
    assert text.exit_code == 0

    def words(sentence: str) -> str:
        # Ages move on between the two invocations; the wording must not.
        flat = re.sub(r"\d+ (ms|s|min|h|d)\b", "AGE", " ".join(sentence.split()))
        return re.sub(r"\d+", "N", flat)

    for sentence in (data["state"], *data["details"], data["action"]):
        assert words(sentence) in words(text.output)
    return data


async def _claim(storage: StorageAdapter, workflow: str, **kw: Any) -> Any:
    claimed = await storage.claim_next_run([workflow], lease_ms=kw.pop("lease_ms", 60_000), **kw)
    assert claimed is not None
    return claimed


def test_completed(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        claimed = await _claim(storage, "orders")
        await storage.update_claimed_run_status(run.id, claimed.lease_id, RunStatus.COMPLETED)
        return run.id

    data = explained(store_url, with_store(store_url, prepare))
    assert data["situation"] == "completed"
    assert "completed at" in data["state"] and "Nothing to do" in data["action"]


def test_cancelled(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        assert await storage.update_run_status(run.id, RunStatus.CANCELLED)
        return run.id

    run_id = with_store(store_url, prepare)
    data = explained(store_url, run_id)
    assert data["situation"] == "cancelled" and "was cancelled at" in data["state"]
    assert f"reflow runs resume {run_id}" in data["action"]


def test_failed_names_the_step_and_the_recoveries(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        first = await _claim(storage, "orders", lease_ms=1)
        while await storage.now() <= first.run.lease_expires_at:
            pass  # a crashed holder: its 1 ms lease runs out on the store's clock
        claimed = await _claim(storage, "orders")
        assert claimed.run.recoveries == 1
        now = await storage.now()
        error = ErrorInfo(type="CardDeclined", message="card declined", step="charge")
        await storage.save_step_result(
            StepResult(
                id=f"{run.id}/charge", run_id=run.id, name="charge", status=StepStatus.FAILED,
                error=error, attempts=3, created_at=now, updated_at=now,
            ),
            claimed.lease_id,
        )  # fmt: skip
        await storage.update_claimed_run_status(
            run.id, claimed.lease_id, RunStatus.FAILED, error=error
        )
        return run.id

    data = explained(store_url, with_store(store_url, prepare))
    assert data["situation"] == "failed"
    assert "failed at step 'charge' after 1 recovery and 2 claim(s)" in data["state"]
    assert "CardDeclined: card declined" in data["state"]
    assert "reflow runs resume" in data["action"] and "reflow runs retry" in data["action"]


def test_pending_behind_older_runs(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        for age in (3, 2):
            await new_run(storage, age_ms=age * MINUTE_MS)
        await new_run(storage, "other", age_ms=5 * MINUTE_MS)  # another workflow: not ahead
        return (await new_run(storage, age_ms=MINUTE_MS)).id

    data = explained(store_url, with_store(store_url, prepare))
    assert data["situation"] == "pending-queued"
    assert "behind 2 older pending run(s) of workflow 'orders'" in data["state"]


def test_pending_first_in_line_just_enqueued(store_url: str) -> None:
    run_id = with_store(store_url, lambda s: _id(new_run(s)))
    data = explained(store_url, run_id)
    assert data["situation"] == "pending-next" and "first in line" in data["state"]
    assert "nothing to do yet" in data["action"]


def test_pending_unclaimed_asks_whether_a_worker_runs(store_url: str) -> None:
    run_id = with_store(store_url, lambda s: _id(new_run(s, age_ms=5 * MINUTE_MS)))
    data = explained(store_url, run_id)
    assert data["situation"] == "pending-unclaimed"
    assert "no worker has claimed it since" in data["state"] and "(5 min ago)" in data["state"]
    assert "Is a worker running with workflow 'orders' registered?" in data["action"]


def test_running_names_the_holder_and_its_heartbeat_age(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        holder = LeaseHolder(worker="w-1", host="db-box", pid=321)
        await _claim(storage, "orders", holder=holder)
        return run.id

    data = explained(store_url, with_store(store_url, prepare))
    assert data["situation"] == "running"
    assert "held by worker w-1 on host db-box (pid 321), last heartbeat" in data["state"]
    assert " ago, lease valid for " in data["state"]


def test_lease_expired_and_nobody_took_it_over(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        claimed = await _claim(storage, "orders", lease_ms=1)
        while await storage.now() <= claimed.run.lease_expires_at:
            pass
        return run.id

    data = explained(store_url, with_store(store_url, prepare))
    assert data["situation"] == "lease-expired"
    assert "its lease expired" in data["state"]
    assert "no worker for workflow 'orders' has claimed it since" in data["state"]
    assert "Is a worker running with workflow 'orders' registered?" in data["action"]


def test_sleeping_until_a_time(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        claimed = await _claim(storage, "orders")
        wake = await storage.now() + 90 * MINUTE_MS
        assert await storage.sleep_run(run.id, claimed.lease_id, wake)
        return run.id

    data = explained(store_url, with_store(store_url, prepare))
    assert data["situation"] == "sleeping"
    assert "is sleeping until" in data["state"] and "(in 1 h 29 min)" in data["state"]


def test_sleep_overdue(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        claimed = await _claim(storage, "orders")
        assert await storage.sleep_run(run.id, claimed.lease_id, await storage.now() - MINUTE_MS)
        return run.id

    data = explained(store_url, with_store(store_url, prepare))
    assert data["situation"] == "sleep-overdue" and "was due to wake at" in data["state"]
    assert "registered?" in data["action"]


def test_waiting_for_an_event_with_none_buffered(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        claimed = await _claim(storage, "orders")
        deadline = await storage.now() + 2 * 60 * MINUTE_MS
        assert await storage.wait_run(run.id, claimed.lease_id, "approved", deadline)
        return run.id

    run_id = with_store(store_url, prepare)
    data = explained(store_url, run_id)
    assert data["situation"] == "waiting"
    assert "is waiting for event 'approved' since" in data["state"]
    assert "with none buffered" in data["state"]
    assert data["details"][0].startswith("It gives up at")
    assert f"reflow events send {run_id} approved" in data["action"]


def test_wait_overdue(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> str:
        run = await new_run(storage)
        claimed = await _claim(storage, "orders")
        past = await storage.now() - MINUTE_MS
        assert await storage.wait_run(run.id, claimed.lease_id, "approved", past)
        return run.id

    data = explained(store_url, with_store(store_url, prepare))
    assert data["situation"] == "wait-overdue"
    assert "waited for event 'approved' until its deadline" in data["state"]


def test_missing_run_is_not_found(store_url: str) -> None:
    with_store(store_url, lambda s: s.now())
    missing = invoke("runs", "explain", "nope", "--storage", store_url)
    assert missing.exit_code == 1 and "no run with id 'nope'" in missing.output


async def _id(run: Any) -> str:
    return str((await run).id)


def test_ages_read_like_a_person_would_say_them() -> None:
    from reflow_cli.text import age

    cases = {
        -5: "0 ms", 450: "450 ms", 3_400: "3 s", 119_999: "119 s", 120_000: "2 min",
        59 * MINUTE_MS: "59 min", 60 * MINUTE_MS: "1 h", 125 * MINUTE_MS: "2 h 5 min",
        48 * 60 * MINUTE_MS: "2 d", (76 * 60 + 3) * MINUTE_MS: "3 d 4 h",
    }  # fmt: skip
    assert {ms: age(ms) for ms in cases} == cases
