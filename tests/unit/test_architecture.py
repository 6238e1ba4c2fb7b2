"""The layering the code promises: arrows point only into ``reflow_core``.

reflow_core imports no adapter and not the kit; no adapter imports another adapter
(``sqlite_common`` is the SQLite dialect shared by the sqlite and apsw adapters, not an
adapter). The public surface is curated: everything in ``__all__`` exists and is
documented.
"""

from __future__ import annotations

import ast
import inspect
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


def test_core_imports_no_adapter_and_no_kit() -> None:
    for path, names in imported_modules("reflow_core").items():
        forbidden: tuple[str, ...] = ("reflow_adapters", "reflow_conformance")
        if path.name == "cli.py":
            # `reflow conformance NAME` dispatches to the kit, importing it lazily.
            forbidden = ("reflow_adapters",)
        bad = {n for n in names if n.startswith(forbidden)}
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
