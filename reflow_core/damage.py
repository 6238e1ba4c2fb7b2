"""Reading stored values that may be damaged: decode, or stand a :class:`DamagedValue` in.

Adapters read every stored value (run input and output, step output, event payload,
schedule input) through :func:`decode_stored`, so a row that cannot be decoded — damaged
on disk, edited by hand, or written by a newer version — comes back as a marker instead
of an exception. A claim still returns the run (and the engine fails that run, naming
what was wrong); listing and ``reflow runs show`` still work and show the damage.

>>> decode_stored('{"a": 1}')
{'a': 1}
>>> decode_stored('{"a": ')  # doctest: +ELLIPSIS
DamagedValue(error='...', stored='{"a": ')
"""

from __future__ import annotations

from typing import Any

from reflow_core import codec
from reflow_core.types import DamagedValue

__all__ = ["PREVIEW_CHARS", "decode_stored"]

PREVIEW_CHARS = 200
"""How much of a damaged value's stored text the marker keeps."""


def decode_stored(data: bytes | str | memoryview) -> Any:
    """Decode a stored value; a :class:`DamagedValue` if it cannot be decoded."""
    try:
        return codec.decode(data)
    except Exception as exc:  # any failure means the same thing: this value is damaged
        return DamagedValue(error=f"{type(exc).__name__}: {exc}", stored=_preview(data))


def _preview(data: bytes | str | memoryview) -> str:
    if isinstance(data, str):
        return data[:PREVIEW_CHARS]
    raw = bytes(data[: PREVIEW_CHARS * 4])
    return raw.decode("utf-8", errors="replace")[:PREVIEW_CHARS]
