"""Adapter discovery: the ``reflow`` entry-point group, loaded into one pluggy manager.

Built-in adapters register exactly as a third-party package does: an entry point in
the ``reflow`` group names a module whose :func:`reflow_adapters` hook returns
:class:`AdapterSpec` records. :func:`open_storage` resolves a URL or a name to an
adapter; :func:`register_adapter` registers one in-process, without packaging.

This is the only module that calls pluggy's untyped hook for adapters, so everything
behind it stays typed.
"""

from __future__ import annotations

import enum
import importlib.metadata
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, TypeAlias, cast

import msgspec
import pluggy

from reflow_core import hookspecs
from reflow_core.errors import (
    AdapterConflictError,
    AdapterError,
    AdapterNotFoundError,
    ConfigError,
)
from reflow_core.storage import StorageAdapter

__all__ = [
    "AdapterOption",
    "AdapterSpec",
    "Capability",
    "ConformanceFactory",
    "ConformanceStore",
    "adapter_specs",
    "get_adapter",
    "open_storage",
    "plugin_manager",
    "register_adapter",
]

ENTRY_POINT_GROUP = "reflow"


class Capability(enum.StrEnum):
    """What an adapter declares it supports; conformance cases that need one are skipped
    (with the capability named) on adapters that do not declare it."""

    DURABLE = "durable"
    """State survives closing the adapter and opening the same URL again."""
    CROSS_PROCESS = "cross-process"
    """Several processes may use one store at once (``url`` opens it elsewhere)."""
    THREADS = "threads"
    """Several handles, one per thread, may race on one store."""
    NOTIFY = "notify"
    """Implements :class:`~reflow_core.storage.WorkNotifier` (push wake-ups)."""

    @classmethod
    def parse(cls, name: str) -> Capability:
        """The capability called ``name``; :class:`ConfigError` listing the known ones."""
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(c.value for c in cls)
            raise ConfigError(f"unknown capability {name!r}; known capabilities: {known}") from None


AdapterFactory = Callable[..., StorageAdapter]
"""Builds an adapter: ``factory(url=None, **options)``. Must do no I/O."""

ConformanceStore: TypeAlias = (
    StorageAdapter
    | Iterator[StorageAdapter]
    | AsyncIterator[StorageAdapter]
    | AbstractContextManager[StorageAdapter]
    | AbstractAsyncContextManager[StorageAdapter]
)
"""What a conformance factory may return: the adapter itself, or — when the store needs
cleaning up after the case (a server adapter's throw-away schema) — a generator or async
generator that yields the adapter once (the code after ``yield`` is the teardown), or a
context manager (sync or async) whose ``__enter__`` returns it. The kit runs the teardown
after each case, once every handle is closed, even when the case failed."""

ConformanceFactory = Callable[..., ConformanceStore]
"""Builds a fresh, empty adapter for one conformance case:
``factory(tmp_path, options, clock=clock)``, given a temporary directory, the
``--reflow-option`` values and the kit's clock. The adapter must use ``clock`` as the
store's "now" (on a server adapter, as a test-only override of the server's time), so
the kit can move time by hand. Must do no I/O (``initialize`` does). It returns the
adapter, or a generator / context manager around it (:data:`ConformanceStore`) when the
store needs a teardown."""


class AdapterOption(msgspec.Struct, frozen=True, kw_only=True):
    """One ``--reflow-option KEY=VALUE`` an adapter's conformance factory understands,
    declared so that ``reflow adapters`` and ``reflow conformance --help`` can show it."""

    name: str
    meaning: str
    default: str | None = None
    """What applies when the option is not given (in words, e.g. ``"$REFLOW_TEST_DSN"``)."""


class AdapterSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How to find, build and test one storage adapter."""

    name: str
    factory: AdapterFactory
    schemes: tuple[str, ...] = ()
    """URL schemes served, e.g. ``("sqlite",)``."""
    capabilities: frozenset[Capability] = frozenset()
    conformance_factory: ConformanceFactory | None = None
    options: tuple[AdapterOption, ...] = ()
    """The ``--reflow-option`` keys the conformance factory understands."""
    description: str = ""
    distribution: str | None = None
    """Filled in by the registry: the installed distribution that provided it."""
    version: str | None = None
    """Filled in by the registry: that distribution's version."""


class _Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pm: pluggy.PluginManager | None = None
        self.specs: dict[str, AdapterSpec] | None = None
        self.manual: dict[str, AdapterSpec] = {}
        self.origins: dict[int, tuple[str | None, str | None]] = {}


_state = _Registry()


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every entry point of the group; a broken one is a warning, never fatal.

    Owned here rather than ``pm.load_setuptools_entrypoints`` because that stops at the
    first plugin that fails to import.
    """
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            warnings.warn(
                f"reflow: entry point {ep.name!r} ({ep.value}) of distribution "
                f"{dist or 'unknown'} failed to load and was skipped: "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        _state.origins[id(plugin)] = (dist, version)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # A misspelled hook would otherwise be silently never called.
        raise AdapterError(
            f"plugin {exc.plugin!r} implements a hook Reflow does not define: {exc}; "
            "hook names start with 'reflow_' (see reflow_core.hookspecs)"
        ) from exc


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading the entry points on first use."""
    with _state.lock:
        if _state.pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            _load_entry_points(pm)
            _state.pm = pm
        return _state.pm


