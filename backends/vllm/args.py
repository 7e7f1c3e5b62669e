"""Pure launch planning for vLLM containers: names, ``--gpu-memory-utilization``, ``vllm serve``
arguments, the tool-call parser of a model's family. No Docker, no I/O beyond reading a model's
``config.json`` (bounded).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memory_controller.backend import Claim, Message, msg
from memory_controller.errors import (
    ContainerError,
    CorruptDataError,
    InsufficientMemoryError,
    InvalidModelIdError,
    QuantizationUnavailableError,
    SettingsError,
)
from memory_controller.safejson import loads_bounded
from memory_controller.types import (
    CachedModel,
    DeviceSnapshot,
    DeviceStatus,
    MemoryEstimate,
    Precision,
    Profile,
    SystemSnapshot,
)
from memory_controller.units import fmt_bytes

from .options import vllm_options

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

NAME_PREFIX = "memctl-vllm-"
CONTAINER_HF_CACHE = "/root/.cache/huggingface/hub"
CONTAINER_MODELS_DIR = "/models"
API_KEY_ENV = "VLLM_API_KEY"  # vLLM reads it when --api-key is not given (vllm/envs.py)
_NAME_SLUG_MAX = 48
CONTAINER_NAME_MAX = 128
_CONFIG_MAX_BYTES = 4 * 1024 * 1024

# Tool-call family -> vLLM's --tool-call-parser.
TOOL_PARSERS: dict[str, str] = {"qwen": "hermes", "llama3": "llama3_json", "mistral": "mistral"}

_DTYPES = {
    Precision.FP16: "float16",
    Precision.BF16: "bfloat16",
    Precision.FP32: "float32",
    Precision.NF4: "auto",
}
SERVABLE = (Precision.FP16, Precision.BF16, Precision.NF4)


class InvalidContainerNameError(ContainerError):
    """A container name or id that Docker could never hold; refused before Docker is asked."""

    code = "invalid_container_name"


_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


def validate_container_name(name: str) -> str:
    """Return ``name`` when it can name a Docker container (or be its id); raise InvalidContainerNameError.

    Docker's own rule: ``[a-zA-Z0-9][a-zA-Z0-9_.-]+``; memctl also caps the length at 128.
    """
    shown = repr(name)[:80]
    hint = "give a container name as `memctl containers` lists it (letters, digits, '_', '.', '-')"
    if not isinstance(name, str) or not name.strip():
        raise InvalidContainerNameError("a container name is required (got an empty name)", hint)
    if len(name) > CONTAINER_NAME_MAX:
        raise InvalidContainerNameError(
            f"container name {shown}… is {len(name)} characters long; at most {CONTAINER_NAME_MAX} are allowed",
            hint)
    if "/" in name or ".." in name:
        raise InvalidContainerNameError(f"{shown} is not a container name (no '/' or '..' allowed)", hint)
    if not _NAME_RE.fullmatch(name):
        raise InvalidContainerNameError(
            f"{shown} is not a container name: it must start with a letter or digit, have at least two "
            "characters and use only letters, digits, '_', '.' and '-'", hint)
    return name


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_.-]+", "-", text.strip().lower()).strip("-._")
    slug = re.sub(r"-{2,}", "-", slug)
    if len(slug) > _NAME_SLUG_MAX:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        slug = slug[: _NAME_SLUG_MAX - 9].rstrip("-._") + "-" + digest
    return slug


def container_name_for(model_id: str) -> str:
    """``memctl-vllm-<slug>`` for a model id or local path (lower case, ``[a-z0-9_.-]``).

    Long ids are cut and get an 8-hex hash of the full id so names stay unique.
    Raises InvalidModelIdError for an id with nothing usable in it.
    """
    slug = _slug(model_id)
    if not slug:
        raise InvalidModelIdError(
            f"model id {model_id!r} has no letters or digits to name a container after",
            "pass a Hugging Face id such as org/name or a model directory path",
        )
    return NAME_PREFIX + slug


def compute_gpu_memory_utilization(needed_bytes: int, total_bytes: int, margin: float, cap: float) -> float:
    """The ``--gpu-memory-utilization`` fraction for a model needing ``needed_bytes`` on one GPU.

    ``needed_bytes / total_bytes + margin``, rounded up to 0.01 (but never above ``cap``).
    Raises InsufficientMemoryError when that exceeds ``cap`` (the numbers are in the message),
    when ``total_bytes`` is not positive or ``needed_bytes`` is negative; SettingsError for a
    ``margin`` outside [0, 1) or a ``cap`` outside (0, 1].
    """
    if total_bytes is None or total_bytes <= 0:
        raise InsufficientMemoryError(
            f"the GPU's total memory is unknown ({total_bytes!r} bytes): cannot size --gpu-memory-utilization",
            "check that NVML sees the GPU (nvidia-smi)",
            needed_bytes=needed_bytes,
        )
    if needed_bytes is None or needed_bytes < 0:
        raise InsufficientMemoryError(
            f"needed memory must be a byte count >= 0, got {needed_bytes!r}",
            "re-run the estimate for this model and profile",
        )
    if not (0 <= margin < 1) or not (0 < cap <= 1):
        raise SettingsError(
            f"gpu util margin {margin!r} must be in [0, 1) and cap {cap!r} in (0, 1]",
            "fix MEMCTL_VLLM_GPU_UTIL_MARGIN / MEMCTL_VLLM_GPU_UTIL_MAX",
        )
    raw = needed_bytes / total_bytes + margin
    if raw > cap + 1e-9:
        raise InsufficientMemoryError(
            f"the model needs {fmt_bytes(needed_bytes)} of the GPU's {fmt_bytes(total_bytes)} "
            f"({needed_bytes / total_bytes:.3f} + margin {margin:.2f} = {raw:.3f}), "
            f"above the cap of {cap:.2f} (MEMCTL_VLLM_GPU_UTIL_MAX)",
            "lower the context or batch, pick a 4-bit profile or a smaller model",
            needed_bytes=needed_bytes + int(margin * total_bytes),
            free_bytes=int(cap * total_bytes),
        )
    return min(cap, math.ceil(round(raw * 100, 6)) / 100)


def build_vllm_args(
    model_ref: str,
    served_name: str,
    profile: Profile,
    gpu_util: float,
    port: int,
    *,
    host: str = "0.0.0.0",
    tensor_parallel_size: int | None = None,
    revision: str | None = None,
    tool_parser: str | None = None,
) -> list[str]:
    """Arguments for the image's ``vllm serve`` entrypoint (model first, then flags).

    ``tensor_parallel_size`` defaults to ``len(profile.gpu_ids)`` or 1. NF4 becomes vLLM's in-flight
    ``--quantization bitsandbytes``; INT8 and FP4 raise QuantizationUnavailableError (vLLM only
    quantizes on the fly to 4-bit NF4). ``tool_parser`` adds ``--enable-auto-tool-choice
    --tool-call-parser``. The API key is never an argument (it goes in ``VLLM_API_KEY``).
    Raises ContainerError for an out-of-range util or port.
    """
    if not (0 < gpu_util <= 1):
        raise ContainerError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_util!r}",
                             "this is a bug in the caller: compute it with compute_gpu_memory_utilization")
    if not (1 <= port <= 65535):
        raise ContainerError(f"port {port!r} is not a TCP port", "set MEMCTL_VLLM_PORT to 1..65535")
    if profile.precision not in _DTYPES:
        raise QuantizationUnavailableError(
            f"vLLM cannot serve {profile.precision.value}: it quantizes on the fly only to 4-bit NF4 "
            "(bitsandbytes)",
            "use fp16/bf16 or nf4 with vLLM, or the Transformers backend for int8/fp4",
        )
    tp = tensor_parallel_size or (len(profile.gpu_ids) if profile.gpu_ids else 1)
    args = [
        model_ref,
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(profile.context_tokens),
        "--max-num-seqs", str(profile.batch),
        "--dtype", _DTYPES[profile.precision],
        "--tensor-parallel-size", str(tp),
        "--gpu-memory-utilization", f"{gpu_util:.2f}",
    ]
    if profile.precision is Precision.NF4:
        args += ["--quantization", "bitsandbytes"]
    if revision:
        args += ["--revision", revision]
    if tool_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", tool_parser]
    return args


# --------------------------------------------------------------------------- model family
def _family_of(model_type: str, architectures: Sequence[str], vocab_size: int | None) -> str | None:
    text = " ".join([model_type, *architectures]).lower()
    if "qwen" in text:
        return "qwen"
    if "mistral" in text or "mixtral" in text:
        return "mistral"
    # Llama 3.x has a 128k vocabulary; Llama 2 / CodeLlama (32k) have no tool-call format.
    if "llama" in text and vocab_size is not None and vocab_size >= 128_000:
        return "llama3"
    return None


def model_family(model: CachedModel) -> str | None:
    """Tool-call family ("qwen", "llama3", "mistral") from the model's ``config.json``, or None.

    The config is read with size and depth limits; an unreadable one means "unknown" (None).
    """
    path = Path(model.path) / "config.json"
    try:
        data = path.read_bytes()
        if len(data) > _CONFIG_MAX_BYTES:
            return None
        cfg = loads_bounded(data, what=f"config.json of {model.model_id}", expect=dict)
    except (OSError, CorruptDataError):
        cfg = {}
    model_type = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else ""
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)] if isinstance(
        cfg.get("architectures"), list) else []
    if model.architecture:
        archs.append(model.architecture)
    vocab = cfg.get("vocab_size")
    vocab_size = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
    return _family_of(model_type, archs, vocab_size)


def tool_parser_for(family: str | None) -> str | None:
    return TOOL_PARSERS.get(family or "")


# --------------------------------------------------------------------------- GPUs and the claim
@dataclass(frozen=True)
class GpuClaim:
    """What a start would hold: ``gpu_util`` × total on each chosen GPU."""

    gpu_util: float
    gpus: tuple[DeviceSnapshot, ...]
    bytes_by_device: dict[str, int]


# vLLM quantizes in flight to bitsandbytes 4-bit (NF4) up to v0.27.x; v0.28.0 removed it (read from
# the wheels on PyPI: quantization/bitsandbytes.py is in 0.27.1, absent from 0.28.0 and 0.33.0).
_LAST_WITH_BNB = (0, 27)


def inflight_nf4_supported(image_tag: str) -> bool | None:
    """Whether the vLLM image ``vX.Y.Z`` can quantize to NF4 in flight; None for a tag that names no
    version (a custom build: it is tried, and a refusal shows in the start's log tail)."""
    tag = image_tag.strip().lower()
    if tag in ("latest", "nightly"):
        return False
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.|$|-)", tag)
    if not m:
        return None
    return (int(m.group(1)), int(m.group(2))) <= _LAST_WITH_BNB


