"""Byte/unit helpers: the one place that converts bytes to GiB and back."""

from __future__ import annotations

GIB = 1024**3
MIB = 1024**2


def gib_to_bytes(gib: float) -> int:
    """Convert GiB (may be fractional) to a whole number of bytes."""
    return int(round(gib * GIB))


def bytes_to_gib(n_bytes: int | float | None) -> float | None:
    """Convert bytes to GiB; ``None`` stays ``None``."""
    if n_bytes is None:
        return None
    return n_bytes / GIB


def fmt_bytes(n_bytes: int | float | None) -> str:
    """Human-readable size: ``1.50 GiB``, ``512 MiB``, ``—`` for unknown."""
    if n_bytes is None:
        return "—"
    sign = "-" if n_bytes < 0 else ""
    n = abs(n_bytes)
    if n >= GIB:
        return f"{sign}{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{sign}{n / MIB:.0f} MiB"
    if n >= 1024:
        return f"{sign}{n / 1024:.0f} KiB"
    return f"{sign}{int(n)} B"


def fmt_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s``; ``—`` for unknown (the UI translates its own units from these parts)."""
    if seconds is None:
        return "—"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def escape_text(text: str | None, limit: int = 200) -> str:
    """Text from outside (labels, command lines) made safe for one line of output: control characters
    shown as escapes (no forged lines, no terminal sequences), cut at ``limit`` characters."""
    if text is None:
        return "—"
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    return out if len(out) <= limit else out[: limit - 1] + "…"
