"""The one codec: exact round-trips of persistable values, as tagged JSON.

Persistable values are ``dict`` with ``str`` keys, ``list``, ``str``, ``int``,
finite ``float``, ``bool``, ``None`` and ``datetime``. Whatever :func:`encode`
accepts, :func:`decode` returns equal and of the same type, so a replay after a
crash sees exactly what the first execution saw. Anything else raises
:class:`~reflow_core.errors.SerializationError` naming the offending path, before
any byte is written.

JSON cannot tell a ``datetime`` from a ``str``, so two single-key tag objects are
used: ``{"$datetime": "<isoformat>"}`` and ``{"$dict": {...}}``. The second wraps
any user dict that has a key starting with ``$``, which is why a user dict that
happens to look like a tag still round-trips as the same dict. JSON text (not
msgpack) keeps stored values readable and queryable in SQLite and PostgreSQL.

>>> from datetime import datetime, timezone
>>> value = {"when": datetime(2024, 5, 1, tzinfo=timezone.utc), "$dict": [1, 2.0]}
>>> decode(encode(value)) == value
True
>>> encode({"n": float("nan")})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
reflow_core.errors.SerializationError: $.n: float nan is not persistable (NaN and ...
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from typing import Any

import msgspec

from reflow_core.errors import SerializationError, ValidationError

__all__ = ["canonical", "check", "decode", "encode", "from_plain", "to_plain"]

_DATETIME_TAG = "$datetime"
_DICT_TAG = "$dict"
_json_encoder = msgspec.json.Encoder()
_canonical_encoder = msgspec.json.Encoder(order="sorted")
_json_decoder = msgspec.json.Decoder()


class _Reject(Exception):
    """Internal: carries a rejection up the walk, collecting the path on the way."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.segments: list[str] = []


def _describe(value: Any) -> str:
    kind = type(value)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    hints: dict[type, str] = {
        tuple: " (use a list)",
        set: " (use a sorted list)",
        frozenset: " (use a sorted list)",
        bytes: " (encode it, e.g. base64, into a str)",
    }
    return f"a value of type {name}{hints.get(kind, '')}"