def precision_blocker(precision: Precision, image_tag: str | None = None) -> Message | None:
    """Why vLLM (image ``image_tag``) cannot serve ``precision``, or None."""
    if precision is Precision.NF4 and image_tag is not None and inflight_nf4_supported(image_tag) is False:
        return msg("backend.precision_unsupported",
                   f"vLLM {image_tag} cannot quantize to nf4 in flight (bitsandbytes was removed in v0.28); "
                   "use fp16/bf16, a pre-quantized (AWQ/GPTQ) checkpoint, the Transformers backend for nf4, "
                   "or set MEMCTL_VLLM_TAG to v0.27.1", backend="vllm", precision=precision.value, image_tag=image_tag)
    if precision in SERVABLE:
        return None
    return msg("backend.precision_unsupported",
               f"vLLM cannot serve {precision.value}: it quantizes on the fly only to 4-bit NF4; "
               "use fp16/bf16/nf4, or the Transformers backend for int8/fp4",
               backend="vllm", precision=precision.value)


def chosen_gpus(profile: Profile, gpus: Sequence[DeviceSnapshot]) -> tuple[list[DeviceSnapshot], Message | None]:
    """The GPUs a start would use, or a blocker (no GPU, a GPU id that is not there, memory unknown)."""
    if profile.gpu_ids is None:
        chosen = list(gpus)
    else:
        by_index = {g.index: g for g in gpus}
        missing = [i for i in profile.gpu_ids if i not in by_index]
        if missing:
            ids = ", ".join(map(str, missing))
            return [], msg("backend.gpu_missing",
                           f"GPU {ids} asked for by the profile is not among the probed GPUs "
                           f"({', '.join(str(g.index) for g in gpus) or 'none'})",
                           gpu_ids=missing)
        chosen = [by_index[i] for i in profile.gpu_ids]
    if not chosen:
        return [], msg("backend.no_gpu", "vLLM needs a GPU, and none was chosen or found; use the Transformers "
                                         "backend on CPU, or check the NVIDIA driver (nvidia-smi)", detail="")
    for g in chosen:
        if g.status is DeviceStatus.LOST or g.total_bytes is None or g.free_bytes is None:
            return [], msg("backend.gpu_memory_unknown",
                           f"GPU {g.index} ({g.name}) memory is unknown ({g.status.value}): "
                           "cannot check that vLLM fits", gpu=g.index, status=g.status.value)
    return chosen, None


