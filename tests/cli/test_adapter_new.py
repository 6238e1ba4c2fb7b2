"""``reflow adapter new NAME``: the command around the kit's skeleton generator."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_stores import invoke


def test_adapter_new_writes_the_skeleton_and_lists_the_files(tmp_path: Path) -> None:
    result = invoke("adapter", "new", "acme_kv", "--dest", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    written = [Path(p) for p in json.loads(result.stdout)]
    assert written and all(p.is_file() and tmp_path in p.parents for p in written)
    assert any(p.name == "pyproject.toml" for p in written)
    text = invoke("adapter", "new", "other_kv", "--dest", str(tmp_path))
    assert text.exit_code == 0 and "created adapter 'other_kv'" in text.output


def test_adapter_new_refuses_to_overwrite_and_rejects_bad_names(tmp_path: Path) -> None:
    assert invoke("adapter", "new", "acme_kv", "--dest", str(tmp_path)).exit_code == 0
    again = invoke("adapter", "new", "acme_kv", "--dest", str(tmp_path))
    assert again.exit_code == 1 and "overwrite" in again.output
    bad = invoke("adapter", "new", "Not A Name", "--dest", str(tmp_path / "x"))
    assert bad.exit_code == 2
    assert not (tmp_path / "x").exists()


def test_adapter_new_without_the_kit_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "reflow_conformance.skeleton", None)
    result = invoke("adapter", "new", "acme_kv", "--dest", str(tmp_path))
    assert result.exit_code == 1 and "pip install 'reflow[conformance]'" in result.output
