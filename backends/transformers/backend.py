"""The in-process Transformers backend: :class:`~memory_controller.backend.Backend` and
:class:`~memory_controller.backend.InProcessGenerator`.

* ``start`` is all or nothing (see :mod:`.loading`); ``stop`` is idempotent and measures what came back
  (NVML used bytes on the model's GPUs; ``RssAnon`` on the host — mapped weight files are page cache,
  counted in ``Deployment.detail["mapped_bytes"]`` only).
* One RLock serialises start / stop; each model has its own generation lock, so concurrent
  generations on one model run one after the other. ``deployments()`` reads an immutable snapshot and
  never waits for a running load.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory_controller.backend import (
    Availability,
    BackendBase,
    Capabilities,
    Claim,
    Deployment,
    DeploymentState,
    GenerationChunk,
    GenerationRequest,
    Message,
    ReleaseReport,
    describe_memory,
    msg,
)
from memory_controller.errors import (
    ModelLoadError,
    ModelNotFoundError,
)
from memory_controller.types import (
    CachedModel,
    MemoryEstimate,
    Outcome,
    Precision,
    Profile,
    ProgressCallback,
    ProgressEvent,
)
from memory_controller.types import SystemSnapshot as Snapshot
from memory_controller.units import MIB, fmt_bytes

from . import checks, loading
from . import generation as gen
from . import memory as mem
from .options import TransformersOptions

BACKEND_ID = "transformers"
# A release is clean when what stays held is within max(50 MiB, 5 % of the model's bytes).
RECLAIM_TOLERANCE_MIN_BYTES = 50 * MIB
RECLAIM_TOLERANCE_FRACTION = 0.05
# After a stop on GPU, poll used memory (as Ollama does) until it is back or this much time passed.
GPU_RECLAIM_POLL_S = 0.25
GPU_RECLAIM_WAIT_S = 5.0
GEN_STOP_WAIT_S = 10.0  # how long a stop waits for a running generation to leave
VERIFY_PROMPT = "def hello():"


@dataclass
class _Entry:
    model: Any
    cached: CachedModel
    deployment: Deployment
    gpu_indices: tuple[int, ...]
    anon_before: int
    gpu_before: int | None
    tokenizer: Any | None = None
    closing: bool = False
    gen_lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time
    tok_lock: threading.Lock = field(default_factory=threading.Lock)  # tokenizer loading and counting
    worker: threading.Thread | None = None  # the running generation's thread
    weight_files: tuple[Path, ...] = ()  # memory-mapped by a bf16/fp16 CPU load (their pages: mapped_bytes)


class TransformersBackend(BackendBase):
    """Loads models into this process. Thread-safe; see the module docstring for the contracts."""

    id = BACKEND_ID
    capabilities = Capabilities(
        precisions=(Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8, Precision.NF4, Precision.FP4),
        devices=("cuda", "cpu"), fit_ladder=(Precision.INT8, Precision.NF4), serves_http=False,
        generates_in_process=True, needs_gpu=False, label="Transformers (in-process)")

    def __init__(self, settings: Any, probe: Any = None):
        """``probe``: a DeviceProbe (``gpu_used_bytes(index)`` measures a release on GPU); None: torch's figures."""
        self.settings = settings
        self._gpu_used: Callable[[int], int | None] | None = getattr(probe, "gpu_used_bytes", None)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._snapshot: tuple[Deployment, ...] = ()
        self._availability: Availability | None = None
        self._tok_cache: dict[tuple[str, str], Any] = {}  # tokenizers of cached models (admission reads them)
        self._tok_cache_lock = threading.Lock()

    # ------------------------------------------------------------------ queries
    def availability(self, snapshot: Snapshot) -> Availability:
        if self._availability is None:
            missing = [n for n in ("torch", "transformers") if not _installed(n)]
            self._availability = Availability(True) if not missing else Availability(False, msg(
                "backend.missing_package", f"the Transformers backend needs {', '.join(missing)}, which is not "
                "installed", backend=self.id, packages=", ".join(missing)))
        return self._availability

    def deployments(self) -> list[Deployment]:
        return list(self._snapshot)

    def _publish(self) -> None:
        self._snapshot = tuple(e.deployment for e in self._entries.values())

    @staticmethod
    def device_key(profile: Profile) -> str:
        if profile.device == "cpu":
            return "host"
        return f"gpu:{profile.gpu_ids[0] if profile.gpu_ids else 0}"

    def claim(self, model: CachedModel, profile: Profile, estimate: MemoryEstimate, snapshot: Snapshot) -> Claim:
        """The estimate on the target device, and what forbids the start (checked without loading)."""
        key = self.device_key(profile)
        precision = Precision(profile.precision)
        blockers = checks.claim_blockers(self.id, self.capabilities, profile, key, snapshot)
        return Claim({key: estimate.total_bytes}, blockers, detail={"precision": precision.value})

    def check_model(self, model: CachedModel, profile: Profile) -> tuple[Message, ...]:
        """``model.no_tokenizer`` when the snapshot has no tokenizer files (it would load, then fail to
        answer); ``model.no_chat_template`` when its tokenizer has no chat template (a blocker only when
        chat is needed: the controller decides)."""
        folder = Path(model.path)
        if not checks.has_tokenizer_files(folder):
            return (msg("model.no_tokenizer", f"{model.model_id} has no tokenizer files in its folder, so it "
                        "cannot take text; download the tokenizer (tokenizer.json, tokenizer_config.json) too",
                        model=model.model_id),)
        problems = checks.model_file_problems(folder, model.model_id)
        if problems:
            return problems
        if checks.has_chat_template(folder):
            return ()
        return (msg("model.no_chat_template", f"{model.model_id} has no chat template: it can complete text but "
                    "not hold a chat (pick an instruct/chat model for an IDE)", model=model.model_id),)

    # ------------------------------------------------------------------ start / stop
    def start(self, model: CachedModel, profile: Profile, claim: Claim | None = None, *,
              progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None,
              device_map: str | None = None, max_memory: dict | None = None,
              offload_folder: str | None = None) -> Deployment:
        """Load ``model`` with ``profile``; a READY Deployment, or a MemctlError with nothing left loaded.

        ``device_map`` / ``max_memory`` / ``offload_folder`` (beyond the protocol) place the weights
        explicitly. Raises ModelLoadError (already loaded, bad files or arguments, ...),
        QuantizationUnavailableError, InsufficientMemoryError or OperationCancelledError.
        """
        with self._lock:
            if model.model_id in self._entries:
                raise ModelLoadError(f"{model.model_id} is already loaded", "unload it first, then load it again",
                                     code="model.already_loaded", args={"model": model.model_id})
            r = loading.load(model, profile, self.settings, progress=progress, cancel=cancel, device_map=device_map,
                             max_memory=max_memory, offload_folder=offload_folder, nvml_used=self._gpu_used)
            memory = dict(r.memory_bytes) or {"host" if not r.gpu_indices else f"gpu:{r.gpu_indices[0]}": 0}
            dep = Deployment(
                backend_id=self.id, handle=model.model_id, model_id=model.model_id, profile=profile,
                state=DeploymentState.STARTING, memory_bytes=memory, started_at=time.time(),
                name=model.model_id, device=r.device,
                detail={"mapped_bytes": r.mapped_bytes, "mapped_tensor_bytes": r.mapped_tensor_bytes,
                        "tensor_bytes": r.tensor_bytes, "load_s": round(r.elapsed_s, 3),
                        "precision": Precision(profile.precision).value},
            ).to(DeploymentState.READY)
            self._entries[model.model_id] = _Entry(r.model, model, dep, r.gpu_indices, r.anon_before, r.gpu_before,
                                                   weight_files=r.weight_files if r.mapped_bytes else ())
            self._publish()
            if progress is not None:
                try:
                    progress(ProgressEvent("ready", f"{model.model_id} ready on {r.device}: "
                                           f"{describe_memory(dep.memory_bytes, dep.mapped_bytes)}", 1.0, r.elapsed_s))
                except Exception:  # noqa: BLE001 - a broken display must not undo a load
                    pass
            return dep

    def stop(self, handle: str) -> ReleaseReport:
        """Drop every reference to ``handle`` (a model id), clear caches and measure what came back.

        Idempotent: a model that is not loaded gives ``release.already_gone`` with nothing freed. A running
        generation on it is stopped first (within a token). ``verdict`` is SUCCESS when what stays held is
        within max(50 MiB, 5 % of the model's bytes), WARNING otherwise (``release.partial``).
        """
        with self._lock:
            entry = self._entries.pop(handle, None)
            self._publish()
            if entry is None:
                return ReleaseReport(self.id, handle, handle, "", 0, 0, 0, "none", Outcome.SUCCESS,
                                     msg("release.already_gone", f"{handle} was not loaded", handle=handle))
            entry.closing = True
            # A generation stops at its next token (closing). Its consumer may sit between two chunks
            # and hold the lock: past GEN_STOP_WAIT_S the worker thread itself is joined instead.
            locked = entry.gen_lock.acquire(timeout=GEN_STOP_WAIT_S)
            worker = entry.worker
            if worker is not None:
                worker.join(GEN_STOP_WAIT_S)
            try:
                dep, gpus = entry.deployment, entry.gpu_indices
                expected_gpu = sum(v for k, v in dep.memory_bytes.items() if k.startswith("gpu:"))
                expected_host = dep.memory_bytes.get("host", 0)
                anon_start = mem.process_private_bytes()
                mapped_start = mem.mapped_resident_bytes(list(entry.weight_files)) if entry.weight_files else 0
                gpu_start = mem.gpu_used_sum(gpus, self._gpu_used) if gpus else None
                model_obj, entry.model, entry.tokenizer = entry.model, None, None
                try:
                    mem.drop_tensors(model_obj)
                except Exception:  # noqa: BLE001 - dropping our reference below still frees it in most cases
                    pass
                del model_obj
                mem.clear_caches(freeze=not self._entries)
            finally:
                if locked:
                    entry.gen_lock.release()
            held_host = _held(expected_host, mem.process_private_bytes(), anon_start, entry.anon_before)
            # The weight files' mapping goes with the last tensor viewing it: measured, not assumed.
            mapped_left = mem.mapped_resident_bytes(list(entry.weight_files)) if entry.weight_files else 0
            mapped_freed = max(0, mapped_start - mapped_left)
            measures = ["rss_anon"] if not gpus or expected_host else []
            held_gpu = 0
            if gpus:
                measures.insert(0, "nvml_used" if self._gpu_used is not None else "cuda_mem_get_info")
                tol = _tolerance(expected_gpu)
                deadline = time.monotonic() + GPU_RECLAIM_WAIT_S
                now = mem.gpu_used_sum(gpus, self._gpu_used)
                while now is not None and _held(expected_gpu, now, gpu_start, entry.gpu_before) > tol \
                        and time.monotonic() < deadline:
                    time.sleep(GPU_RECLAIM_POLL_S)
                    now = mem.gpu_used_sum(gpus, self._gpu_used)
                if now is None:
                    return ReleaseReport(
                        self.id, handle, dep.model_id, dep.device, dep.footprint_bytes, 0, dep.footprint_bytes,
                        measures[0], Outcome.WARNING,
                        msg("release.unmeasured", f"unloaded {dep.model_id}, but GPU memory could not be measured "
                            "(NVML unavailable)", model=dep.model_id, expected_bytes=dep.footprint_bytes))
                held_gpu = _held(expected_gpu, now, gpu_start, entry.gpu_before)
            expected = expected_gpu + expected_host
            still = min(expected, held_gpu + (held_host if "rss_anon" in measures else 0))
            freed = expected - still
            tolerance = _tolerance(expected)
            measure = "+".join(measures)
            args = {"model": dep.model_id, "freed_bytes": freed, "expected_bytes": expected,
                    "still_held_bytes": still, "tolerance_bytes": tolerance, "measure": measure,
                    "mapped_bytes": mapped_start, "mapped_freed_bytes": mapped_freed, "mapped_left_bytes": mapped_left}
            mapped_text = (f"; mapped weight files: {fmt_bytes(mapped_freed)} of {fmt_bytes(mapped_start)} unmapped"
                           + (f", {fmt_bytes(mapped_left)} still mapped" if mapped_left else "")
                           if mapped_start or mapped_left else "")
            if still <= tolerance and mapped_left <= _tolerance(mapped_start):
                message = msg("release.freed", f"unloaded {dep.model_id}: private {fmt_bytes(freed)} of "
                              f"{fmt_bytes(expected)} came back ({measure}); {fmt_bytes(still)} still held, within the "
                              f"{fmt_bytes(tolerance)} tolerance{mapped_text}", **args)
                verdict = Outcome.SUCCESS
            else:
                message = msg("release.partial", f"unloaded {dep.model_id}, but {fmt_bytes(still)} of "
                              f"{fmt_bytes(expected)} private is still held ({measure}){mapped_text}: the memory "
                              "allocator or another reference keeps it; 'clear memory' may return it, restarting the "
                              "dashboard always does", **args)
                verdict = Outcome.WARNING
            return ReleaseReport(self.id, handle, dep.model_id, dep.device, expected, freed, still, measure,
                                 verdict, message, mapped_start, mapped_freed)

    def stop_all(self) -> list[ReleaseReport]:
        """Stop every model (each gets its turn even when another fails)."""
        with self._lock:
            return [self.stop(h) for h in list(self._entries)]

    def clear_caches(self) -> dict[str, Any]:
        """gc, CUDA caches when CUDA is up, malloc_trim: ``{action: done?}`` (see memory.clear_caches).
        With no model loaded, what survives the collection is frozen (see memory.collect_garbage)."""
        return mem.clear_caches(freeze=not self._entries)

    def verify(self, deployment: Deployment) -> str:
        """Generate ``verify_tokens`` ([backends.transformers]) tokens; a short detail, or a MemctlError."""
        options = getattr(self.settings, "backend_options", None)
        n = options(self.id, TransformersOptions).verify_tokens if options is not None else 1
        t0 = time.perf_counter()
        request = GenerationRequest(prompt=VERIFY_PROMPT, max_new_tokens=n, temperature=0.0)
        chunks = list(self.generate_stream(deployment, request, lambda: False))
        # The pass's temporaries are freed but stay in glibc's arenas (an nf4 pass on the CPU: 38-55 MiB
        # on a 0.1 B model, +24-42 % over its weights) or torch's CUDA cache: hand them back, so that a
        # loaded model holds its weights and nothing of the check that it runs.
        mem.clear_caches()
        last = chunks[-1] if chunks else None
        if last is None or not last.completion_tokens:
            raise ModelLoadError(f"{deployment.model_id} generated no token", "unload it and load it again",
                                 code="verify.no_tokens", args={"model": deployment.model_id})
        return f"generated {last.completion_tokens} token(s) in {time.perf_counter() - t0:.2f} s"

    # ------------------------------------------------------------------ generation
    def _entry(self, deployment: Deployment | str) -> _Entry:
        model_id = deployment if isinstance(deployment, str) else deployment.handle
        entry = self._entries.get(model_id)
        if entry is None or entry.closing:
            raise ModelNotFoundError(f"{model_id} is not loaded", "load it first",
                                     code="model.not_loaded", args={"model": model_id})
        return entry

    def _tokenizer(self, entry: _Entry) -> Any:
        with entry.tok_lock:
            return self._tokenizer_locked(entry)

    @staticmethod
    def _tokenizer_locked(entry: _Entry) -> Any:
        if entry.tokenizer is None:
            from transformers import AutoTokenizer

            try:
                entry.tokenizer = AutoTokenizer.from_pretrained(entry.cached.path, local_files_only=True,
                                                                trust_remote_code=False)
            except Exception as exc:  # noqa: BLE001 - any failure: the model folder has no usable tokenizer
                problem = f"{type(exc).__name__}: {exc}"
            else:
                return entry.tokenizer
            raise ModelLoadError(f"{entry.cached.model_id} has no usable tokenizer in {entry.cached.path}: {problem}",
                                 "download the tokenizer files (tokenizer.json, tokenizer_config.json) too",
                                 code="model.no_tokenizer", args={"model": entry.cached.model_id})
        return entry.tokenizer

    def prompt_tokens(self, deployment: Deployment, request: GenerationRequest) -> int:
        """Counted apart from generation: answers while another request on the model generates."""
        entry = self._entry(deployment)
        with entry.tok_lock:
            return len(gen.prompt_ids(self._tokenizer_locked(entry), request, entry.cached.model_id))

    def generate_stream(self, deployment: Deployment, request: GenerationRequest,
                        cancel: Callable[[], bool]) -> Iterator[GenerationChunk]:
        """Text as it is generated (see :func:`.generation.stream`); calls on one model run one at a time."""
        gen.check_request(request)
        entry = self._entry(deployment)
        return self._stream(entry, request, cancel)

    def _stream(self, entry: _Entry, request: GenerationRequest, cancel: Callable[[], bool]) -> Iterator[GenerationChunk]:
        with entry.gen_lock:
            if entry.closing or entry.model is None:
                yield GenerationChunk("", "cancelled", 0, 0)
                return
            yield from gen.stream(entry.model, self._tokenizer(entry), request, cancel,
                                  model_id=entry.cached.model_id, input_device=_input_device(entry.model),
                                  closing=lambda: entry.closing, on_worker=lambda t: setattr(entry, "worker", t))

    # ------------------------------------------------------------------ read before loading (serving admission)
    def _cached_tokenizer(self, model: CachedModel) -> Any:
        """The tokenizer of a cached model without loading its weights (kept for a few models)."""
        key = (model.model_id, model.path)
        with self._tok_cache_lock:
            hit = self._tok_cache.get(key)
        if hit is not None:
            return hit
        if not checks.has_tokenizer_files(Path(model.path)):
            raise ModelLoadError(f"{model.model_id} has no tokenizer files in {model.path}",
                                 "download the tokenizer files (tokenizer.json, tokenizer_config.json) too",
                                 code="model.no_tokenizer", args={"model": model.model_id})
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model.path, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any failure: the folder has no usable tokenizer
            raise ModelLoadError(f"{model.model_id} has no usable tokenizer in {model.path}: "
                                 f"{type(exc).__name__}: {exc}", "download the tokenizer files again",
                                 code="model.no_tokenizer", args={"model": model.model_id}) from None
        with self._tok_cache_lock:
            if len(self._tok_cache) >= 4:
                self._tok_cache.pop(next(iter(self._tok_cache)))
            self._tok_cache[key] = tok
        return tok

    def count_prompt_tokens(self, model: CachedModel, request: GenerationRequest) -> int:
        """Tokens the request's prompt takes once templated, counted with the tokenizer alone (the model need
        not run: admission decides before loading). Raises MemctlError (no tokenizer, no chat template)."""
        tok = self._cached_tokenizer(model)
        with self._tok_cache_lock:  # tokenizers are not thread-safe
            return len(gen.prompt_ids(tok, request, model.model_id))

    def tool_support(self, model: CachedModel) -> bool | None:
        """Whether the model's chat template renders tools (a template that never uses ``tools`` drops them
        silently). Read from the template files alone: no tokenizer, no heavy import (the dashboard's first
        paint asks). None: no chat template."""
        return checks.template_renders_tools(Path(model.path))

    def model_family(self, deployment: Deployment) -> str | None:
        entry = self._entry(deployment)
        tok = self._tokenizer(entry) if checks.has_tokenizer_files(Path(entry.cached.path)) else None
        return gen.model_family(getattr(entry.model, "config", None), gen.chat_template_of(tok))


def create(settings: Any, probe: Any) -> TransformersBackend:
    return TransformersBackend(settings, probe)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _tolerance(expected: int) -> int:
    return max(RECLAIM_TOLERANCE_MIN_BYTES, int(RECLAIM_TOLERANCE_FRACTION * expected))


def _held(expected: int, now: int, start: int | None, before: int | None) -> int:
    """Bytes still held after a release: the smaller of (expected − what the release gave back) and
    (now − before the load), never below 0."""
    candidates = []
    if start is not None:
        candidates.append(expected - (start - now))
    if before is not None:
        candidates.append(now - before)
    return max(0, min(candidates)) if candidates else expected


def _input_device(model: Any) -> Any:
    """Where prompt tokens go: the input embeddings' device (CPU when they are offloaded to disk)."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = model.device
    return "cpu" if device.type == "meta" else device
