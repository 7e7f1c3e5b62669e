"""Measured size against the estimate, per model: kept after each load, used the next time.

``state_dir/ollama-calibration.json``: ``{model: {"estimated": bytes, "measured": bytes, "num_ctx": n,
"at": unix time}}``. The difference (``measured - estimated``, what ``/api/ps`` said minus what the
formulas said) is added to the next estimate of that model. The file is read only when it is a regular
file of at most 1 MiB; a damaged one is ignored (and replaced at the next load), never trusted.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from memory_controller.errors import CorruptDataError
from memory_controller.safejson import loads_bounded

FILE_NAME = "ollama-calibration.json"
MAX_BYTES = 1024 * 1024
MAX_MODELS = 1000


class Calibration:
    def __init__(self, state_dir: str | os.PathLike[str] | None) -> None:
        self.path = Path(state_dir) / FILE_NAME if state_dir else None
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
        try:
            st = os.lstat(self.path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
                return {}
            with open(self.path, "rb") as fh:
                data = loads_bounded(fh.read(MAX_BYTES + 1), what=FILE_NAME, max_bytes=MAX_BYTES, expect=dict)
        except (OSError, CorruptDataError):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)}

    def entry(self, model: str) -> dict[str, Any] | None:
        e = self._read().get(model)
        if not e:
            return None
        est, meas = e.get("estimated"), e.get("measured")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (est, meas)):
            return None
        return e

    def delta(self, model: str) -> int:
        """Bytes to add to the next estimate of ``model`` (0 when never measured)."""
        e = self.entry(model)
        if e is None:
            return 0
        d = int(e["measured"]) - int(e["estimated"])
        return max(-int(e["estimated"]) // 2, min(d, int(e["estimated"])))  # a wild reading is bounded

    def record(self, model: str, estimated: int, measured: int, num_ctx: int) -> None:
        if self.path is None or estimated <= 0 or measured <= 0:
            return
        with self._lock:
            data = self._read()
            data[model] = {"estimated": int(estimated), "measured": int(measured), "num_ctx": int(num_ctx),
                           "at": round(time.time(), 1)}
            if len(data) > MAX_MODELS:
                for k in sorted(data, key=lambda k: data[k].get("at", 0))[: len(data) - MAX_MODELS]:
                    data.pop(k)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1))
                os.replace(tmp, self.path)
            except OSError:
                pass  # calibration is an improvement, never a reason to fail a load
