"""The operator's commands end to end on SQLite and PostgreSQL: ``db``, ``runs``,
``events`` and ``schedules``, with ``--json`` output parsed back and exit codes checked
(0 ok, 1 not found or refused, 2 usage or configuration)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import psycopg
import pytest
from cli_stores import invoke, invoke_json, new_run, with_store

from reflow_cli.worker import StartupError, WorkerConfig, start_engine
from reflow_core import open_storage
from reflow_core.storage import StorageAdapter
from reflow_core.types import (
    ErrorInfo,
    LeaseHolder,
    Recurrence,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

HOUR_MS = 3_600_000


def migrate(url: str) -> None:
    assert invoke("db", "migrate", "--storage", url).exit_code == 0


# -- db ---------------------------------------------------------------------------------


def test_db_status_migrate_and_sql(store_url: str) -> None:
    fresh = invoke_json("db", "status", "--storage", store_url)
    assert fresh["exists"] is False and fresh["current"] == 0 and not fresh["up_to_date"]
    latest = fresh["latest"]
    assert [m["version"] for m in fresh["pending"]] == list(range(1, latest + 1))
    assert invoke("db", "status", "--storage", store_url, "--check").exit_code == 1
    refused = invoke("runs", "list", "--storage", store_url)
    assert refused.exit_code == 1
    assert "does not exist" in refused.output and "reflow db migrate" in refused.output

    everything = invoke_json("db", "sql", "--storage", store_url)
    assert everything["from"] == 0 and "CREATE TABLE" in everything["sql"]

    done = invoke_json("db", "migrate", "--storage", store_url)
    assert (done["from"], done["to"]) == (0, latest)
    assert [m["version"] for m in done["applied"]] == list(range(1, latest + 1))
    again = invoke_json("db", "migrate", "--storage", store_url)
    assert again == {"from": latest, "to": latest, "applied": []}
    status = invoke_json("db", "status", "--storage", store_url)
    assert status["up_to_date"] and status["current"] == latest and status["pending"] == []
    assert invoke("db", "status", "--storage", store_url, "--check").exit_code == 0
    assert invoke_json("db", "sql", "--storage", store_url) == {"from": latest, "sql": ""}
    assert invoke_json("runs", "list", "--storage", store_url)["runs"] == []


def test_db_sql_applied_by_hand_gives_a_current_store(store_url: str) -> None:
    """What a DBA would do: review the printed DDL and run it with their own client."""
    script = invoke("db", "sql", "--storage", store_url, "--from", "0")
    assert script.exit_code == 0
    if store_url.startswith("sqlite"):
        path = store_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.executescript(script.stdout)
    else:
        dsn = store_url.split("?")[0]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(script.stdout.encode())
    status = invoke_json("db", "status", "--storage", store_url)
    assert status["up_to_date"], status
    run_id = with_store(store_url, lambda s: _id(new_run(s)))
    assert invoke_json("runs", "show", run_id, "--storage", store_url)["run"]["id"] == run_id


async def _id(run: Any) -> str:
    return str((await run).id)


# -- runs list ----------------------------------------------------------------------------


def test_runs_list_pages_with_a_cursor_and_filters(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> list[WorkflowRun]:
        made = [await new_run(storage, "orders", {"n": n}, age_ms=n * 60_000) for n in range(5)]
        made.append(await new_run(storage, "emails", None, age_ms=3 * HOUR_MS))
        return made

    made = with_store(store_url, prepare)
    newest_first = [r.id for r in sorted(made, key=lambda r: (r.created_at, r.id), reverse=True)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        args = ["runs", "list", "--storage", store_url, "--limit", "2"]
        page = invoke_json(*args, *(["--cursor", cursor] if cursor else []))
        seen += [r["id"] for r in page["runs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first and pages == 3

    text = invoke("runs", "list", "--storage", store_url, "--limit", "2")
    assert "next page: --cursor" in text.output

    emails = invoke_json("runs", "list", "--storage", store_url, "--workflow", "emails")
    assert [r["workflow"] for r in emails["runs"]] == ["emails"]
    recent = invoke_json("runs", "list", "--storage", store_url, "--created-since", "2h")
    assert {r["workflow"] for r in recent["runs"]} == {"orders"} and len(recent["runs"]) == 5
    older = invoke_json("runs", "list", "--storage", store_url, "--created-until", "2h")
    assert [r["workflow"] for r in older["runs"]] == ["emails"]
    since_page = invoke_json(
        "runs", "list", "--storage", store_url, "--created-since", "150s", "--limit", "2"
    )
    assert len(since_page["runs"]) == 2 and since_page["next_cursor"] is not None
    last = invoke_json(
        "runs", "list", "--storage", store_url, "--created-since", "150s", "--limit", "2",
        "--cursor", since_page["next_cursor"],
    )  # fmt: skip
    assert len(last["runs"]) == 1 and last["next_cursor"] is None  # 0, 1, 2 minutes old
    none = invoke_json("runs", "list", "--storage", store_url, "--status", "completed")
    assert none["runs"] == []
    bad = invoke("runs", "list", "--storage", store_url, "--cursor", "nonsense")
    assert bad.exit_code == 2 and "cursor" in bad.output
    bad_time = invoke("runs", "list", "--storage", store_url, "--created-since", "yesterday")
    assert bad_time.exit_code == 2


# -- runs show ------------------------------------------------------------------------------


async def _failed_run(storage: StorageAdapter) -> str:
    run = await new_run(storage, "orders", {"order": 7})
    claimed = await storage.claim_next_run(["orders"], lease_ms=60_000)
    assert claimed is not None
    now = await storage.now()
    error = ErrorInfo(
        type="CardDeclined",
        message="card 4242 declined",
        traceback='Traceback (most recent call last):\n  File "flows.py", line 9\nCardDeclined',
        step="charge",
    )
    await storage.save_step_result(
        StepResult(
            id=f"{run.id}/reserve", run_id=run.id, name="reserve",
            status=StepStatus.COMPLETED, output="ok", attempts=1, created_at=now, updated_at=now,
        ),
        claimed.lease_id,
    )  # fmt: skip
    await storage.save_step_result(
        StepResult(
            id=f"{run.id}/charge", run_id=run.id, name="charge", status=StepStatus.FAILED,
            error=error, attempts=3, created_at=now + 1, updated_at=now + 1,
        ),
        claimed.lease_id,
    )  # fmt: skip
    assert await storage.update_claimed_run_status(
        run.id, claimed.lease_id, RunStatus.FAILED, error=error
    )
    return run.id


def test_runs_show_gives_steps_attempts_and_tracebacks(store_url: str) -> None:
    run_id = with_store(store_url, _failed_run)
    shown = invoke_json("runs", "show", run_id, "--storage", store_url)
    assert shown["run"]["status"] == "failed"
    assert [(s["name"], s["status"], s["attempts"]) for s in shown["steps"]] == [
        ("reserve", "completed", 1),
        ("charge", "failed", 3),
    ]
    assert "CardDeclined" in shown["steps"][1]["error"]["traceback"]
    text = invoke("runs", "show", run_id, "--storage", store_url)
    assert text.exit_code == 0
    assert "traceback of charge" in text.output and 'File "flows.py", line 9' in text.output
    missing = invoke("runs", "show", "no-such-run", "--storage", store_url)
    assert missing.exit_code == 1 and "no run with id 'no-such-run'" in missing.output


def test_runs_show_gives_holder_heartbeat_age_wake_time_and_awaited_event(
    store_url: str,
) -> None:
    async def prepare(storage: StorageAdapter) -> tuple[str, str]:
        held = await new_run(storage, "orders")
        waiting = await new_run(storage, "approvals")
        holder = LeaseHolder(worker="w-7", host="box-3", pid=4242)
        await storage.claim_next_run(["orders"], lease_ms=60_000, holder=holder)
        claimed = await storage.claim_next_run(["approvals"], lease_ms=60_000)
        assert claimed is not None
        wake = await storage.now() + HOUR_MS
        assert await storage.wait_run(waiting.id, claimed.lease_id, "approved", wake)
        return held.id, waiting.id

    held, waiting = with_store(store_url, prepare)
    shown = invoke_json("runs", "show", held, "--storage", store_url)
    assert shown["run"]["holder"] == {"worker": "w-7", "host": "box-3", "pid": 4242}
    assert 0 <= shown["heartbeat_age_ms"] < 60_000
    assert 0 < shown["lease_expires_in_ms"] <= 60_000
    text = invoke("runs", "show", held, "--storage", store_url).output
    assert "worker w-7 on box-3 (pid 4242)" in text and " ago)" in text
    shown = invoke_json("runs", "show", waiting, "--storage", store_url)
    assert shown["waiting_for"] == "approved"
    assert HOUR_MS - 60_000 < shown["wakes_in_ms"] <= HOUR_MS
    text = invoke("runs", "show", waiting, "--storage", store_url).output
    assert "event 'approved'" in text and "wakes" in text


# -- cancel, resume, retry --------------------------------------------------------------------


def test_cancel_resume_retry(store_url: str) -> None:
    run_id = with_store(store_url, lambda s: _id(new_run(s, "orders", {"order": 1})))

    def status(rid: str) -> str:
        return str(invoke_json("runs", "show", rid, "--storage", store_url)["run"]["status"])

    assert invoke("runs", "retry", run_id, "--storage", store_url).exit_code == 1  # pending
    assert invoke("runs", "resume", run_id, "--storage", store_url).exit_code == 1
    assert invoke_json("runs", "cancel", run_id, "--storage", store_url)["status"] == "cancelled"
    assert status(run_id) == "cancelled"
    again = invoke("runs", "cancel", run_id, "--storage", store_url)
    assert again.exit_code == 1 and "is cancelled" in again.output

    retried = invoke_json("runs", "retry", run_id, "--storage", store_url)
    assert retried["retry_of"] == run_id and retried["run_id"] != run_id
    fresh = invoke_json("runs", "show", retried["run_id"], "--storage", store_url)["run"]
    assert fresh["status"] == "pending" and fresh["input"] == {"order": 1}
    assert status(run_id) == "cancelled"  # the original is kept as it was

    assert invoke_json("runs", "resume", run_id, "--storage", store_url)["status"] == "pending"
    assert status(run_id) == "pending"
    for command in ("cancel", "resume", "retry"):
        missing = invoke("runs", command, "nope", "--storage", store_url)
        assert missing.exit_code == 1 and "no run with id 'nope'" in missing.output


def test_resume_continues_a_failed_run_keeping_completed_steps(store_url: str) -> None:
    run_id = with_store(store_url, _failed_run)
    invoke_json("runs", "resume", run_id, "--storage", store_url)
    shown = invoke_json("runs", "show", run_id, "--storage", store_url)
    assert shown["run"]["status"] == "pending" and shown["run"]["error"] is None
    assert [s["name"] for s in shown["steps"]] == ["reserve"]


# -- purge ---------------------------------------------------------------------------------


def test_purge_deletes_only_old_finished_runs_in_batches(store_url: str) -> None:
    real_now = with_store(store_url, lambda s: s.now())

    async def finish(storage: StorageAdapter, status: RunStatus, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            run = await new_run(storage, "orders")
            claimed = await storage.claim_next_run(["orders"], lease_ms=60_000)
            assert claimed is not None and claimed.run.id == run.id
            await storage.update_claimed_run_status(run.id, claimed.lease_id, status)
            ids.append(run.id)
        return ids

    async def old(storage: StorageAdapter) -> dict[str, list[str]]:
        return {
            "completed": await finish(storage, RunStatus.COMPLETED, 3),
            "failed": await finish(storage, RunStatus.FAILED, 1),
            "pending": [(await new_run(storage, "other")).id],
        }

    async def go() -> dict[str, list[str]]:
        # A store whose clock reads two hours ago: these runs finished two hours ago.
        storage = open_storage(store_url, clock=lambda: real_now - 2 * HOUR_MS)
        try:
            await storage.initialize()
            return await old(storage)
        finally:
            await storage.close()

    aged = asyncio.run(go())
    recent = with_store(store_url, lambda s: finish(s, RunStatus.COMPLETED, 1))

    dry = invoke_json("runs", "purge", "--storage", store_url, "--older-than", "1h", "--dry-run")
    assert dry["would_delete"] == 4 and dry["dry_run"] is True
    only_failed = invoke_json(
        "runs", "purge", "--storage", store_url, "--older-than", "1h", "--status", "failed"
    )
    assert only_failed["deleted"] == 1
    purged = invoke_json(
        "runs", "purge", "--storage", store_url, "--older-than", "1h", "--batch", "2"
    )
    assert purged["deleted"] == 3  # batches of 2, 1
    left = {r["id"] for r in invoke_json("runs", "list", "--storage", store_url)["runs"]}
    assert left == set(aged["pending"]) | set(recent)
    assert invoke("runs", "show", aged["completed"][0], "--storage", store_url).exit_code == 1
    bad = invoke("runs", "purge", "--storage", store_url, "--older-than", "forever")
    assert bad.exit_code == 2
    refused = invoke(
        "runs", "purge", "--storage", store_url, "--older-than", "1h", "--status", "pending"
    )
    assert refused.exit_code == 2


# -- events, schedules ---------------------------------------------------------------------


def test_events_send_wakes_a_waiting_run(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> tuple[str, str]:
        waiting = await new_run(storage, "approvals")
        claimed = await storage.claim_next_run(["approvals"], lease_ms=60_000)
        assert claimed is not None
        assert await storage.wait_run(waiting.id, claimed.lease_id, "approved", None)
        done = await new_run(storage, "orders")
        finished = await storage.claim_next_run(["orders"], lease_ms=60_000)
        assert finished is not None
        await storage.update_claimed_run_status(done.id, finished.lease_id, RunStatus.COMPLETED)
        return waiting.id, done.id

    waiting, done = with_store(store_url, prepare)
    sent = invoke_json(
        "events", "send", waiting, "approved", "--payload", '{"by": "ada"}', "--key", "k1",
        "--storage", store_url,
    )  # fmt: skip
    assert sent["delivered"] is True
    assert (
        invoke_json("runs", "show", waiting, "--storage", store_url)["run"]["status"] == "pending"
    )

    async def take(storage: StorageAdapter) -> Any:
        event = await storage.take_event(waiting, "approved")
        return None if event is None else event.payload

    again = invoke("events", "send", waiting, "approved", "--key", "k1", "--storage", store_url)
    assert again.exit_code == 0  # same key: delivered once
    assert with_store(store_url, take) == {"by": "ada"}
    assert with_store(store_url, take) is None

    ended = invoke("events", "send", done, "approved", "--storage", store_url)
    assert ended.exit_code == 1 and "is completed" in ended.output
    missing = invoke("events", "send", "nope", "approved", "--storage", store_url)
    assert missing.exit_code == 1 and "no run" in missing.output
    bad = invoke("events", "send", waiting, "approved", "--payload", "{no", "--storage", store_url)
    assert bad.exit_code == 2 and "JSON" in bad.output


def test_schedules_list_and_delete(store_url: str) -> None:
    async def prepare(storage: StorageAdapter) -> None:
        now = await storage.now()
        for key, rule in (
            ("nightly", Recurrence(cron="0 3 * * *")),
            ("ping", Recurrence(every_ms=300_000)),
        ):
            await storage.upsert_schedule(
                Schedule(
                    key=key, workflow="reports", input={"k": key}, recurrence=rule,
                    next_run_at=now + 60_000, created_at=now, updated_at=now,
                )
            )  # fmt: skip

    with_store(store_url, prepare)
    listed = invoke_json("schedules", "list", "--storage", store_url)
    assert [s["key"] for s in listed["schedules"]] == ["nightly", "ping"]
    assert listed["schedules"][0]["recurrence"]["cron"] == "0 3 * * *"
    text = invoke("schedules", "list", "--storage", store_url).output
    assert "cron 0 3 * * * (UTC)" in text and "every 5 min" in text
    assert invoke_json("schedules", "delete", "ping", "--storage", store_url)["deleted"] is True
    again = invoke("schedules", "delete", "ping", "--storage", store_url)
    assert again.exit_code == 1 and "no schedule with key 'ping'" in again.output
    assert [
        s["key"] for s in invoke_json("schedules", "list", "--storage", store_url)["schedules"]
    ] == ["nightly"]


# -- configuration -------------------------------------------------------------------------


def test_storage_comes_from_the_environment_and_bad_configuration_exits_2(
    store_url: str,
) -> None:
    migrate(store_url)
    from_env = invoke("runs", "list", "--json", env={"REFLOW_STORAGE": store_url})
    assert from_env.exit_code == 0 and '"runs": []' in from_env.output
    missing = invoke("runs", "list", env={"REFLOW_STORAGE": ""})
    assert missing.exit_code == 2 and "--storage" in missing.output
    unknown = invoke("runs", "list", "--storage", "nosuch://x")
    assert unknown.exit_code == 2 and "installed adapters" in unknown.output
    bad_id = invoke("runs", "show", "bad\nid", "--storage", store_url)
    assert bad_id.exit_code == 2


# -- workers that may not migrate --------------------------------------------------------


def test_a_worker_with_no_migrate_refuses_a_store_that_is_not_current(store_url: str) -> None:
    refused = invoke("worker", "worker_app:workflows", "--storage", store_url, "--no-migrate")
    assert refused.exit_code == 2
    assert invoke_json("db", "status", "--storage", store_url)["exists"] is False
    config = WorkerConfig("worker_app:workflows", storage=store_url, migrate=False)
    with pytest.raises(StartupError, match="reflow db migrate"):
        asyncio.run(start_engine(config, run=False))
    assert "--no-migrate" in config.argv()
    migrate(store_url)
    engine, _ = asyncio.run(start_engine(config, run=False))  # current: starts
    assert engine.workflows
