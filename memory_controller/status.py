"""The controller's status as JSON-ready data (``memctl status --json``), from values read by the facade."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .backend import Availability, Deployment
from .holders import HolderSource, holder_rows
from .types import DeviceSnapshot, Level, Recommendation, SystemSnapshot, to_jsonable


def status_data(snap: SystemSnapshot, rec: Recommendation, availability: Mapping[str, Availability],
                deployments: Sequence[Deployment], holders: Sequence[Any], level: Callable[[DeviceSnapshot], Level],
                sources: Sequence[HolderSource], history: dict, model_in_view: str | None = None) -> dict:
    """Devices, the recommendation, each backend's availability, what runs, who holds memory, the history's
    problems, and each other holder source's own status under ``holder_sources`` (also under its own id at
    the top level where that names nothing else, e.g. ``"ollama"``)."""
    backends = {bid: {"available": a.ok, "reason": a.reason.text if a.reason else None,
                      "reason_code": a.reason.code if a.reason else None} for bid, a in availability.items()}
    data = {
        "devices": [dict(to_jsonable(d), key=d.key, level=level(d).value) for d in snap.devices],
        "nvml": {"status": snap.nvml_status.value, "hint": snap.nvml_hint, "driver_version": snap.driver_version},
        "gpu_available": snap.has_gpu,
        "no_gpu_reason": None if snap.has_gpu else snap.nvml_hint,
        "backends": backends,
        "deployments": [to_jsonable(d) for d in deployments],
        "holders": holder_rows(holders) if snap.gpus else [],
        "history": history,
        "holder_sources": {src.source: holder_source_status(src) for src in sources},
        "recommendation": dict(to_jsonable(rec), model=model_in_view),  # the model the recommendation is for
    }
    return {**{sid: v for sid, v in data["holder_sources"].items() if sid not in data}, **data}


def holder_source_status(source: HolderSource) -> dict:
    """One other holder's status: whether its server answered, and what it has loaded."""
    models = source.loaded(max_age_s=5.0)
    err = source.last_error
    return {"host": source.base_url, "answered": models is not None,
            "error": err.message if models is None and err is not None else None,
            "models": [to_jsonable(m) for m in models or ()]}
