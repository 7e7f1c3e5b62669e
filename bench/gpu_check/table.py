"""Rows of the acceptance table, their verdicts, the rendering and the exit code. Pure: no I/O but ``print``."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from memory_controller.units import GIB, MIB


class Verdict(str, enum.Enum):
    PASS = "pass"
    FAIL = "FAIL"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class Row:
    check: str
    expected: str
    measured: str
    verdict: Verdict
    reason: str = ""  # why a row was not run (shown in the verdict column)

    @property
    def verdict_text(self) -> str:
        return f"not run: {self.reason}" if self.verdict is Verdict.NOT_RUN else self.verdict.value


def not_run(check: str, expected: str, reason: str) -> Row:
    return Row(check, expected, "—", Verdict.NOT_RUN, reason)


def verdict(ok: bool) -> Verdict:
    return Verdict.PASS if ok else Verdict.FAIL


def within(measured: float, expected: float, *, rel: float, abs_bytes: float = 0.0) -> bool:
    """``|measured - expected| <= max(rel * |expected|, abs_bytes)``."""
    return abs(measured - expected) <= max(rel * abs(expected), abs_bytes)


def covers_peak(estimate_bytes: int, peak_bytes: int, *, max_over: float = 0.15) -> bool:
    """The whole estimate holds the peak and is not more than ``max_over`` above it."""
    return peak_bytes > 0 and peak_bytes <= estimate_bytes <= peak_bytes * (1.0 + max_over)


def pct(measured: float, expected: float) -> str:
    """Signed difference of ``measured`` from ``expected`` in percent of ``expected``."""
    if not expected:
        return "n/a"
    return f"{(measured - expected) / expected * 100:+.2f}%"


def b(n: int | float | None) -> str:
    """Bytes for the table, finer than ``fmt_bytes``: ``3.092 GiB``, ``61.4 MiB``."""
    if n is None:
        return "—"
    if abs(n) >= GIB:
        return f"{n / GIB:.3f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def render(rows: Iterable[Row], title: str = "") -> str:
    rows = list(rows)
    head = ("check", "expected", "measured", "verdict")
    cells = [head] + [(r.check, r.expected, r.measured, r.verdict_text) for r in rows]
    widths = [min(max(len(c[i]) for c in cells), 70) for i in range(3)]
    lines = [title] if title else []
    for n, c in enumerate(cells):
        lines.append("  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    passed = sum(r.verdict is Verdict.PASS for r in rows)
    failed = sum(r.verdict is Verdict.FAIL for r in rows)
    skipped = sum(r.verdict is Verdict.NOT_RUN for r in rows)
    lines.append(f"{passed} passed, {failed} failed, {skipped} not run")
    return "\n".join(lines)


def exit_code(rows: Iterable[Row]) -> int:
    """1 when any check fell short, else 0 (rows not run do not fail the check)."""
    return 1 if any(r.verdict is Verdict.FAIL for r in rows) else 0
