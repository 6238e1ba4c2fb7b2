"""``reflow adapter new NAME``: write the package skeleton of a third-party storage adapter.

The skeleton is a complete distribution an adapter author starts from: a
``pyproject.toml`` with the ``reflow`` entry point, a plugin module answering
``reflow_adapters()`` with an :class:`~reflow_core.AdapterSpec` (name, scheme,
capabilities, declared options), a conformance factory that receives the kit's clock and
tears each case's store down (an async generator), a storage class with every contract
method, a test module, a README with the report instructions and a GitHub Actions
workflow running ``pytest --reflow-adapter=NAME``.

As written, the storage class hands every call to Reflow's in-memory adapter, so the
package passes the memory-backed part of the kit as soon as it is installed; its
``TODO`` comments show where a real store goes. The files are rendered from
:mod:`string.Template` files shipped in ``reflow_conformance/skeleton_templates`` (``$``
placeholders, ``$$`` for a literal dollar), so no template engine is needed.

>>> names = skeleton_names("acme_kv")
>>> names["package"], names["distribution"], names["scheme"], names["class_name"]
('reflow_acme_kv', 'reflow-acme-kv', 'acme-kv', 'AcmeKvStorage')
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from reflow_core.errors import ConfigError
from reflow_core.storage import CONTRACT_VERSION

__all__ = [
    "MAX_NAME_LENGTH",
    "RESERVED_NAMES",
    "TEMPLATES",
    "check_adapter_name",
    "skeleton_names",
    "write_skeleton",
]

MAX_NAME_LENGTH = 40
"""Longest adapter name accepted: it becomes a package, a distribution and a URL scheme."""

RESERVED_NAMES = frozenset(
    {
        # The names and schemes of Reflow's own adapters (built in, or the reflow-mysql
        # and reflow-redis distributions): the registry refuses a second adapter with
        # the same name or scheme, so the package would never load next to them.
        "memory",
        "sqlite",
        "apsw",
        "postgres",
        "postgresql",
        "mysql",
        "mariadb",
        "redis",
        # reflow_<name> would shadow one of Reflow's own packages.
        "core",
        "adapters",
        "conformance",
        "cli",
        "otel",
    }
)
"""Names an adapter package cannot take."""

_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")

TEMPLATES: tuple[tuple[str, str], ...] = (
    ("pyproject.toml.tmpl", "pyproject.toml"),
    ("README.md.tmpl", "README.md"),
    ("github-workflow.yml.tmpl", ".github/workflows/reflow-conformance.yml"),
    ("package/__init__.py.tmpl", "$package/__init__.py"),
    ("package/plugin.py.tmpl", "$package/plugin.py"),
    ("package/storage.py.tmpl", "$package/storage.py"),
    ("package/py.typed.tmpl", "$package/py.typed"),
    ("tests/test_adapter.py.tmpl", "tests/test_adapter.py"),
)
"""What the skeleton is made of: (template under ``skeleton_templates/``, path written
under the destination), in writing order. The paths are templates too (``$package``)."""


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter package, else :class:`ConfigError` saying why.

    A valid name is lowercase ASCII letters, digits and single underscores, starting with
    a letter and not ending with an underscore (``dynamo``, ``acme_kv``), at most
    :data:`MAX_NAME_LENGTH` characters, and not one of :data:`RESERVED_NAMES`. It is used
    as the adapter name (``--reflow-adapter=NAME``), in the package ``reflow_NAME``, the
    distribution ``reflow-NAME`` and the URL scheme (``_`` becomes ``-``: URL schemes
    have no underscore).
    """
    if not isinstance(name, str):
        raise ConfigError(f"adapter name must be a str, got {type(name).__name__} {name!r}")
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"adapter name {name!r} is not valid: use lowercase ASCII letters, digits and "
            "single underscores, starting with a letter (e.g. 'dynamo' or 'acme_kv')"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"adapter name {name[:12]!r}... is {len(name)} characters long; "
            f"use at most {MAX_NAME_LENGTH}"
        )
    if name in RESERVED_NAMES:
        raise ConfigError(
            f"adapter name {name!r} is taken by Reflow itself; choose another "
            f"(reserved: {', '.join(sorted(RESERVED_NAMES))})"
        )
    return name


def skeleton_names(name: str) -> dict[str, str]:
    """Every name the skeleton derives from the adapter ``name`` (checked first)."""
    check_adapter_name(name)
    words = name.split("_")
    return {
        "name": name,
        "package": f"reflow_{name}",
        "distribution": "reflow-" + "-".join(words),
        "scheme": "-".join(words),
        "class_name": "".join(word.capitalize() for word in words) + "Storage",
        "contract": CONTRACT_VERSION,
        "contract_badge": CONTRACT_VERSION.replace("-", "--"),
        "description": f"Reflow storage adapter {name!r} (skeleton: in-process until "
        "it talks to a real store).",
    }


def _template(relative: str) -> Template:
    source = resources.files("reflow_conformance").joinpath("skeleton_templates", relative)
    return Template(source.read_text(encoding="utf-8"))


def write_skeleton(name: str, dest: Path) -> list[Path]:
    """Write the skeleton of adapter ``name`` as the project ``dest/reflow-NAME``.

    The project directory is named after the distribution (``reflow-acme-kv`` for
    ``acme_kv``) and created, with ``dest``, if missing; an existing one is used as long
    as none of the skeleton's files is in it. Returns the files written, in order.
    Nothing is written when ``name`` is invalid (:func:`check_adapter_name`) or when any
    of the files already exists: existing work is never overwritten, and the
    :class:`ConfigError` lists what is in the way.
    """
    names = skeleton_names(name)
    root = Path(dest) / names["distribution"]
    for directory in (Path(dest), root):
        if directory.exists() and not directory.is_dir():
            raise ConfigError(
                f"cannot write the {name!r} adapter skeleton into {str(root)!r}: "
                f"{str(directory)!r} is a file, not a directory; choose another destination"
            )
    # Render everything first: a template error must not leave half a package behind.
    rendered = [
        (root / Template(target).substitute(names), _template(source).substitute(names))
        for source, target in TEMPLATES
    ]
    existing = [path for path, _ in rendered if path.exists() or path.is_symlink()]
    if existing:
        shown = ", ".join(str(path.relative_to(root)) for path in existing)
        raise ConfigError(
            f"refusing to overwrite existing files in {str(root)!r}: {shown}; "
            "choose another destination, or move them away first"
        )
    written: list[Path] = []
    for path, text in rendered:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # "x": a file that appeared since the check above is still never overwritten.
            with path.open("x", encoding="utf-8", newline="\n") as handle:
                handle.write(text)
        except FileExistsError:
            raise ConfigError(
                f"refusing to overwrite {str(path)!r}, created while the skeleton was being "
                f"written; {len(written)} file(s) were written before it: "
                f"{', '.join(str(p) for p in written) or 'none'}"
            ) from None
        written.append(path)
    return written
