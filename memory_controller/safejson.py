"""JSON from untrusted places (files on disk, container labels, HTTP bodies), parsed with limits.

``json.loads`` of a document nested thousands deep raises ``RecursionError`` (or worse); a huge
document costs memory. Everything memctl reads from outside goes through :func:`loads_bounded`,
which raises :class:`~memory_controller.errors.CorruptDataError` with what was wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import CorruptDataError

MAX_DEPTH = 64
MAX_BYTES = 16 * 1024 * 1024


def _depth_ok(text: str, max_depth: int) -> bool:
    """Nesting of [] and {} outside strings stays within ``max_depth`` (a linear scan, no recursion)."""
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def loads_bounded(data: str | bytes, *, what: str, max_bytes: int = MAX_BYTES,
                  max_depth: int = MAX_DEPTH, expect: type | tuple[type, ...] | None = None) -> Any:
    """Parse ``data`` as JSON with size and depth limits; NaN/Infinity and non-finite floats
    (``1e400``) are refused. ``expect`` checks the top-level type (e.g. ``dict``).

    Raises CorruptDataError naming ``what`` (e.g. "config.json of org/name", "label memctl.profile").
    """
    size = len(data)
    if size > max_bytes:
        raise CorruptDataError(f"{what}: {size} bytes is over the {max_bytes}-byte limit",
                               "the data is corrupt or not what memctl expects")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptDataError(f"{what}: not UTF-8 ({exc.reason})", "the data is corrupt") from None
    else:
        text = data
    if not _depth_ok(text, max_depth):
        raise CorruptDataError(f"{what}: nested deeper than {max_depth} levels",
                               "the data is corrupt or hostile; it is ignored")

    def parse_float(s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            raise ValueError(f"number {s[:20]} is out of range")
        return v

    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=parse_float)
    except (ValueError, RecursionError) as exc:
        raise CorruptDataError(f"{what}: not valid JSON ({str(exc)[:200]})", "the data is corrupt") from None
    if expect is not None and not isinstance(value, expect):
        names = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
        raise CorruptDataError(f"{what}: expected a JSON {names}, got {type(value).__name__}",
                               "the data is corrupt or not what memctl expects")
    return value
