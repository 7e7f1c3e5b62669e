"""The controller's status as JSON-ready data (mixed into MemoryController): ``memctl status --json``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .holders import holder_rows
from .types import to_jsonable

if TYPE_CHECKING:
    from .controller import MemoryController


class StatusMixin:
    def status(self: MemoryController) -> dict:
        """Devices, the recommendation, each backend's availability and what runs, as JSON-ready data."""
        snap = self.devices()
        model = self.model_in_view()
        rec = self.recommend_in_view(snapshot=snap)
        backends = {}
        for bid in self.registry.ids():
            a = self.availability(bid, snap)
            backends[bid] = {"available": a.ok, "reason": a.reason.text if a.reason else None,
                             "reason_code": a.reason.code if a.reason else None}
        vllm = backends.get("vllm", {"available": False, "reason": "not configured"})
        return {
            "devices": [dict(to_jsonable(d), key=d.key, level=self.level(d).value) for d in snap.devices],
            "nvml": {"status": snap.nvml_status.value, "hint": snap.nvml_hint, "driver_version": snap.driver_version},
            "gpu_available": snap.has_gpu,
            "no_gpu_reason": None if snap.has_gpu else snap.nvml_hint,
            "vllm": {"available": vllm["available"], "reason": vllm["reason"]},
            "backends": backends,
            "deployments": [to_jsonable(d) for d in self.deployments()],
            "holders": holder_rows(self.holders(snap)) if snap.gpus else [],
            "ollama": self._ollama_status(),
            "recommendation": dict(to_jsonable(rec), model=model),
            # the operation history: writes that failed since the last one that worked, and what reading skipped
            "history": {"write_errors": self.log_write_errors(), "warnings": list(self.log_warnings)},
        }

    def _ollama_status(self: MemoryController) -> dict:
        client = self.ollama()
        if client is None:
            return {"answered": False, "error": "the Ollama client is not available", "models": []}
        models = client.loaded(max_age_s=5.0)
        err = getattr(client, "last_error", None)
        return {"host": getattr(client, "base_url", self.settings.ollama_host), "answered": models is not None,
                "error": err.message if models is None and err is not None else None,
                "models": [to_jsonable(m) for m in models or ()]}