def gpu_claim(profile: Profile, needed_bytes: int, gpus: Sequence[DeviceSnapshot], margin: float,
              cap: float) -> GpuClaim:
    """gpu_util and the bytes it claims per chosen GPU. Raises InsufficientMemoryError (over the cap,
    memory unknown), ContainerError (no GPU / unknown GPU id), SettingsError."""
    chosen, blocker = chosen_gpus(profile, gpus)
    if blocker is not None:
        err = InsufficientMemoryError if blocker.code == "backend.gpu_memory_unknown" else ContainerError
        raise err(blocker.text, "refresh the GPU list, or check the GPU with nvidia-smi")
    per_gpu_bytes = math.ceil(needed_bytes / len(chosen))
    min_total = min(g.total_bytes or 0 for g in chosen)
    util = compute_gpu_memory_utilization(per_gpu_bytes, min_total, margin, cap)
    return GpuClaim(util, tuple(chosen), {g.key: int(util * (g.total_bytes or 0)) for g in chosen})


def check_free(claim_bytes: dict[str, int], gpus: Sequence[DeviceSnapshot], gpu_util: float) -> None:
    """Raise InsufficientMemoryError when a GPU has less free memory than vLLM will claim on it."""
    by_key = {g.key: g for g in gpus}
    for key, need in claim_bytes.items():
        g = by_key.get(key)
        if g is None or g.free_bytes is None or g.total_bytes is None:
            raise InsufficientMemoryError(f"{key} memory is unknown: cannot check that vLLM fits",
                                          "check the GPU with nvidia-smi, then refresh")
        if g.free_bytes < need:
            raise InsufficientMemoryError(
                f"vLLM would claim {fmt_bytes(need)} ({gpu_util:.2f} × {fmt_bytes(g.total_bytes)}) on GPU "
                f"{g.index} ({g.name}), but only {fmt_bytes(g.free_bytes)} is free",
                "free GPU memory (unload other models, close programs using the GPU), "
                "or lower the context or batch",
                needed_bytes=need,
                free_bytes=g.free_bytes,
            )


