"""Operation-log lines back into records: every field checked (a log line is untrusted on read).

A line of the wrong shape (a list, a string, nesting thousands deep, ``params`` a list, ``started_at``
"nan", ``ended_at`` 1e400, steps of the wrong types) raises ValueError; the log skips it with a warning.
"""

from __future__ import annotations

import math
from typing import Any

from .types import OperationRecord, Outcome, StepRecord

_MAX_TIME_S = 1e11  # year 5138: a larger timestamp is not one




def _number(value: Any, what: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is not a number")
    v = float(value)
    if not math.isfinite(v) or not 0 <= v <= _MAX_TIME_S:
        raise ValueError(f"{what} is out of range")
    return v


def _text(value: Any, what: str, *, optional: bool = False, max_len: int = 100_000) -> str | None:
    if (value is None and optional) or (isinstance(value, str) and len(value) <= max_len):
        return value
    raise ValueError(f"{what} is not a string")


def _byte_count(value: Any, what: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"{what} is not a byte count")


def _memory(value: Any, what: str) -> dict[str, int | None]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return {str(k)[:40]: _byte_count(v, f"{what}.{k}") for k, v in value.items()}


def _outcome(value: Any, what: str) -> Outcome | None:
    if value is None or value == "":
        return None
    try:
        return Outcome(value)
    except ValueError:
        raise ValueError(f"{what} is not an outcome") from None


def _step(data: Any) -> StepRecord:
    if not isinstance(data, dict):
        raise ValueError("a step is not an object")
    outcome = _outcome(data.get("outcome"), "step outcome")
    if outcome is None:
        raise ValueError("a step has no outcome")
    return StepRecord(
        name=_text(data.get("name"), "step name", max_len=200) or "",
        outcome=outcome,
        duration_s=_number(data.get("duration_s"), "step duration_s") or 0.0,
        message=_text(data.get("message", ""), "step message") or "",
        memory_before_bytes=_byte_count(data.get("memory_before_bytes"), "step memory_before_bytes"),
        memory_after_bytes=_byte_count(data.get("memory_after_bytes"), "step memory_after_bytes"),
        code=_text(data.get("code", ""), "step code", max_len=100) or "",
        args=_scalar_args(data.get("args")),
    )


def _scalar_args(value: Any) -> dict[str, Any]:
    """A step's message arguments: at most 20 keys of short strings, finite numbers or booleans."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in list(value.items())[:20]:
        if isinstance(k, str) and len(k) <= 50 and (isinstance(v, (bool, int)) or (
                isinstance(v, float) and math.isfinite(v)) or (isinstance(v, str) and len(v) <= 500)):
            out[k] = v
    return out


def record_from_dict(data: Any) -> OperationRecord:
    """An :class:`OperationRecord` from one decoded line; raises ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise ValueError("params is not an object")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise ValueError("steps is not a list")
    return OperationRecord(
        op_id=_text(data.get("op_id"), "op_id", max_len=200) or "",
        kind=_text(data.get("kind"), "kind", max_len=100) or "",
        params=params,
        started_at=_number(data.get("started_at"), "started_at") or 0.0,
        ended_at=_number(data.get("ended_at"), "ended_at", optional=True),
        steps=[_step(s) for s in steps],
        outcome=_outcome(data.get("outcome"), "outcome"),
        error=_text(data.get("error"), "error", optional=True),
        memory_before=_memory(data.get("memory_before"), "memory_before"),
        memory_after=_memory(data.get("memory_after"), "memory_after"),
    )


# --------------------------------------------------------------------------- who runs an operation
