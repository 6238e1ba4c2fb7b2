"""What is specific to the APSW adapter: its URL scheme, its plugin, its optional import,
and sharing one file with the stdlib adapter. Behaviour shared through
``reflow_adapters.sqlite_common`` is tested against both adapters in ``test_sqlite.py``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from reflow_adapters.apsw import APSWStorage
from reflow_adapters.apsw import plugin as apsw_plugin
from reflow_adapters.sqlite import SQLiteStorage
from reflow_adapters.sqlite import plugin as sqlite_plugin
from reflow_core import (
    Capability,
    ConfigError,
    LeaseHolder,
    RunStatus,
    StepResult,
    StepStatus,
    WorkflowRun,
    open_storage,
)


def test_open_storage_resolves_an_apsw_url(tmp_path: Path) -> None:
    storage = open_storage(f"apsw:///{tmp_path / 'a.db'}?synchronous=NORMAL")
    assert isinstance(storage, APSWStorage)
    assert storage.url == f"apsw:///{tmp_path / 'a.db'}"
    assert APSWStorage().url is None
    with pytest.raises(ConfigError, match="scheme"):
        apsw_plugin.make_storage("sqlite:///a.db")


@pytest.mark.parametrize(("plugin", "name"), [(sqlite_plugin, "sqlite"), (apsw_plugin, "apsw")])
def test_plugin_declares_its_adapter(plugin: object, name: str, tmp_path: Path) -> None:
    (spec,) = plugin.reflow_adapters()  # type: ignore[attr-defined]
    assert (spec.name, spec.schemes) == (name, (name,))
    assert spec.capabilities == {
        Capability.DURABLE,
        Capability.CROSS_PROCESS,
        Capability.THREADS,
        Capability.NOTIFY,
    }
    assert spec.conformance_factory is not None
    storage = spec.conformance_factory(tmp_path, {}, clock=lambda: 1234)
    assert storage.url is not None and storage.url.endswith("conformance.db")
    assert not (tmp_path / "conformance.db").exists()  # built without I/O
    assert asyncio.run(storage.now()) == 1234  # the kit's clock is the store's "now"
    assert not (tmp_path / "conformance.db").exists()


def test_missing_apsw_is_a_config_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "apsw", None)  # makes "import apsw" fail
    monkeypatch.delitem(sys.modules, "reflow_adapters.apsw.storage")
    with pytest.raises(ConfigError, match=r"reflow\[apsw\]"):
        apsw_plugin.make_storage("apsw://")


def test_both_drivers_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    run = WorkflowRun(
        id="r",
        workflow="wf",
        input={"k": [1]},
        status=RunStatus.PENDING,
        created_at=1,
        updated_at=1,
    )

    async def scenario() -> None:
        stdlib, apsw = SQLiteStorage(path), APSWStorage(path)
        await stdlib.initialize()
        await apsw.initialize()
        await stdlib.create_run(run)
        holder = LeaseHolder(worker="w", host="h", pid=7)
        claimed = await apsw.claim_next_run(["wf"], lease_ms=60_000, holder=holder)
        assert claimed is not None and claimed.run.id == "r"
        assert await stdlib.claim_next_run(["wf"], lease_ms=60_000) is None
        assert await stdlib.get_run("r") == claimed.run
        step = StepResult(
            id="s", run_id="r", name="a", status=StepStatus.COMPLETED, created_at=2, updated_at=2
        )
        assert await stdlib.save_step_result(step, claimed.lease_id)
        assert await apsw.get_step_results("r") == [step]
        await stdlib.close()
        await apsw.close()

    asyncio.run(scenario())
