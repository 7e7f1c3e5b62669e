"""Ollama as a serving backend: the person's own models, at the largest context that stays on the GPU.

* Models: ``/api/tags`` (installed), ``/api/show`` (``model_info``, ``capabilities``), the GGUF blob
  when the models folder is readable (gguf_spec.py). Each is a :class:`CachedModel` with
  ``source="ollama"`` and ``path="ollama://<host>/<name>"``; the core sizes it through the sizer this
  backend registers for that prefix (memory_controller.estimate.register_sizer).
* A start is all or nothing: a derived tag ``<model>-memctl-<ctx>`` created with ``/api/create``
  (``from`` + ``parameters: {num_ctx}``), loaded with ``keep_alive``, then verified with ``/api/ps``:
  ``context_length == num_ctx`` and, on a GPU, ``size_vram == size``. Anything else (a spill to the CPU,
  a refusal, Ollama dying mid-load) unloads it, deletes the tag it created and raises; the measured size
  is kept as calibration either way.
* What runs: ``/api/ps`` entries whose name is a derived tag. The other models Ollama holds stay
  "other holders" (:attr:`OllamaBackend.holder_client`), as before.
* Serving: a deployment's ``endpoint`` is Ollama's OpenAI path (``<host>/v1``) and its
  ``served_name`` the derived tag: the server's generic proxy forwards there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from memory_controller import estimate as est
from memory_controller.backend import (
    Availability,
    BackendBase,
    Capabilities,
    Claim,
    Deployment,
    DeploymentState,
    ReleaseReport,
)
from memory_controller.errors import (
    CorruptDataError,
    InsufficientMemoryError,
    MemctlError,
    ModelLoadError,
    OperationCancelledError,
)
from memory_controller.types import (
    CachedModel,
    MemoryEstimate,
    Message,
    Outcome,
    Precision,
    Profile,
    ProgressCallback,
    ProgressEvent,
    SystemSnapshot,
    msg,
)
from memory_controller.units import escape_text, fmt_bytes

from . import sizing
from .calibration import Calibration
from .client import OllamaClient, OllamaError, OllamaModel, OllamaUnavailableError, validate_model_name
from .gguf_spec import GgufSpec, models_dirs, spec_from_folder, spec_from_metadata

BACKEND_ID = "ollama"
DERIVED = "-memctl-"
_DERIVED_RE = re.compile(r"^(?P<base>.+)-memctl-(?P<ctx>\d+k?)$")
KEEP_ALIVE = "30m"  # Ollama unloads it by itself after this long idle; memctl serve may unload sooner
INFO_TTL_S = 600.0  # /api/show of one digest does not change; a new pull changes the digest
MODELS_TTL_S = 5.0


def derived_name(model: str, num_ctx: int) -> str:
    """``gpt-oss:20b`` at 32768 -> ``gpt-oss:20b-memctl-32k`` (``llama3`` -> ``llama3:latest-memctl-32k``)."""
    name = model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"
    return validate_model_name(f"{name}{DERIVED}{sizing.tag_suffix(num_ctx)}")


def base_of(name: str) -> str | None:
    """The model a derived tag was made from, or None for a name memctl did not make."""
    m = _DERIVED_RE.match(name)
    return m.group("base") if m else None


@dataclass(frozen=True)
class ModelInfo:
    """One installed model as the backend sees it."""

    name: str
    size_bytes: int
    digest: str
    family: str | None
    quantization: str | None
    parameter_size: str | None
    capabilities: tuple[str, ...]
    spec: GgufSpec | None
    spec_error: str | None = None

    @property
    def tools(self) -> bool:
        return "tools" in self.capabilities

    @property
    def trained_context(self) -> int | None:
        return self.spec.context_length if self.spec else None


def _env_kv(env: dict[str, str] | os._Environ) -> sizing.KvConfig:
    t = (env.get("OLLAMA_KV_CACHE_TYPE") or "f16").strip().lower()
    fa = (env.get("OLLAMA_FLASH_ATTENTION") or "").strip().lower() in ("1", "true", "yes", "on")
    try:
        par = int(env.get("OLLAMA_NUM_PARALLEL") or 1)
    except ValueError:
        par = 1
    try:
        return sizing.KvConfig(t if t in sizing.KV_TYPES else "f16", fa, max(1, min(par, 64)))
    except ValueError:
        return sizing.KvConfig()


class OllamaBackend(BackendBase):
    """See the module docstring. ``client``: an :class:`OllamaClient`; ``kv``: the server's cache
    settings (default: Ollama's own environment variables, as the server on this machine reads them)."""

    id = BACKEND_ID
    capabilities = Capabilities(
        precisions=(Precision.FP16,), devices=("cuda", "cpu"), fit_ladder=(), serves_http=True,
        generates_in_process=False, needs_gpu=False, label="Ollama", own_models_only=True)

    def __init__(self, settings: Any, probe: Any, client: OllamaClient, *, kv: sizing.KvConfig | None = None,
                 dirs: list | None = None, keep_alive: str | int = KEEP_ALIVE,
                 sleep: Callable[[float], None] = time.sleep, emergency_unload: bool = True) -> None:
        self.settings = settings
        self.emergency_unload_enabled = emergency_unload
        self.probe = probe
        self.client = client
        self.kv = kv or _env_kv(os.environ)
        self.dirs = dirs if dirs is not None else models_dirs()
        self.keep_alive = keep_alive
        self.calibration = Calibration(getattr(settings, "state_dir", None))
        self.prefix = f"ollama://{client.base_url.split('://', 1)[-1]}/"
        self._lock = threading.Lock()
        self._info: dict[str, tuple[float, str, ModelInfo]] = {}
        self._models: tuple[float, list[ModelInfo]] | None = None
        self._avail: tuple[float, Availability] | None = None
        self._sleep = sleep
        est.register_sizer(self.prefix, self)

    @staticmethod
    def derived_name(model: str, num_ctx: int) -> str:
        return derived_name(model, num_ctx)

    # ------------------------------------------------------------------ another holder
    @property
    def holder_client(self) -> HolderView:
        """Ollama as another holder of memory: its models that are not memctl's deployments."""
        return HolderView(self.client, unloads_in_emergency=self.emergency_unload_enabled)

    # ------------------------------------------------------------------ models
    def installed(self, *, fresh: bool = False) -> list[ModelInfo]:
        """Installed models (not memctl's derived tags), with metadata; raises OllamaError when Ollama
        does not answer."""
        with self._lock:
            cached = self._models
        if not fresh and cached is not None and time.monotonic() - cached[0] < MODELS_TTL_S:
            return cached[1]
        out = []
        for item in self.client.tags():
            name = str(item.get("name") or item.get("model"))
            if base_of(name) is not None:
                continue
            out.append(self._describe(name, item))
        with self._lock:
            self._models = (time.monotonic(), out)
        return out

    def _describe(self, name: str, tag: dict[str, Any]) -> ModelInfo:
        digest = str(tag.get("digest") or "")[:80]
        now = time.monotonic()
        with self._lock:
            hit = self._info.get(name)
        if hit is not None and hit[1] == digest and now - hit[0] < INFO_TTL_S:
            return hit[2]
        size = tag.get("size") if isinstance(tag.get("size"), int) else 0
        try:
            show = self.client.show(name)
        except OllamaError as exc:  # one model Ollama cannot describe does not hide the others
            if isinstance(exc, OllamaUnavailableError):
                raise
            show = {"model_info": None, "error": exc.message}
        details = show.get("details") if isinstance(show.get("details"), dict) else {}
        caps = show.get("capabilities")
        caps = tuple(str(c)[:32] for c in caps if isinstance(c, str)) if isinstance(caps, list) else ()
        quant = details.get("quantization_level") if isinstance(details.get("quantization_level"), str) else None
        spec, error = spec_from_folder(name, self.dirs), None
        if spec is None:
            info = show.get("model_info")
            try:
                if not isinstance(info, dict):
                    raise CorruptDataError(str(show.get("error") or "Ollama /api/show gave no model_info"),
                                           "update Ollama")
                # without the blobs, /api/tags' size (every layer: weights and projector) stands for the weights
                spec = spec_from_metadata(info, source="api_show", weights_bytes=size, quantization=quant)
            except CorruptDataError as exc:
                error = exc.message
        elif quant:
            spec = dataclasses.replace(spec, quantization=quant)
        mi = ModelInfo(name=escape_text(name, 400), size_bytes=int(size or 0), digest=digest,
                       family=escape_text(str(details.get("family")), 64) if details.get("family") else None,
                       quantization=escape_text(quant, 32) if quant else None,
                       parameter_size=escape_text(str(details.get("parameter_size")), 32)
                       if details.get("parameter_size") else None, capabilities=caps, spec=spec, spec_error=error)
        with self._lock:
            self._info[name] = (now, digest, mi)
        return mi

    def info(self, name: str) -> ModelInfo:
        name = validate_model_name(name)
        for m in self.installed():
            if m.name == name or m.name == f"{name}:latest":
                return m
        raise ModelLoadError(f"{escape_text(name)} is not installed in Ollama at {self.client.base_url}",
                             "pull it first (ollama pull NAME) or pick one `memctl ollama fit` lists",
                             code="ollama.not_installed", args={"model": escape_text(name)})

    def cached(self, m: ModelInfo) -> CachedModel:
        return CachedModel(model_id=m.name, revision=m.digest[:12] or None, size_on_disk_bytes=m.size_bytes,
                           has_safetensors=False, has_config=m.spec is not None, architecture=m.family,
                           path=self.prefix + m.name, source=BACKEND_ID)

    def list_models(self) -> list[CachedModel]:
        """The catalog's share of this backend: installed models; [] when Ollama does not answer."""
        try:
            return [self.cached(m) for m in self.installed()]
        except MemctlError:
            return []

    def resolve_model(self, model_id: str) -> CachedModel | None:
        """The model for an Ollama name, or None when it is not one of Ollama's (or Ollama is down)."""
        try:
            return self.cached(self.info(model_id))
        except MemctlError:
            return None

    def _name_of(self, path_or_model: CachedModel | str) -> str:
        path = path_or_model.path if isinstance(path_or_model, CachedModel) else str(path_or_model)
        if not path.startswith(self.prefix):
            raise ModelLoadError(f"{escape_text(path)} is not an Ollama model of {self.client.base_url}",
                                 "choose a model from Ollama's list", code="ollama.not_ollama_model")
        return path[len(self.prefix):]

    def _spec(self, model: CachedModel | str) -> GgufSpec:
        m = self.info(self._name_of(model))
        if m.spec is None:
            raise ModelLoadError(f"{m.name}: {m.spec_error or 'no GGUF metadata'}",
                                 "update Ollama, or make its models folder readable (OLLAMA_MODELS)",
                                 code="ollama.no_metadata", args={"model": m.name})
        return m.spec

    # ------------------------------------------------------------------ the sizer (estimate registry)
    def estimate(self, model: CachedModel, profile: Profile, settings: Any = None) -> MemoryEstimate:
        spec = self._spec(model)
        gpu = profile.device != "cpu"
        s = sizing.size(spec, profile.context_tokens, self._kv(profile), gpu=gpu,
                        calibration_bytes=self.calibration.delta(model.model_id))
        notes = [f"GGUF {spec.quantization or ''} from the {'model blob' if spec.source == 'gguf_blob' else '/api/show'}".replace("  ", " "),
                 f"KV {self.kv.k_type}/{self.kv.v_type} × {self.kv.parallel} slot(s)"]
        if s.calibration_bytes:
            notes.append(f"calibrated by {fmt_bytes(s.calibration_bytes)} (measured at the last load)")
        return MemoryEstimate(model_id=model.model_id, profile=profile, weights_bytes=s.weights_bytes,
                              kv_cache_bytes=s.kv_bytes, activation_bytes=s.graph_bytes + s.calibration_bytes,
                              cuda_context_bytes=s.reserve_bytes, total_bytes=s.total_bytes, parameters=0,
                              source=spec.source, notes=tuple(notes))

    def _kv(self, profile: Profile) -> sizing.KvConfig:
        """The server's cache settings: parallel slots are Ollama's OLLAMA_NUM_PARALLEL (server-wide, not
        per model), so a profile's batch does not change what a load takes."""
        return self.kv

    def max_context_that_fits(self, model: CachedModel, free_bytes: int, profile: Profile, settings: Any = None) -> int:
        spec = self._spec(model)
        return sizing.max_context(spec, free_bytes, self._kv(profile), gpu=profile.device != "cpu",
                                  calibration_bytes=self.calibration.delta(model.model_id))

    def read_model_spec(self, path: str) -> est.ModelSpec:
        spec = self._spec(str(path))
        kvh = max(spec.head_count_kv) if spec.head_count_kv else None
        return est.ModelSpec(path=str(path), architecture=spec.architecture, model_type=spec.architecture,
                             num_layers=spec.block_count, num_attention_heads=spec.head_count, num_kv_heads=kvh,
                             head_dim=spec.key_length, hidden_size=spec.embedding_length, vocab_size=spec.vocab_size,
                             tie_word_embeddings=False, max_position_embeddings=spec.context_length, stored_dtype=None,
                             has_rope=True, prequantized=spec.quantization, source=spec.source, tensors=(),
                             weight_files=())

    # ------------------------------------------------------------------ Backend protocol
    def availability(self, snapshot: SystemSnapshot | None = None) -> Availability:
        with self._lock:
            hit = self._avail
        if hit is not None and time.monotonic() - hit[0] < 5.0:
            return hit[1]
        try:
            version = self.client.version()
            a = Availability(True, msg("backend.ollama_ok", f"Ollama {version} at {self.client.base_url}",
                                       version=version, host=self.client.base_url))
        except OllamaError as exc:
            # refused connection: the server is down, so none of its runners hold a model ("not running");
            # a slow or odd answer: it may still hold some (plain "unavailable")
            code = "backend.not_running" if isinstance(exc, OllamaUnavailableError) else "backend.unavailable"
            a = Availability(False, msg(code, exc.message, backend=BACKEND_ID, host=self.client.base_url))
        with self._lock:
            self._avail = (time.monotonic(), a)
        return a

    def claim(self, model: CachedModel, profile: Profile, estimate: MemoryEstimate, snapshot: SystemSnapshot) -> Claim:
        if profile.device == "cpu" or not snapshot.has_gpu:
            return Claim({"host": estimate.total_bytes}, detail={"num_ctx": profile.context_tokens})
        gpus = [g for g in snapshot.gpus if g.free_bytes is not None]
        target = (snapshot.device(f"gpu:{profile.gpu_ids[0]}") if profile.gpu_ids else None) or (
            max(gpus, key=lambda g: g.free_bytes or 0) if gpus else snapshot.gpus[0])
        notes: list[Message] = []
        if self.supports_tools(model) is False:
            notes.append(msg("ollama.no_tools", f"{model.model_id} has no tool calling (Ollama's capabilities): coding "
                             "agents (Roo, Kilo, Continue) need it; a request with tools gets 400",
                             model=model.model_id))
        cal = self.calibration.entry(model.model_id)
        if cal is not None:
            delta = self.calibration.delta(model.model_id)
            notes.append(msg("ollama.calibrated",
                             f"estimate corrected by {'+' if delta >= 0 else '-'}{fmt_bytes(abs(delta))}: Ollama took "
                             f"{fmt_bytes(cal['measured'])} where memctl estimated {fmt_bytes(cal['estimated'])} "
                             f"(num_ctx {cal.get('num_ctx')}) at the last load",
                             delta=f"{'+' if delta >= 0 else '-'}{fmt_bytes(abs(delta))}", measured=fmt_bytes(cal["measured"]),
                             estimated=fmt_bytes(cal["estimated"]), tokens=cal.get("num_ctx")))
        want = int(getattr(self.settings, "ide_min_context", 32768) or 32768)
        if profile.context_tokens < want and target.free_bytes is not None:
            try:
                advice = sizing.quantised_kv_advice(self._spec(model), target.free_bytes, self._kv(profile), want,
                                                    calibration_bytes=self.calibration.delta(model.model_id))
            except MemctlError:
                advice = None
            if advice is not None:
                notes.append(kv_advice_message(advice, want))
        return Claim({target.key: estimate.total_bytes}, notes=tuple(notes),
                     detail={"num_ctx": profile.context_tokens})

    def check_model(self, model: CachedModel, profile: Profile) -> tuple[Message, ...]:
        if model.source != BACKEND_ID or not model.path.startswith(self.prefix):
            return (msg("ollama.not_ollama_model", f"Ollama serves only its own models; {model.model_id} is not one",
                        model=model.model_id),)
        try:
            self._spec(model)
        except MemctlError as exc:
            return (msg(exc.code, exc.message, model=model.model_id),)
        return ()

    def supports_tools(self, model: CachedModel) -> bool | None:
        """``tools`` in ``/api/show``'s capabilities (None when Ollama cannot be asked)."""
        info = self.model_info(model.model_id)
        return None if info is None else info.tools

    def model_info(self, model_id: str) -> ModelInfo | None:
        try:
            return self.info(model_id)
        except MemctlError:
            return None

    def _deployment(self, m: OllamaModel, snap: SystemSnapshot | None) -> Deployment | None:
        base = base_of(m.name)
        if base is None:
            return None
        on_gpu = m.size_vram > 0
        gpu_key = "gpu:0"
        if snap is not None and snap.gpus:
            gpu_key = snap.gpus[0].key
        memory = {gpu_key: m.size_vram} if on_gpu else {}
        if m.size > m.size_vram:
            memory["host"] = m.size - m.size_vram
        ctx = m.context_length or 0
        profile = Profile(mode=BACKEND_ID, precision=Precision.FP16, context_tokens=ctx,  # type: ignore[arg-type]
                          batch=self.kv.parallel, device="cuda" if on_gpu else "cpu")
        return Deployment(backend_id=BACKEND_ID, handle=m.name, model_id=base, profile=profile,
                          state=DeploymentState.READY, memory_bytes=memory, endpoint=f"{self.client.base_url}/v1",
                          name=m.name, device="cuda:0" if on_gpu else "cpu",
                          detail={"served_name": m.name, "size": m.size, "size_vram": m.size_vram,
                                  "expires_at": m.expires_at, "tools": self._tools(base)})

    def _tools(self, base: str) -> bool | None:
        with self._lock:
            hit = self._info.get(base)
        return None if hit is None else hit[2].tools

    def deployments(self) -> list[Deployment]:
        models = self.client.loaded(max_age_s=2.0) or []
        snap = None
        if any(m.size_vram for m in models if base_of(m.name)):
            try:
                snap = self.probe.snapshot() if self.probe is not None else None
            except Exception:  # noqa: BLE001 - the device key is a label here
                snap = None
        return [d for d in (self._deployment(m, snap) for m in models) if d is not None]

    def list_managed(self) -> list[Deployment]:
        """What runs, straight from ``/api/ps``. Ollama down (connection refused): nothing of it runs, [];
        a slow or odd answer raises (what it holds is not known)."""
        try:
            models = self.client.ps()
        except OllamaUnavailableError:
            return []
        snap = self.probe.snapshot() if self.probe is not None else None
        return [d for d in (self._deployment(m, snap) for m in models) if d is not None]

    def start(self, model: CachedModel, profile: Profile, claim: Claim, *,
              progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None) -> Deployment:
        num_ctx = int(profile.context_tokens)
        name = derived_name(model.model_id, num_ctx)
        gpu = "host" not in claim.bytes_by_device
        t0 = time.monotonic()

        def say(stage: str, text: str, frac: float | None = None) -> None:
            if progress is not None:
                progress(ProgressEvent(stage, text, frac, time.monotonic() - t0))

        def check_cancel() -> None:
            if cancel is not None and cancel():
                raise OperationCancelledError("the load was cancelled", "nothing of it was left loaded")

        existed = any(str(t.get("name")) == name for t in self.client.tags())
        say("create", f"creating {name} (num_ctx {num_ctx})", 0.1)
        self.client.create(name, model.model_id, {"num_ctx": num_ctx})
        loaded = False
        try:
            check_cancel()
            say("load", f"loading {name} (keep_alive {self.keep_alive})", 0.3)
            loaded = True  # from here an unload is part of the clean-up, even when the load call failed
            self.client.load(name, self.keep_alive, timeout_s=float(getattr(self.settings, "operation_timeout_s", 600)))
            check_cancel()
            say("verify", f"checking {name} with /api/ps", 0.9)
            dep = self._verify_loaded(model, name, num_ctx, gpu)
            with self._lock:
                self._avail = None
            return dep
        except BaseException:
            self._clean_up(name, loaded, existed)
            raise

    def _clean_up(self, name: str, loaded: bool, existed: bool) -> None:
        if loaded:
            try:
                self.client.unload(name, wait_s=float(getattr(self.settings, "step_timeout_s", 30)))
            except MemctlError:
                pass
        if not existed:
            try:
                self.client.delete(name)
            except MemctlError:
                pass

    def _verify_loaded(self, model: CachedModel, name: str, num_ctx: int, gpu: bool) -> Deployment:
        entry = next((m for m in self.client.ps() if m.name == name), None)
        if entry is None:
            raise ModelLoadError(f"Ollama answered the load of {name} but /api/ps does not list it",
                                 "see Ollama's log (journalctl -u ollama)", code="ollama.not_listed",
                                 args={"model": name})
        estimated = self.estimate(model, Profile(mode=BACKEND_ID, precision=Precision.FP16,  # type: ignore[arg-type]
                                                 context_tokens=num_ctx, batch=self.kv.parallel,
                                                 device="cuda" if gpu else "cpu"))
        reported = estimated.total_bytes - estimated.cuda_context_bytes
        prior = self.calibration.delta(model.model_id)
        self.calibration.record(model.model_id, reported - prior, entry.size, num_ctx)
        if entry.context_length is not None and entry.context_length != num_ctx:
            raise ModelLoadError(
                f"Ollama loaded {name} with context {entry.context_length}, not the {num_ctx} asked for",
                "this Ollama ignores the tag's num_ctx: update Ollama", code="ollama.context_mismatch",
                args={"model": name, "asked": num_ctx, "got": entry.context_length})
        if gpu and entry.size_vram < entry.size:
            on_cpu = entry.size - entry.size_vram
            raise InsufficientMemoryError(
                f"Ollama put {fmt_bytes(on_cpu)} of {name} ({fmt_bytes(entry.size)}) on the CPU at num_ctx "
                f"{num_ctx}: unloaded; memctl measured {fmt_bytes(entry.size)} against its estimate of "
                f"{fmt_bytes(reported)} and uses that next time",
                "fit again (`memctl ollama fit MODEL --apply` steps down), or free GPU memory",
                needed_bytes=entry.size, free_bytes=entry.size_vram)
        dep = self._deployment(entry, self.probe.snapshot() if self.probe is not None else None)
        assert dep is not None
        if entry.context_length is None:  # Ollama before 0.9.7 does not report it
            dep = dataclasses.replace(dep, warnings=(msg(
                "ollama.context_unverified", f"this Ollama does not report the context of {name}: "
                f"num_ctx {num_ctx} is in the tag but could not be checked", model=name, tokens=num_ctx),))
        return dep

    def stop(self, handle: str) -> ReleaseReport:
        base = base_of(handle) or handle
        try:
            rep = self.client.unload(handle, wait_s=float(getattr(self.settings, "step_timeout_s", 30)))
        except OllamaError as exc:
            return ReleaseReport(BACKEND_ID, handle, base, "", 0, 0, 0, "ollama_ps", Outcome.ERROR,
                                 msg(exc.code, exc.message, model=handle))
        if rep.already_gone:
            return ReleaseReport(BACKEND_ID, handle, base, "", 0, 0, 0, "ollama_ps", Outcome.SUCCESS,
                                 msg("release.already_gone", f"{handle} was not loaded", model=handle))
        freed = rep.freed_bytes if rep.freed_bytes is not None else (rep.size_vram_bytes if rep.gone else 0)
        return ReleaseReport(BACKEND_ID, handle, base, "gpu" if rep.size_vram_bytes else "cpu", rep.size_vram_bytes,
                             freed, max(0, rep.size_vram_bytes - freed),
                             "nvml_used" if rep.freed_bytes is not None else "ollama_ps", rep.outcome, rep.message)

    def verify(self, deployment: Deployment) -> str:
        entry = next((m for m in self.client.ps() if m.name == deployment.handle), None)
        if entry is None:
            raise ModelLoadError(f"{deployment.handle} is no longer loaded in Ollama", "apply it again",
                                 code="ollama.not_listed", args={"model": deployment.handle})
        where = "100% GPU" if entry.size_vram == entry.size else (
            "CPU" if entry.size_vram == 0 else f"{100 * entry.size_vram // max(1, entry.size)}% GPU")
        return f"{entry.name}: {fmt_bytes(entry.size)}, {where}, context {entry.context_length}"

    def clear_caches(self) -> dict[str, Any]:
        return {}


def kv_advice_message(advice: tuple[str, int], want: int) -> Message:
    kv_type, ctx = advice
    return msg("ollama.kv_advice",
               f"with OLLAMA_KV_CACHE_TYPE={kv_type} and OLLAMA_FLASH_ATTENTION=1 on the Ollama server, "
               f"context {ctx} would fit (at least {want}); a setting of the Ollama service, not of memctl",
               kv_type=kv_type, tokens=ctx, want=want)


def process_role(argv: Sequence[str], name: str | None) -> str | None:
    """"server" for ``ollama serve``, "runner" for ``ollama runner ...`` / ``ollama_llama_server``, else None.
    A process named ``ollama`` whose arguments cannot be read counts as a runner: runners hold the GPU."""
    prog = (os.path.basename(argv[0]) if argv else (name or "")).lower()
    if prog.startswith("ollama_llama_server"):
        return "runner"
    if prog not in ("ollama", "ollama.exe"):
        return None
    args = [a.lower() for a in argv[1:3]]
    if "runner" in args or not argv:
        return "runner"
    if "serve" in args:
        return "server"
    return None


_ADVICE = {
    "runner": "Ollama model {models}: unload it here (🗑️) or with `ollama stop`",
    "down": "an Ollama runner, but Ollama does not answer at its address: check the Ollama service "
            "(systemctl status ollama) or set MEMCTL_OLLAMA_HOST",
    "server": "the Ollama server itself (little memory); stop the service if you need it all",
}


class HolderView:
    """The Ollama client as "another holder" (the core's ``HolderSource``): its listing leaves out memctl's
    own derived tags (those are deployments of this backend, freed by its ``stop``)."""

    source = BACKEND_ID
    label = "Ollama"

    def __init__(self, client: OllamaClient, *, unloads_in_emergency: bool = True) -> None:
        self._client = client
        self.base_url = client.base_url
        self.unloads_in_emergency = unloads_in_emergency

    @staticmethod
    def role(argv: Sequence[str], name: str | None) -> str | None:
        return process_role(argv, name)

    @staticmethod
    def advice(kind: str) -> str:
        return _ADVICE[kind]

    @property
    def last_error(self) -> OllamaError | None:
        return self._client.last_error

    def ps(self) -> list[OllamaModel]:
        return [m for m in self._client.ps() if base_of(m.name) is None]

    def loaded(self, max_age_s: float = 5.0) -> list[OllamaModel] | None:
        models = self._client.loaded(max_age_s)
        return None if models is None else [m for m in models if base_of(m.name) is None]

    def unload(self, name: str, wait_s: float = 10.0):
        return self._client.unload(name, wait_s)

    def unload_all(self, wait_s: float = 10.0):
        return self._client.unload_all(wait_s)

    def emergency_unload(self, wait_s: float = 10.0) -> str:
        return self._client.emergency_unload(wait_s)

    def version(self) -> str:
        return self._client.version()
