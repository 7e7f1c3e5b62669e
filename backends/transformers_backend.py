"""In-process Hugging Face Transformers backend: load, list, generate, unload (and measure what came back).

The only module that imports torch, transformers, bitsandbytes and accelerate, always lazily inside
functions, so that importing this module costs nothing and the dashboard paints without them.

Contracts:

* ``load`` is all-or-nothing: on any failure (bad files, unknown architecture, out of memory,
  cancellation) every partial object is dropped, garbage is collected and a project error is raised
  *outside* the failing ``except`` block, so no traceback keeps half a model alive.
* ``unload`` drops every reference the backend holds (model parameters and buffers are emptied even if
  someone else still holds the model object), clears caches, then *measures*: NVML used memory on the
  model's GPUs, or on CPU the process's resident memory (private ``RssAnon`` plus ``RssFile`` when the
  weights were memory-mapped from their files). The report says plainly what is still held.
* One RLock serialises load / unload / generate; ``loaded()`` and ``is_loaded()`` read an immutable
  snapshot and never wait for a running load.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memory_controller import estimate as est
from memory_controller.errors import (
    InsufficientMemoryError,
    MemctlError,
    ModelLoadError,
    ModelNotFoundError,
    OperationCancelledError,
    QuantizationUnavailableError,
)
from memory_controller.types import (
    CachedModel,
    LoadedModel,
    Outcome,
    Precision,
    Profile,
    ProgressCallback,
    ProgressEvent,
    UnloadReport,
)
from memory_controller.units import MIB, fmt_bytes

if TYPE_CHECKING:
    from memory_controller.settings import Settings

log = logging.getLogger(__name__)

BACKEND_NAME = "transformers"
# An unload is clean when what stays held is within max(50 MiB, 5 % of the model's bytes).
RECLAIM_TOLERANCE_MIN_BYTES = 50 * MIB
RECLAIM_TOLERANCE_FRACTION = 0.05
# After an unload on GPU, poll used memory (as Ollama does) until it is back or this much time passed.
GPU_RECLAIM_POLL_S = 0.25
GPU_RECLAIM_WAIT_S = 5.0
PAGE_BYTES = 4096
MALLOC_MMAP_THRESHOLD_BYTES = 1 * MIB
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

_DEVICE_MAP_RE = re.compile(r"^(auto|cpu|balanced|balanced_low_0|sequential|cuda|cuda:\d+)$")
_MAX_MEMORY_VALUE_RE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_OOM_MARKERS = ("can't allocate memory", "not enough memory", "Cannot allocate memory", "out of memory")
_STAGE_FRACTION = {"config": 0.0, "weights": 0.05, "placing": 0.85, "warm-up": 0.9, "ready": 1.0}


# --------------------------------------------------------------------------- process memory


def _proc_status_bytes(*keys: str) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in out:
                    out[name] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return out


def process_private_bytes() -> int:
    """Private (anonymous) resident memory of this process in bytes: ``RssAnon`` of /proc/self/status."""
    return _proc_status_bytes("RssAnon")["RssAnon"]


def process_resident_bytes() -> tuple[int, int]:
    """(private ``RssAnon``, file-backed ``RssFile``) resident bytes of this process."""
    d = _proc_status_bytes("RssAnon", "RssFile")
    return d["RssAnon"], d["RssFile"]


def host_available_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, or None when unreadable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_malloc_tuned = False


def _tune_malloc() -> bool | None:
    """Serve allocations of 1 MiB and more with their own mmap (glibc ``M_MMAP_THRESHOLD``), once.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after big frees, so the weights of the
    *next* model land in the heap and arenas, where freed pages often stay resident after an unload
    (measured: 50-70 MiB held per fp32 load/unload cycle of a 250 MB model; 2-10 MiB with this).
    Called before the first load. Returns whether mallopt succeeded, None when not glibc.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        _malloc_tuned = bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return None
    return _malloc_tuned