def _collect(pm: pluggy.PluginManager) -> dict[str, AdapterSpec]:
    specs: dict[str, AdapterSpec] = {}
    for impl in pm.hook.reflow_adapters.get_hookimpls():
        dist, version = _state.origins.get(id(impl.plugin), (None, None))
        result = cast("list[object]", impl.function() or [])
        for spec in result:
            if not isinstance(spec, AdapterSpec):
                raise AdapterConflictError(
                    f"plugin {impl.plugin_name!r} returned {spec!r} from reflow_adapters(); "
                    "expected reflow_core.AdapterSpec records"
                )
            spec = msgspec.structs.replace(
                spec, distribution=spec.distribution or dist, version=spec.version or version
            )
            _add(specs, spec)
    return specs


def _add(specs: dict[str, AdapterSpec], spec: AdapterSpec) -> None:
    other = specs.get(spec.name)
    if other is not None:
        raise AdapterConflictError(
            f"two adapters are named {spec.name!r}: one from "
            f"{other.distribution or 'an in-process registration'}, one from "
            f"{spec.distribution or 'an in-process registration'}; uninstall one of them"
        )
    for scheme in spec.schemes:
        for existing in specs.values():
            if scheme in existing.schemes:
                raise AdapterConflictError(
                    f"URL scheme {scheme!r} is claimed by adapter {existing.name!r} "
                    f"({existing.distribution or 'in-process'}) and adapter {spec.name!r} "
                    f"({spec.distribution or 'in-process'}); open one of them by name instead"
                )
    specs[spec.name] = spec


def adapter_specs() -> dict[str, AdapterSpec]:
    """Every installed and registered adapter, by name."""
    pm = plugin_manager()
    with _state.lock:
        if _state.specs is None:
            specs = _collect(pm)
            for spec in _state.manual.values():
                _add(specs, spec)
            _state.specs = specs
        return dict(_state.specs)


def register_adapter(spec: AdapterSpec) -> None:
    """Register an adapter in this process, without packaging (tests, scripts).

    Raises :class:`AdapterConflictError` if its name or a scheme is already taken.
    """
    current = adapter_specs()
    _add(current, spec)
    with _state.lock:
        _state.manual[spec.name] = spec
        _state.specs = current


def unregister_adapter(name: str) -> None:
    """Remove an adapter registered with :func:`register_adapter` (no-op otherwise)."""
    with _state.lock:
        if _state.manual.pop(name, None) is not None:
            _state.specs = None


def _installed_text() -> str:
    specs = adapter_specs()
    if not specs:
        return "no adapters are installed"
    rows = [
        f"{s.name} ({', '.join(s.schemes) or 'no URL scheme'}; {s.distribution or 'in-process'})"
        for s in sorted(specs.values(), key=lambda s: s.name)
    ]
    return "installed adapters: " + "; ".join(rows)


def get_adapter(name: str) -> AdapterSpec:
    """The adapter called ``name``; :class:`AdapterNotFoundError` listing the installed ones."""
    spec = adapter_specs().get(name)
    if spec is None:
        raise AdapterNotFoundError(f"no storage adapter named {name!r}; {_installed_text()}")
    return spec


def open_storage(url_or_name: str, **options: Any) -> StorageAdapter:
    """Build (without connecting) the adapter a URL or adapter name designates.

    >>> storage = open_storage("memory://")
    >>> type(storage).__name__
    'MemoryStorage'

    A URL (``sqlite:///path/to.db``, ``postgresql://...``) picks the adapter by scheme
    and is passed to it; a bare name (``"sqlite"``) picks by name and passes only
    ``options``. Call ``await storage.initialize()`` (the engine does) before use.
    """
    if "://" in url_or_name or url_or_name.endswith(":"):
        scheme = url_or_name.split(":", 1)[0].lower()
        base_scheme = scheme.split("+", 1)[0]
        for spec in adapter_specs().values():
            if scheme in spec.schemes or base_scheme in spec.schemes:
                return spec.factory(url=url_or_name, **options)
        raise AdapterNotFoundError(
            f"no storage adapter serves URL scheme {scheme!r} (from {url_or_name!r}); "
            f"{_installed_text()}"
        )
    return get_adapter(url_or_name).factory(url=None, **options)


def _reset_for_tests() -> None:
    """Forget the loaded plugins so the next call reloads entry points."""
    with _state.lock:
        _state.pm = None
        _state.specs = None
        _state.manual.clear()
        _state.origins.clear()


def hook_functions(name: str) -> list[Callable[..., Any]]:
    """The plugin implementations of lifecycle hook ``name``, each callable on its own."""
    caller = getattr(plugin_manager().hook, name)
    return [impl.function for impl in caller.get_hookimpls()]
