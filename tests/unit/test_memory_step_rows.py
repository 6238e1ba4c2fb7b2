"""The memory adapter keeps step rows the garbage collector does not track, and gives
readers back the same records (a StepStatus member) as before."""

from __future__ import annotations

import asyncio
import gc

from reflow_adapters.memory import MemoryStorage
from reflow_core.types import StepResult, StepStatus


def _row(status: StepStatus | str, output: object = None) -> StepResult:
    return StepResult(
        id="r/a", run_id="r", name="a", status=status, output=output, created_at=1, updated_at=2
    )


def test_kept_rows_are_not_tracked_and_read_back_as_records() -> None:
    async def scenario() -> None:
        storage = MemoryStorage()
        assert await storage.save_step_result(_row(StepStatus.COMPLETED, {"n": 1}))
        kept, data = storage._steps._rows["r"]["a"]
        assert not gc.is_tracked(kept)
        assert data == b'{"n":1}'
        (record,) = await storage.get_step_results("r")
        assert record.status is StepStatus.COMPLETED
        assert record.output == {"n": 1}
        assert record == _row(StepStatus.COMPLETED, {"n": 1})

    asyncio.run(scenario())


def test_a_plain_str_status_reads_back_as_its_member() -> None:
    async def scenario() -> None:
        storage = MemoryStorage()
        assert await storage.save_step_result(_row("running"))
        (record,) = await storage.get_step_results("r")
        assert record.status is StepStatus.RUNNING
        # Still not final: a later write of the same step lands.
        assert await storage.save_step_result(_row(StepStatus.COMPLETED, 5))
        (record,) = await storage.get_step_results("r")
        assert record.status is StepStatus.COMPLETED and record.output == 5
        # And now final: write-once.
        assert not await storage.save_step_result(_row(StepStatus.COMPLETED, 6))

    asyncio.run(scenario())