def process_free_bytes() -> int | None:
    """Bytes this process may still allocate: the least of MemAvailable, the cgroup v2 headroom
    (``memory.max - memory.current``) and the soft RLIMIT_DATA / RLIMIT_AS headroom. None if unknown."""
    candidates: list[int] = []
    avail = host_available_bytes()
    if avail is not None:
        candidates.append(avail)
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            rel = next((ln.split(":", 2)[2].strip() for ln in fh if ln.startswith("0::")), None)
        if rel is not None:
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            limit = (base / "memory.max").read_text().strip()
            if limit != "max":
                candidates.append(max(0, int(limit) - int((base / "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    try:
        import resource

        vm = _proc_status_bytes("VmData", "VmSize")
        for res, used in ((resource.RLIMIT_DATA, vm["VmData"]), (resource.RLIMIT_AS, vm["VmSize"])):
            soft = resource.getrlimit(res)[0]
            if soft != resource.RLIM_INFINITY:
                candidates.append(max(0, soft - used))
    except (ImportError, OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def _malloc_trim() -> bool | None:
    """``malloc_trim(0)`` on glibc: hand freed heap pages back to the OS. None when not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- torch helpers (lazy)

_quiet_installed = False


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _quiet_bitsandbytes() -> None:
    """Silence two known-harmless bitsandbytes messages (one per layer per token for 8-bit on CPU)."""
    global _quiet_installed
    if _quiet_installed:
        return
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropMessages(("MatMul8bitLt: inputs will be cast",)))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages(("Failed to load CPU gemm_4bit",)))
    _quiet_installed = True


def _torch():
    import torch

    return torch


def _unique_tensors(model: Any):
    """Parameters, buffers and bitsandbytes quantisation state of ``model``, each storage once."""
    torch = _torch()
    seen: set[tuple[int, int]] = set()

    def visit(t: Any):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.data_ptr(), t.nbytes)
            if key[0] and key not in seen:
                seen.add(key)
                yield t

    for _name, p in model.named_parameters(remove_duplicate=False):
        yield from visit(p)
        qs = getattr(p, "quant_state", None)  # bitsandbytes 4-bit
        if qs is not None:
            for attr in ("absmax", "code", "offset"):
                yield from visit(getattr(qs, attr, None))
            st2 = getattr(qs, "state2", None)
            if st2 is not None:
                for attr in ("absmax", "code"):
                    yield from visit(getattr(st2, attr, None))
        yield from visit(getattr(p, "SCB", None))  # bitsandbytes 8-bit row scales
    for _name, b in model.named_buffers(remove_duplicate=False):
        yield from visit(b)


def model_footprint_bytes(model: Any) -> int:
    """Bytes a loaded model really holds: parameters + buffers + quantisation state, shared storage once."""
    return sum(t.nbytes for t in _unique_tensors(model))


def touch_weights(model: Any, on_fraction: Callable[[float], None] | None = None,
                  tensors: list[Any] | None = None) -> int:
    """Read one byte per 4 KiB page of every CPU weight so memory-mapped files are really resident.

    A bf16 load memory-maps the weight file and reads nothing until a weight is used (FACTS.md);
    "ready" must mean resident. Returns the number of bytes covered. GPU tensors are already copied.
    """
    torch = _torch()
    pool = tensors if tensors is not None else _unique_tensors(model)
    tensors = [t for t in pool if t.device.type == "cpu" and t.numel() > 0]
    total = sum(t.nbytes for t in tensors) or 1
    done = 0
    next_mark = 0.25
    with torch.inference_mode():
        for t in tensors:
            flat = t.detach().reshape(-1) if t.is_contiguous() else t.detach().contiguous().reshape(-1)
            flat.view(torch.uint8)[::PAGE_BYTES].sum()
            done += t.nbytes
            if on_fraction is not None and done / total >= next_mark:
                on_fraction(done / total)
                next_mark += 0.25
    return done


def _mapped_weight_bytes(tensors: list[Any], weight_files: list[Path]) -> int:
    """Bytes of CPU weights that live in memory-mapped weight files (not in private memory)."""
    wanted = set()
    for f in weight_files:
        try:
            wanted.add(os.path.realpath(f))
        except OSError:
            pass
    ranges: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() in wanted:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return 0
    if not ranges:
        return 0
    total = 0
    for t in tensors:
        ptr = t.data_ptr()
        if t.device.type == "cpu" and any(lo <= ptr < hi for lo, hi in ranges):
            total += t.nbytes
    return total


def _device_summary(model: Any, tensors: list[Any]) -> tuple[str, tuple[int, ...]]:
    """("cuda:0,1+cpu" / "cpu" / ..., GPU indices) of a loaded model."""
    dm = getattr(model, "hf_device_map", None)
    places: set[str] = set()
    if isinstance(dm, dict) and dm:
        for v in dm.values():
            places.add(f"cuda:{v}" if isinstance(v, int) else str(v))
    else:
        places.update(str(t.device) for t in tensors)
    gpus = sorted({int(p.split(":")[1]) if ":" in p else 0 for p in places if p.startswith("cuda")})
    parts = [f"cuda:{','.join(str(g) for g in gpus)}"] if gpus else []
    if "cpu" in places and gpus:
        parts.append("cpu")
    if "disk" in places:
        parts.append("disk")
    return ("+".join(parts) if parts else "cpu"), tuple(gpus)


def _input_device(model: Any) -> Any:
    """Where prompt tokens go: the input embeddings' device (CPU when they are offloaded to disk)."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = model.device
    return "cpu" if device.type == "meta" else device


def _drop_tensors(model: Any) -> None:
    """Empty every module's parameters, buffers and tensor attributes (one level into state objects).

    Run on unload and after a failed load, so memory comes back even when something outside the
    backend (a UI session, a traceback) still references the model object.
    """
    torch = _torch()
    try:
        if any(hasattr(m, "_hf_hook") for m in model.modules()):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(model, recurse=True)
    except Exception:  # noqa: BLE001 - best effort, the tensors are dropped below anyway
        log.debug("could not remove accelerate hooks", exc_info=True)
    for module in list(model.modules()):
        module._parameters.clear()
        module._buffers.clear()
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):
                setattr(module, key, None)
            elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module) and not isinstance(value, type):
                for k2, v2 in list(vars(value).items()):
                    if isinstance(v2, torch.Tensor):
                        try:
                            setattr(value, k2, None)
                        except (AttributeError, TypeError):
                            pass


def _is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError):
        return True
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(m in text for m in _OOM_MARKERS):
        return True  # CPU allocator and safetensors mmap failures arrive as RuntimeError
    return isinstance(exc, OSError) and exc.errno == 12  # ENOMEM from mmap


# --------------------------------------------------------------------------- the backend


@dataclass
class _Entry:
    model: Any
    tokenizer: Any | None
    cached: CachedModel
    info: LoadedModel
    gpu_indices: tuple[int, ...]
    mapped_bytes: int
    anon_before: int  # RssAnon before the load (bytes)
    file_before: int  # RssFile before the load (bytes)
    gpu_before: int | None  # used bytes on the model's GPUs before the load


class TransformersBackend:
    """Loads models into this process. Thread-safe; see the module docstring for the contracts."""

    name = BACKEND_NAME

    def __init__(self, settings: Settings, gpu_used_bytes: Callable[[int], int | None] | None = None):
        """``gpu_used_bytes(index)`` returns NVML used bytes of a GPU (None when unknown)."""
        self.settings = settings
        self._gpu_used = gpu_used_bytes
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._snapshot: tuple[LoadedModel, ...] = ()
        self._quant_probe: dict[tuple[str, str], str | None] = {}

    # ------------------------------------------------------------------ queries
    def loaded(self) -> list[LoadedModel]:
        """Models loaded now, with their measured footprint (bytes) and device. Never blocks."""
        return list(self._snapshot)

    def is_loaded(self, model_id: str) -> bool:
        return any(m.model_id == model_id for m in self._snapshot)

    def cuda_available(self) -> bool:
        """True when torch sees a CUDA device (imports torch the first time: ~3 s)."""
        try:
            return bool(_torch().cuda.is_available())
        except Exception:  # noqa: BLE001 - a broken CUDA install means "no CUDA" here
            return False

    def _publish(self) -> None:
        self._snapshot = tuple(e.info for e in self._entries.values())

    # ------------------------------------------------------------------ checks before loading
    def check_quantization(self, precision: Precision, device: str) -> None:
        """Raise :class:`QuantizationUnavailableError` when ``precision`` cannot run on ``device``.

        Checks that bitsandbytes imports and meets Transformers' minimum version, that CUDA exists when
        asked for, and quantises a small tensor on the device once (cached). No-op for fp32/fp16/bf16.
        """
        precision = Precision(precision)
        if not precision.is_quantized:
            return
        if device not in ("cpu", "cuda"):
            raise QuantizationUnavailableError(f"unknown device {device!r} for {precision.value}", "use cpu or cuda")
        hint = "install bitsandbytes (`pip install bitsandbytes`), or choose fp16/bf16"
        _quiet_bitsandbytes()
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
            raise QuantizationUnavailableError(
                f"{precision.value} needs bitsandbytes, which is missing or cannot be imported ({exc})", hint
            ) from None
        from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION, is_bitsandbytes_available

        if not is_bitsandbytes_available():
            raise QuantizationUnavailableError(
                f"bitsandbytes {getattr(bnb, '__version__', '?')} is older than the {BITSANDBYTES_MIN_VERSION} "
                "Transformers needs",
                f"upgrade it: pip install 'bitsandbytes>={BITSANDBYTES_MIN_VERSION}'",
            )
        if device == "cuda" and not self.cuda_available():
            raise QuantizationUnavailableError(
                f"{precision.value} on cuda was asked for, but torch sees no CUDA device",
                "choose device cpu (bitsandbytes quantises on CPU too) or check the NVIDIA driver",
            )
        key = ("int8" if precision is Precision.INT8 else "4bit", device)
        if key not in self._quant_probe:
            self._quant_probe[key] = self._probe_bnb(precision, device)
        problem = self._quant_probe[key]
        if problem is not None:
            raise QuantizationUnavailableError(
                f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantise to {precision.value} on {device}: "
                f"{problem}",
                "choose fp16/bf16, or a device bitsandbytes supports",
            )

    @staticmethod
    def _probe_bnb(precision: Precision, device: str) -> str | None:
        torch = _torch()
        try:
            import bitsandbytes.functional as F

            x = torch.randn(64, 64, dtype=torch.float16 if device == "cuda" else torch.bfloat16, device=device)
            if precision is Precision.INT8:
                F.int8_vectorwise_quant(x.to(torch.float16))
            else:
                F.quantize_4bit(x, quant_type=precision.value)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure means "unavailable here"
            return f"{type(exc).__name__}: {exc}"

    def _device_map(self, profile: Profile, device_map: str | None) -> str:
        if device_map is not None:
            if not isinstance(device_map, str) or not _DEVICE_MAP_RE.match(device_map):
                raise ModelLoadError(
                    f"device_map {device_map!r} is not supported",
                    "use auto, cpu, cuda:N, balanced, balanced_low_0 or sequential",
                )
            wants_cuda = device_map.startswith("cuda") or (profile.device == "cuda" and device_map != "cpu")
        else:
            wants_cuda = profile.device == "cuda"
            if not wants_cuda:
                device_map = "cpu"
            elif profile.gpu_ids and len(profile.gpu_ids) == 1:
                device_map = f"cuda:{profile.gpu_ids[0]}"
            else:
                device_map = "auto"
        if device_map == "cuda":
            device_map = "cuda:0"
        if wants_cuda and not self.cuda_available():
            raise ModelLoadError(
                f"the profile asks for CUDA (device_map {device_map}), but torch sees no CUDA device",
                "choose device cpu, or check the NVIDIA driver and the torch build",
            )
        return device_map

    @staticmethod
    def _check_max_memory(max_memory: dict | None) -> dict | None:
        if max_memory is None:
            return None
        if not isinstance(max_memory, dict) or not max_memory:
            raise ModelLoadError(f"max_memory {max_memory!r} must be a non-empty dict",
                                 'e.g. {0: "10GiB", "cpu": "20GiB"}')
        for k, v in max_memory.items():
            key_ok = (isinstance(k, int) and not isinstance(k, bool) and k >= 0) or k in ("cpu", "disk", "mps")
            val_ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
                isinstance(v, str) and _MAX_MEMORY_VALUE_RE.match(v)
            )
            if not (key_ok and val_ok):
                raise ModelLoadError(
                    f"max_memory entry {k!r}: {v!r} is invalid",
                    'keys are GPU indices or "cpu"/"disk", values bytes or sizes like "10GiB"',
                )
        return dict(max_memory)

    @staticmethod
    def _check_offload(offload_folder: str | None) -> str | None:
        if offload_folder is None:
            return None
        p = Path(offload_folder).expanduser()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelLoadError(f"offload folder {p} cannot be created ({exc})",
                                 "choose a writable folder with room for the offloaded weights") from None
        if not os.access(p, os.W_OK):
            raise ModelLoadError(f"offload folder {p} is not writable", "choose a writable folder")
        return str(p)

    # ------------------------------------------------------------------ load
    def load(
        self,
        model: CachedModel,
        profile: Profile,
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        device_map: str | None = None,
        max_memory: dict | None = None,
        offload_folder: str | None = None,
    ) -> LoadedModel:
        """Load ``model`` with ``profile`` (dtype / bitsandbytes 8- or 4-bit, device) from its local files.

        Progress goes to ``progress`` (stages config, weights, placing, warm-up, ready; fraction 0..1);
        ``cancel()`` is polled between stages. Offline: always ``local_files_only``.
        Raises ModelLoadError (already loaded, missing/truncated weights, unknown architecture, bad
        device_map/max_memory/offload_folder, any load failure), QuantizationUnavailableError (before
        loading starts), InsufficientMemoryError (out of memory during load: needed vs free), or
        OperationCancelledError. On any error nothing stays loaded.
        """
        t0 = time.perf_counter()

        def emit(stage: str, message: str, fraction: float | None = None) -> None:
            if progress is None:
                return
            try:
                progress(ProgressEvent(stage, message, _STAGE_FRACTION.get(stage) if fraction is None else fraction,
                                       time.perf_counter() - t0))
            except Exception:  # noqa: BLE001 - a broken progress display must not break the load
                log.warning("progress callback failed", exc_info=True)

        def check_cancel(stage: str) -> None:
            if cancel is not None and cancel():
                raise OperationCancelledError(
                    f"loading {model.model_id} was cancelled at stage {stage}; nothing is left loaded",
                    "load it again when ready",
                )

        with self._lock:
            if model.model_id in self._entries:
                raise ModelLoadError(f"{model.model_id} is already loaded", "unload it first, then load it again")
            precision = Precision(profile.precision)
            self.check_quantization(precision, profile.device)
            dm = self._device_map(profile, device_map)
            mm = self._check_max_memory(max_memory)
            off = self._check_offload(offload_folder)
            check_cancel("start")

            emit("config", f"reading the config and weight headers of {model.model_id}")
            spec = est.read_model_spec(model.path)  # missing / truncated weights fail here, before torch work
            config = self._load_config(model)
            check_cancel("config")

            _tune_malloc()
            anon0, file0 = process_resident_bytes()
            gpu_used0 = self._gpu_used_all() if dm != "cpu" else {}
            gpu_before = None
            obj: Any = None
            failure: BaseException | None = None
            tensors: list[Any] | None = None
            ok = False
            try:
                emit("weights", f"loading weights ({precision.value}, device_map {dm})")
                obj = self._from_pretrained(model, config, precision, profile, dm, mm, off)
                check_cancel("weights")
                emit("placing", "placing weights on devices")
                tensors = list(_unique_tensors(obj))  # one walk of the module tree serves the next three
                device, gpus = _device_summary(obj, tensors)
                footprint = sum(t.nbytes for t in tensors)
                weight_files = [Path(model.path) / n for n, _size in spec.weight_files]
                mapped = _mapped_weight_bytes(tensors, weight_files)
                if gpus and all(gpu_used0.get(g) is not None for g in gpus):
                    gpu_before = sum(gpu_used0[g] for g in gpus)
                check_cancel("placing")
                emit("warm-up", "touching every weight so it is resident")
                touch_weights(obj, lambda f: emit("warm-up", f"touched {f:.0%} of the weights", 0.9 + 0.1 * f),
                              tensors=tensors)
                tensors = None
                check_cancel("warm-up")
                ok = True
            except BaseException as exc:  # noqa: BLE001 - mapped to a project error below, outside this block
                failure = self._map_load_error(exc, model, profile, dm)
            finally:
                if not ok:
                    if obj is not None:
                        _drop_tensors(obj)
                    obj = None
                    tensors = None
                    config = None
                    self.clear_caches()
            if failure is not None:
                raise failure
            info = LoadedModel(
                model_id=model.model_id,
                backend=BACKEND_NAME,
                device=device,
                footprint_bytes=footprint,
                profile=profile,
                loaded_at=time.time(),
                state="ready",
            )
            self._entries[model.model_id] = _Entry(
                model=obj, tokenizer=None, cached=model, info=info, gpu_indices=gpus, mapped_bytes=mapped,
                anon_before=anon0, file_before=file0, gpu_before=gpu_before,
            )
            self._publish()
            emit("ready", f"{model.model_id} ready on {device}: {fmt_bytes(footprint)}"
                          + (f" ({fmt_bytes(mapped)} memory-mapped from the weight files)" if mapped else ""))
            return info

    def _load_config(self, model: CachedModel) -> Any:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from transformers import AutoConfig, __version__

        problem: str | None = None
        config = None
        try:
            config = AutoConfig.from_pretrained(model.path, local_files_only=True, trust_remote_code=False)
        except (ValueError, KeyError) as exc:
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        except OSError as exc:
            raise ModelLoadError(f"cannot read the config of {model.model_id} in {model.path}: {exc}",
                                 "download the model again") from None
        if config is None:
            raise ModelLoadError(
                f"{model.model_id}: config.json names an architecture ({model.architecture or 'unknown'}) that "
                f"Transformers {__version__} does not know ({problem})",
                "update transformers, or pick another model (memctl never runs a model's own code)",
            )
        try:
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            raise ModelLoadError(
                f"{model.model_id} ({type(config).__name__}) is not a causal language model Transformers "
                f"{__version__} can load for generation",
                "pick a text-generation (causal LM) model",
            ) from None
        return config

    def _from_pretrained(self, model: CachedModel, config: Any, precision: Precision, profile: Profile,
                         device_map: str, max_memory: dict | None, offload_folder: str | None) -> Any:
        torch = _torch()
        from transformers import AutoModelForCausalLM

        on_cuda = device_map is not None and device_map != "cpu"
        dtypes = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
        compute = torch.float16 if on_cuda else torch.bfloat16
        kwargs: dict[str, Any] = {
            "config": config,
            "dtype": dtypes.get(precision, compute),
            "local_files_only": True,
            "trust_remote_code": False,
        }
        # A CPU-only load without placement limits takes Transformers' plain path (no accelerate
        # dispatch): measured ~10 ms faster on a 0.5 B model, same result.
        if device_map != "cpu" or max_memory is not None or offload_folder is not None:
            kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = offload_folder
        if precision.is_quantized:
            _quiet_bitsandbytes()
            from transformers import BitsAndBytesConfig

            if precision is Precision.INT8:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=on_cuda  # lets auto maps spill to CPU
                )
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type=precision.value,
                    bnb_4bit_use_double_quant=bool(profile.double_quant),
                    bnb_4bit_compute_dtype=compute,
                )
        obj = AutoModelForCausalLM.from_pretrained(model.path, **kwargs)
        obj.eval()
        return obj

    def _map_load_error(self, exc: BaseException, model: CachedModel, profile: Profile, device_map: str) -> BaseException:
        """A project error built from strings only (no reference to the failed objects)."""
        if isinstance(exc, MemctlError):
            return exc
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: let them through
            return exc
        details = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if _is_oom(exc):
            needed = None
            try:
                needed = est.estimate(model, profile, self.settings).total_bytes
            except MemctlError:
                pass
            free = self._free_bytes(device_map)
            return InsufficientMemoryError(
                f"out of memory while loading {model.model_id} ({profile.precision.value} on {device_map}): "
                f"needs about {fmt_bytes(needed)}, {fmt_bytes(free)} was free",
                "clear memory, unload other models, or choose a lighter precision (int8/nf4) or a smaller model",
                needed_bytes=needed,
                free_bytes=free,
                details=details,
            )
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "safetensors" in type(exc).__module__ or "SafetensorError" in type(exc).__name__:
            return ModelLoadError(f"weights of {model.model_id} are corrupt: {text}",
                                  "delete the model from the cache and download it again", details=details)
        return ModelLoadError(f"could not load {model.model_id}: {type(exc).__name__}: {text}",
                              "see details; check the model files and the profile", details=details)

    def _free_bytes(self, device_map: str) -> int | None:
        if device_map.startswith("cuda") or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            torch = sys.modules.get("torch")
            try:
                if torch is not None and torch.cuda.is_available():
                    idx = int(device_map.split(":")[1]) if device_map.startswith("cuda:") else 0
                    return int(torch.cuda.mem_get_info(idx)[0])
            except Exception:  # noqa: BLE001 - unknown is fine in an error message
                return None
        return process_free_bytes()

    def _gpu_used_all(self) -> dict[int, int | None]:
        """Used bytes of every visible GPU before a load (the model's GPUs are known only after it)."""
        torch = sys.modules.get("torch")
        try:
            count = torch.cuda.device_count() if torch is not None and torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001
            count = 0
        return {i: self._gpu_used_sum((i,)) for i in range(count)}

    def _gpu_used_sum(self, gpus: tuple[int, ...]) -> int | None:
        total = 0
        for i in gpus:
            used = self._gpu_used(i) if self._gpu_used is not None else None
            if used is None:
                torch = sys.modules.get("torch")
                try:
                    free, tot = torch.cuda.mem_get_info(i)  # type: ignore[union-attr]
                    used = int(tot - free)
                except Exception:  # noqa: BLE001
                    return None
            total += used
        return total

    # ------------------------------------------------------------------ unload
    def unload(self, model_id: str) -> UnloadReport:
        """Drop every reference to ``model_id``, clear caches and measure what came back.

        Raises :class:`ModelNotFoundError` when it is not loaded. The report's ``freed_bytes`` and
        ``still_held_bytes`` are measured (NVML used memory on its GPUs, or on CPU the process's
        RssAnon, plus RssFile when weights were memory-mapped); ``verdict`` is SUCCESS when what stays
        held is within max(50 MiB, 5 % of the model's bytes), WARNING otherwise, saying so plainly.
        """
        with self._lock:
            entry = self._entries.pop(model_id, None)
            if entry is None:
                raise ModelNotFoundError(f"{model_id} is not loaded in this process",
                                         "see the list of loaded models")
            self._publish()
            expected = entry.info.footprint_bytes or 0
            device = entry.info.device
            gpus = entry.gpu_indices
            anon_before_load, file_before_load = entry.anon_before, entry.file_before
            gpu_before_load = entry.gpu_before
            mapped = entry.mapped_bytes
            anon_s, file_s = process_resident_bytes()
            gpu_start = self._gpu_used_sum(gpus) if gpus else None
            model_obj, entry.model, entry.tokenizer = entry.model, None, None
            del entry
            try:
                _drop_tensors(model_obj)
            except Exception:  # noqa: BLE001 - dropping our reference below still frees it in most cases
                log.warning("could not empty the tensors of %s", model_id, exc_info=True)
            del model_obj
            self.clear_caches()
            tolerance = max(RECLAIM_TOLERANCE_MIN_BYTES, int(RECLAIM_TOLERANCE_FRACTION * expected))

            def held(now: int, start: int | None, before: int | None) -> int:
                candidates = []
                if start is not None:
                    candidates.append(expected - (start - now))
                if before is not None:
                    candidates.append(now - before)
                return max(0, min(candidates)) if candidates else expected

            if gpus:
                measure = "nvml_used" if self._gpu_used is not None else "cuda_mem_get_info"
                deadline = time.monotonic() + GPU_RECLAIM_WAIT_S
                now_used = self._gpu_used_sum(gpus)
                while now_used is not None and held(now_used, gpu_start, gpu_before_load) > tolerance \
                        and time.monotonic() < deadline:
                    time.sleep(GPU_RECLAIM_POLL_S)
                    now_used = self._gpu_used_sum(gpus)
                if now_used is None:
                    return UnloadReport(model_id, device, expected, 0, expected, measure, Outcome.WARNING,
                                        f"unloaded {model_id}, but GPU memory could not be measured (NVML unavailable)")
                still = min(held(now_used, gpu_start, gpu_before_load), expected)
                where = f"on {device}"
            else:
                # Weights memory-mapped from their files are resident as RssFile, not RssAnon.
                anon_e, file_e = process_resident_bytes()
                measure = "rss_anon+rss_file" if mapped else "rss_anon"
                with_file = 1 if mapped else 0
                still = min(held(anon_e + with_file * file_e, anon_s + with_file * file_s,
                                 anon_before_load + with_file * file_before_load), expected)
                where = "in this process's memory" if mapped else "in this process's private memory"
            freed = max(0, expected - still)
            if still <= tolerance:
                verdict = Outcome.SUCCESS
                message = (f"unloaded {model_id}: {fmt_bytes(freed)} of {fmt_bytes(expected)} came back"
                           f" ({measure}); {fmt_bytes(still)} still held {where}, within the {fmt_bytes(tolerance)}"
                           " tolerance")
            else:
                verdict = Outcome.WARNING
                message = (f"unloaded {model_id}, but {fmt_bytes(still)} of {fmt_bytes(expected)} is still held "
                           f"{where} ({measure}): the memory allocator or another reference keeps it; "
                           "'clear memory' may return it, restarting the dashboard always does")
            return UnloadReport(model_id, device, expected, freed, still, measure, verdict, message)

    def unload_all(self) -> list[UnloadReport]:
        """Unload every model; a failure becomes an ERROR report and the others still run."""
        reports: list[UnloadReport] = []
        with self._lock:
            for model_id in list(self._entries):
                try:
                    reports.append(self.unload(model_id))
                except Exception as exc:  # noqa: BLE001 - every model must get its turn
                    reports.append(UnloadReport(model_id, "?", 0, 0, 0, "none", Outcome.ERROR,
                                                f"could not unload {model_id}: {exc}"))
        return reports

    def clear_caches(self) -> dict:
        """gc.collect(); torch.cuda.empty_cache() and ipc_collect() when CUDA is up; malloc_trim(0) on glibc.

        Returns what ran: ``{"gc_collect": objects found, "cuda_empty_cache": bool, "cuda_ipc_collect": bool,
        "malloc_trim": bool | None}``. Never imports torch (nothing to clear when it is not imported).
        """
        actions: dict[str, Any] = {"gc_collect": gc.collect()}
        torch = sys.modules.get("torch")
        cuda_up = False
        try:
            cuda_up = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        except Exception:  # noqa: BLE001
            cuda_up = False
        if cuda_up:
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
        actions["cuda_empty_cache"] = cuda_up
        actions["cuda_ipc_collect"] = cuda_up
        actions["malloc_trim"] = _malloc_trim()
        return actions

    # ------------------------------------------------------------------ generate
    def generate(self, model_id: str, prompt: str, max_new_tokens: int = 16, temperature: float = 0.0,
                 top_p: float = 1.0) -> str:
        """Generate up to ``max_new_tokens`` after ``prompt`` (greedy when ``temperature`` is 0); return the new text.

        The tokenizer is loaded on first use (from the model's folder, offline). Raises
        ModelNotFoundError (not loaded), MemctlError (invalid arguments), ModelLoadError (no tokenizer,
        generation failed) or InsufficientMemoryError.
        """
        if not isinstance(prompt, str) or not prompt:
            raise MemctlError("the prompt is empty", "type a prompt")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= 4096:
            raise MemctlError(f"max_new_tokens {max_new_tokens!r} is out of range", "use 1 to 4096")
        if not 0.0 <= float(temperature) <= 5.0:
            raise MemctlError(f"temperature {temperature!r} is out of range", "use 0 (greedy) to 5")
        if not 0.0 < float(top_p) <= 1.0:
            raise MemctlError(f"top_p {top_p!r} is out of range", "use a value in (0, 1]")
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                raise ModelNotFoundError(f"{model_id} is not loaded", "load it first")
            if entry.tokenizer is None:
                entry.tokenizer = self._load_tokenizer(entry.cached)
            tok, obj = entry.tokenizer, entry.model
            torch = _torch()
            failure: BaseException | None = None
            text = ""
            try:
                inputs = tok(prompt, return_tensors="pt").to(_input_device(obj))
                kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
                if temperature > 0:
                    kwargs.update(temperature=float(temperature), top_p=float(top_p))
                pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                if pad is not None:
                    kwargs["pad_token_id"] = pad
                with torch.inference_mode():
                    out = obj.generate(**inputs, **kwargs)
                n_in = inputs["input_ids"].shape[1]
                text = tok.decode(out[0, n_in:], skip_special_tokens=True)
                del out, inputs
            except Exception as exc:  # noqa: BLE001 - mapped below, outside the except block
                if _is_oom(exc):
                    failure = InsufficientMemoryError(
                        f"out of memory while generating with {model_id}",
                        "lower max_new_tokens or the context, or clear memory",
                        free_bytes=self._free_bytes("cpu" if not entry.gpu_indices else f"cuda:{entry.gpu_indices[0]}"),
                    )
                else:
                    failure = ModelLoadError(f"generation with {model_id} failed: {type(exc).__name__}: {exc}",
                                             "unload and load the model again")
            if failure is not None:
                gc.collect()
                raise failure
            return text

    @staticmethod
    def _load_tokenizer(model: CachedModel) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model.path, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any failure: the model folder has no usable tokenizer
            msg = f"{model.model_id} has no usable tokenizer in {model.path}: {type(exc).__name__}: {exc}"
        raise ModelLoadError(msg, "download the tokenizer files (tokenizer.json, tokenizer_config.json) too")
