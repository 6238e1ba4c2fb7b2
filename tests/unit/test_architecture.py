"""The layering the code promises: arrows point only into ``reflow_core``.

reflow_core imports no adapter, not the kit and not the application layer
(``reflow_cli``: the command, the worker processes, the demo); no adapter imports another
adapter
(``sqlite_common`` is the SQLite dialect shared by the sqlite and apsw adapters, not an
adapter). The public surface is curated: everything in ``__all__`` exists and is
documented.
"""

from __future__ import annotations

import ast
import inspect
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import reflow_core

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[path] = names
    return found


CORE_MUST_NOT_IMPORT = ("reflow_adapters", "reflow_conformance", "reflow_cli")


def plugin_packages() -> set[str]:
    """Top-level packages of every installed ``reflow`` plugin (adapters, observers):
    they import the core, never the other way round."""
    found = {ep.value.split(":")[0].split(".")[0] for ep in entry_points(group="reflow")}
    return found - {"reflow_core"}


def test_core_imports_no_adapter_no_kit_and_no_cli() -> None:
    forbidden = (*CORE_MUST_NOT_IMPORT, *sorted(plugin_packages()))
    for path, names in imported_modules("reflow_core").items():
        bad = {n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_application_layer_lives_outside_the_core() -> None:
    for moved in ("cli.py", "worker.py", "demo.py"):
        assert not (ROOT / "reflow_core" / moved).exists(), (
            f"reflow_core/{moved} belongs in reflow_cli/"
        )


def test_cli_reaches_adapters_only_through_the_registry() -> None:
    """The command opens stores by URL (``open_storage``), never by importing an adapter;
    schema administration goes through ``reflow_core.migrations.MigratableStorage``."""
    for path, names in imported_modules("reflow_cli").items():
        bad = {n for n in names if n.startswith("reflow_adapters")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("adapter", ["memory", "sqlite", "apsw", "postgres"])
def test_adapters_do_not_import_each_other(adapter: str) -> None:
    allowed = {f"reflow_adapters.{adapter}", "reflow_adapters.sqlite_common"}
    if adapter not in ("sqlite", "apsw"):
        allowed.discard("reflow_adapters.sqlite_common")
    for path, names in imported_modules(f"reflow_adapters/{adapter}").items():
        for name in names:
            if name.startswith("reflow_adapters") and not any(
                name == a or name.startswith(a + ".") for a in allowed
            ):
                pytest.fail(f"{path.relative_to(ROOT)} imports {name}")
            assert not name.startswith("reflow_conformance"), path


def test_public_surface_is_complete_and_documented() -> None:
    for name in reflow_core.__all__:
        assert hasattr(reflow_core, name), f"__all__ names missing {name}"
        obj = getattr(reflow_core, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
    exported = {n for n in dir(reflow_core) if not n.startswith("_")}
    modules = {n for n in exported if inspect.ismodule(getattr(reflow_core, n))}
    assert exported - modules - {"annotations"} == set(reflow_core.__all__) - {"__version__"}


def test_library_code_never_waits_with_asyncio_wait_for() -> None:
    """On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation (gh-86296): a loop
    waiting with it may never stop. Library code waits with ``reflow_core.waits``."""
    sources = [
        *(ROOT / "reflow_core").rglob("*.py"),
        *(ROOT / "reflow_adapters").rglob("*.py"),
        *(ROOT / "reflow_cli").rglob("*.py"),
        *(ROOT / "packages").rglob("src/**/*.py"),
    ]
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "asyncio.wait_for(" in line and path.name != "waits.py"
    ]
    assert len(sources) > 50, "the sources were not found"
    assert offenders == [], offenders
