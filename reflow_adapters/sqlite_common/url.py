"""URLs of the SQLite adapters, in SQLAlchemy's form.

``<scheme>:///relative/path.db``, ``<scheme>:////absolute/path.db``, and ``<scheme>://``
or ``<scheme>:///:memory:`` for a private in-memory database. Query parameters set
constructor options: ``?synchronous=NORMAL&busy_timeout_ms=10000&watch_ms=5``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from reflow_core.errors import ConfigError

__all__ = ["parse_url", "storage_arguments"]

_OPTIONS = {"synchronous": str, "busy_timeout_ms": int, "watch_ms": int}


def parse_url(url: str, scheme: str) -> tuple[str, dict[str, Any]]:
    """Split ``url`` into a path (``":memory:"`` if none) and constructor options.

    Raises :class:`ConfigError` naming what is wrong and showing the accepted forms.
    """
    forms = f"{scheme}:///relative.db, {scheme}:////absolute/path.db or {scheme}://"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"invalid URL {url!r}: {exc}; expected {forms}") from None
    if parts.scheme.lower() != scheme:
        raise ConfigError(f"URL {url!r} does not use scheme {scheme!r}; expected {forms}")
    if parts.netloc:
        raise ConfigError(
            f"URL {url!r} names a host ({parts.netloc!r}); a {scheme} URL holds only a path, "
            f"so use three slashes: {forms}"
        )
    if parts.fragment:
        raise ConfigError(f"URL {url!r} has a fragment; expected {forms}")
    if parts.path in ("", "/:memory:"):
        path = ":memory:"
    elif parts.path == "/":
        raise ConfigError(f"URL {url!r} has an empty path; expected {forms}")
    else:
        path = unquote(parts.path[1:])
    options: dict[str, Any] = {}
    for key, raw in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        kind = _OPTIONS.get(key)
        if kind is None:
            known = ", ".join(sorted(_OPTIONS))
            raise ConfigError(f"URL {url!r} has unknown option {key!r}; known options: {known}")
        try:
            options[key] = kind(raw)
        except ValueError:
            raise ConfigError(
                f"URL {url!r}: option {key}={raw!r} is not a valid {kind.__name__}"
            ) from None
    return path, options


def storage_arguments(
    url: str | None, scheme: str, options: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The ``(path, keyword arguments)`` an adapter factory passes to its constructor.

    ``url`` (if given) supplies the path and URL options; ``options`` are the factory's
    keyword options (``path``, ``clock``, ``busy_timeout_ms``, ``synchronous``) and win
    over the URL. String values are converted, since command-line options arrive as text.
    """
    options = dict(options)
    if url is not None:
        if "path" in options:
            raise ConfigError(f"give a {scheme} URL or a path option, not both")
        path, merged = parse_url(url, scheme)
    else:
        path, merged = str(options.pop("path", ":memory:")), {}
    clock = options.pop("clock", None)
    for key, raw in options.items():
        kind = _OPTIONS.get(key)
        if kind is None:
            known = ", ".join(sorted([*_OPTIONS, "clock", "path"]))
            raise ConfigError(f"unknown {scheme} storage option {key!r}; known options: {known}")
        try:
            merged[key] = kind(raw)
        except ValueError:
            raise ConfigError(
                f"{scheme} option {key}={raw!r} is not a valid {kind.__name__}"
            ) from None
    if clock is not None:
        merged["clock"] = clock
    return path, merged