def _needs_tags(value: Any) -> bool:
    """Validate ``value``; return True if it holds datetimes or ``$``-keys that need tagging."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return False
    if kind is float:
        if not math.isfinite(value):
            raise _Reject(
                f"float {value!r} is not persistable (NaN and infinities have no exact stored form)"
            )
        return False
    if kind is list:
        tagged = False
        for index, item in enumerate(value):
            try:
                tagged = _needs_tags(item) or tagged
            except _Reject as reject:
                reject.segments.append(f"[{index}]")
                raise
        return tagged
    if kind is dict:
        tagged = False
        for key, item in value.items():
            if type(key) is not str:
                raise _Reject(f"dict key {key!r} is not a str (JSON object keys must be str)")
            if key.startswith("$"):
                tagged = True
            try:
                tagged = _needs_tags(item) or tagged
            except _Reject as reject:
                reject.segments.append(f".{key}" if key.isidentifier() else f"[{key!r}]")
                raise
        return tagged
    if kind is datetime:
        return True
    raise _Reject(f"{_describe(value)} is not persistable")


def _tag(value: Any) -> Any:
    kind = type(value)
    if kind is list:
        return [_tag(item) for item in value]
    if kind is dict:
        body = {key: _tag(item) for key, item in value.items()}
        if any(key.startswith("$") for key in value):
            return {_DICT_TAG: body}
        return body
    if kind is datetime:
        return {_DATETIME_TAG: value.isoformat()}
    return value


def _untag(value: Any) -> Any:
    kind = type(value)
    if kind is list:
        return [_untag(item) for item in value]
    if kind is dict:
        if len(value) == 1:
            if _DATETIME_TAG in value:
                return datetime.fromisoformat(value[_DATETIME_TAG])
            if _DICT_TAG in value:
                return {key: _untag(item) for key, item in value[_DICT_TAG].items()}
        return {key: _untag(item) for key, item in value.items()}
    return value


def _rejection(reject: _Reject) -> SerializationError:
    path = "$" + "".join(reversed(reject.segments))
    return SerializationError(f"{path}: {reject.reason}", path=path)


def check(value: Any) -> None:
    """Raise :class:`SerializationError` if ``value`` is not persistable; write nothing."""
    encode(value)


def encode(value: Any) -> bytes:
    """Encode a persistable value as tagged JSON bytes.

    Raises :class:`SerializationError` naming the path of the first part that would not
    come back exactly.
    """
    try:
        tagged = _needs_tags(value)
    except _Reject as reject:
        raise _rejection(reject) from None
    except RecursionError:
        raise SerializationError("$: value is nested too deeply to persist", path="$") from None
    try:
        return _json_encoder.encode(_tag(value) if tagged else value)
    except (msgspec.EncodeError, UnicodeEncodeError, OverflowError) as exc:
        # Only strings the encoder cannot write (lone surrogates) get here.
        raise SerializationError(f"$: value cannot be written as UTF-8 JSON: {exc}") from exc


def decode(data: bytes | str | memoryview) -> Any:
    """Decode bytes written by :func:`encode` back to an equal value of the same types."""
    if isinstance(data, memoryview):
        data = bytes(data)
    value = _json_decoder.decode(data)
    marker = '"$' if isinstance(data, str) else b'"$'
    if marker in data:  # type: ignore[operator]
        return _untag(value)
    return value


def canonical(value: Any) -> bytes:
    """Key-order-independent encoding: equal values give equal bytes, and ``1 != 1.0 != True``."""
    try:
        tagged = _needs_tags(value)
    except _Reject as reject:
        raise _rejection(reject) from None
    return _canonical_encoder.encode(_tag(value) if tagged else value)


def _is_declared(declared: Any) -> bool:
    return declared is not None and declared is not Any


def to_plain(value: Any, declared: Any = None) -> Any:
    """Turn a value of a declared type (Struct, dataclass, TypedDict...) into plain data.

    With a declared type, instances (also nested ones) become dicts and lists, keeping
    ``datetime`` as is, so :func:`from_plain` rebuilds them exactly. Without one, plain
    values pass through and a Struct or dataclass instance is refused: it could not come
    back as itself.
    """
    if _is_declared(declared):
        return msgspec.to_builtins(value, builtin_types=(datetime,))
    if not _is_plain(value):
        raise SerializationError(
            f"$: {_describe(value)} is not persistable unless its type is declared "
            "(annotate the step's return type or the workflow's input type)"
        )
    return value


def from_plain(value: Any, declared: Any = None) -> Any:
    """Rebuild a value of ``declared`` type from plain data; plain data passes through."""
    if not _is_declared(declared):
        return value
    try:
        return msgspec.convert(value, declared, builtin_types=(datetime,))
    except msgspec.ValidationError as exc:
        raise ValidationError(f"value does not match {_type_name(declared)}: {exc}") from exc


def validate(value: Any, declared: Any) -> Any:
    """Check ``value`` against ``declared`` and return it as an instance of that type.

    Raises :class:`ValidationError` with msgspec's path-carrying message on mismatch.
    """
    if not _is_declared(declared):
        return value
    if isinstance(declared, type) and isinstance(value, declared):
        return value
    plain = msgspec.to_builtins(value, builtin_types=(datetime,)) if not _is_plain(value) else value
    return from_plain(plain, declared)


def _is_plain(value: Any) -> bool:
    return not (
        isinstance(value, msgspec.Struct)
        or (dataclasses.is_dataclass(value) and not isinstance(value, type))
    )


def _type_name(declared: Any) -> str:
    return getattr(declared, "__qualname__", None) or repr(declared)
