"""Adapter discovery through real entry points: isolation, conflicts, clear errors.

Third-party distributions are real ``.dist-info`` directories on ``sys.path``, which is
exactly what ``importlib.metadata`` reads for installed packages.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflow_core import (
    AdapterConflictError,
    AdapterError,
    AdapterNotFoundError,
    AdapterSpec,
    Capability,
    ConfigError,
    adapter_specs,
    get_adapter,
    open_storage,
    register_adapter,
    registry,
)


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    registry._reset_for_tests()
    yield
    registry._reset_for_tests()


def install(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Write a minimal installed distribution: dist-info metadata plus its modules."""
    info = site / f"{dist}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[reflow]\n{lines}")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


ADAPTER_MODULE = """
    from reflow_core import AdapterSpec, hookimpl
    from reflow_adapters.memory import MemoryStorage

    @hookimpl
    def reflow_adapters():
        return [AdapterSpec(name="{name}", factory=lambda url=None, **o: MemoryStorage(),
                            schemes=("{scheme}",))]
"""


def test_builtin_adapters_register_through_entry_points() -> None:
    specs = adapter_specs()
    assert {"memory", "sqlite", "apsw"} <= set(specs)
    assert specs["sqlite"].distribution == "reflow"
    assert Capability.CROSS_PROCESS in specs["sqlite"].capabilities
    assert type(open_storage("memory://")).__name__ == "MemoryStorage"


def test_broken_entry_point_is_a_warning_and_others_still_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(tmp_path, "reflow_broken", {"broken": "reflow_broken_missing_module"}, {})
    install(
        tmp_path,
        "reflow_thirdparty",
        {"thirdparty": "reflow_thirdparty_plugin"},
        {"reflow_thirdparty_plugin": ADAPTER_MODULE.format(name="thirdparty", scheme="third")},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = adapter_specs()
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m and "reflow_broken" in m for m in messages), messages
    assert specs["thirdparty"].distribution == "reflow_thirdparty"
    assert specs["thirdparty"].version == "1.2.3"
    assert "memory" in specs
    assert type(open_storage("third://anything")).__name__ == "MemoryStorage"


def test_two_distributions_claiming_one_name_is_an_error_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for dist in ("reflow_one", "reflow_two"):
        install(
            tmp_path,
            dist,
            {f"{dist}_ep": f"{dist}_plugin"},
            {f"{dist}_plugin": ADAPTER_MODULE.format(name="dupe", scheme=dist)},
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AdapterConflictError) as info:
        adapter_specs()
    assert "reflow_one" in str(info.value) and "reflow_two" in str(info.value)


def test_misspelled_hook_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(
        tmp_path,
        "reflow_typo",
        {"typo": "reflow_typo_plugin"},
        {
            "reflow_typo_plugin": """
                from reflow_core import hookimpl

                @hookimpl
                def reflow_run_complete(event):
                    pass
            """
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AdapterError, match="reflow_run_complete"):
        adapter_specs()


def test_unknown_name_or_scheme_lists_installed_adapters() -> None:
    with pytest.raises(AdapterNotFoundError, match="memory") as info:
        get_adapter("dynamodb")
    assert "sqlite" in str(info.value)
    with pytest.raises(AdapterNotFoundError, match="'cassandra'"):
        open_storage("cassandra://localhost/db")


def test_in_process_registration_and_conflicts() -> None:
    from reflow_adapters.memory import MemoryStorage

    spec = AdapterSpec(
        name="scratch", factory=lambda url=None, **o: MemoryStorage(), schemes=("scratch",)
    )
    register_adapter(spec)
    assert type(open_storage("scratch://")).__name__ == "MemoryStorage"
    assert get_adapter("scratch").distribution is None
    with pytest.raises(AdapterConflictError, match="scratch"):
        register_adapter(spec)
    with pytest.raises(AdapterConflictError, match="'sqlite'"):
        register_adapter(
            AdapterSpec(
                name="other", factory=lambda url=None, **o: MemoryStorage(), schemes=("sqlite",)
            )
        )


def test_unknown_capability_is_an_error() -> None:
    assert Capability.parse("cross-process") is Capability.CROSS_PROCESS
    with pytest.raises(ConfigError, match="teleport"):
        Capability.parse("teleport")
