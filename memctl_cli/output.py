"""What every memctl command prints the same way: errors (message and hint on stderr; with ``--json``
also the error as JSON on stdout), plain-text tables, durations."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from memory_controller.errors import MemctlError
from memory_controller.units import fmt_duration as fmt_duration  # the one duration formatter


def print_error(exc: MemctlError, as_json: bool = False) -> None:
    """``error: …`` and ``hint: …`` on stderr; with ``as_json`` the error's dict on stdout first (stdout
    stays machine-readable)."""
    if as_json:
        print(json.dumps(exc.to_dict(), ensure_ascii=False, indent=2))
    print(f"error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks; ``rows[0]`` is the header."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