def compute_claim(settings: Settings, model: CachedModel, profile: Profile, estimate: MemoryEstimate,
                  snapshot: SystemSnapshot) -> Claim:
    """gpu_memory_utilization × total on each chosen GPU, blockers and notes. Pure; never raises."""
    blockers: list[Message] = []
    notes: list[Message] = []
    bytes_by_device: dict[str, int] = {}
    detail: dict[str, Any] = {}
    if (b := precision_blocker(profile.precision, vllm_options(settings).tag)) is not None:
        blockers.append(b)
    chosen, b = chosen_gpus(profile, snapshot.gpus)
    if b is not None:
        blockers.append(b)
    if chosen:
        s = settings
        per_gpu = math.ceil(max(0, estimate.total_bytes) / len(chosen))
        min_total = min(g.total_bytes or 0 for g in chosen)
        try:
            util = compute_gpu_memory_utilization(per_gpu, min_total, vllm_options(s).gpu_util_margin, vllm_options(s).gpu_util_max)
        except InsufficientMemoryError as exc:
            need = per_gpu + int(vllm_options(s).gpu_util_margin * min_total)
            bytes_by_device = {g.key: need for g in chosen}
            blockers.append(msg("backend.over_util_cap", exc.message, needed_bytes=need,
                                cap=vllm_options(s).gpu_util_max, total_bytes=min_total))
        except SettingsError as exc:
            blockers.append(msg("backend.bad_settings", exc.message))
        else:
            bytes_by_device = {g.key: int(util * (g.total_bytes or 0)) for g in chosen}
            detail.update(gpu_util=util, gpu_ids=[g.index for g in chosen], tensor_parallel_size=len(chosen))
    family = model_family(model)
    parser = tool_parser_for(family)
    detail.update(family=family, tool_parser=parser)
    if parser is None:
        notes.append(msg("backend.tools_not_parsed",
                         f"{model.model_id}: tool calls are not parsed (unknown model family); "
                         "chat works, tools come back as text", model=model.model_id))
    return Claim(bytes_by_device, tuple(blockers), tuple(notes), detail)
