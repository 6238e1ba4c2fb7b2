"""The memory adapter skips scanning a checkpoint's id only when it is the engine's own
``<run id>/<name>`` of a stored run and a name already found valid; every other id is
still checked in full (issue 13)."""

from __future__ import annotations

import asyncio

import pytest

from reflow_adapters.memory import MemoryStorage
from reflow_core.errors import InvalidIdentifierError
from reflow_core.types import RunStatus, StepResult, StepStatus, WorkflowRun


def _row(step_id: str, run_id: str, name: str) -> StepResult:
    return StepResult(
        id=step_id,
        run_id=run_id,
        name=name,
        status=StepStatus.RUNNING,
        created_at=1,
        updated_at=1,
    )


def test_only_the_engines_id_of_a_known_name_skips_the_scan() -> None:
    async def scenario() -> None:
        storage = MemoryStorage(clock=lambda: 1_000)
        run = WorkflowRun(
            id="r", workflow="w", input=None, status=RunStatus.PENDING, created_at=1, updated_at=1
        )
        await storage.create_run(run)
        claimed = await storage.claim_next_run(["w"], lease_ms=10_000)
        assert claimed is not None
        lease = claimed.lease_id
        assert await storage.save_step_result(_row("r/a", "r", "a"), lease)  # "a" now known
        # Known name, but an id of another form: scanned, and refused when invalid.
        for bad in ("r/a\x00", "r\x00a", "x" * 601, "\ud800"):
            with pytest.raises(InvalidIdentifierError, match="step id"):
                await storage.save_step_result(_row(bad, "r", "a"), lease)
        # Another valid form is fine (ids are the caller's), as is the engine's own.
        assert await storage.save_step_result(_row("custom:1", "r", "b"), lease)
        assert await storage.save_step_result(_row("r/c", "r", "c"), lease)

        class Name(str):
            pass

        # A str subclass equal to a known name is still checked (and passes when valid).
        assert await storage.save_step_result(_row("r/d", "r", Name("d")), lease)
        names = sorted(step.name for step in await storage.get_step_results("r"))
        assert names == ["a", "b", "c", "d"]
        await storage.close()

    asyncio.run(scenario())
