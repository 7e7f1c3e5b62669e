"""Values that cross layers: frozen dataclasses, units in the names.

Every layer (probe, catalog, estimator, backends, controller, UI) speaks in these types.
``to_jsonable`` turns any of them into plain JSON data for the CLI and the operation log.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The one range of a profile's knobs: the config's bands, the dashboard's fields, the CLI's flags and labels
# read back from a container all check against these.
MAX_CONTEXT_TOKENS = 1_048_576
MAX_BATCH = 256


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # bitsandbytes LLM.int8
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat
    FP4 = "fp4"  # bitsandbytes 4-bit float

    @property
    def is_quantized(self) -> bool:
        return self in (Precision.INT8, Precision.NF4, Precision.FP4)

    @property
    def is_4bit(self) -> bool:
        return self in (Precision.NF4, Precision.FP4)


class DeviceKind(str, enum.Enum):
    GPU = "gpu"
    HOST = "host"


class DeviceStatus(str, enum.Enum):
    """Health of one device row. Anything but OK carries a hint."""

    OK = "ok"
    PARTIAL = "partial"  # some fields NotSupported / unreadable; the rest is valid
    LOST = "lost"  # GPU fell off the bus or otherwise unreadable


class NvmlStatus(str, enum.Enum):
    OK = "ok"
    LIBRARY_NOT_FOUND = "library_not_found"
    DRIVER_NOT_LOADED = "driver_not_loaded"
    NO_DEVICES = "no_devices"
    NO_PERMISSION = "no_permission"
    ERROR = "error"


class Level(str, enum.Enum):
    """Memory status indicator (the guide's 🟢/🟡/🔴)."""

    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"

    @property
    def emoji(self) -> str:
        return {"green": "🟢", "yellow": "🟡", "red": "🔴"}[self.value]


class Outcome(str, enum.Enum):
    SUCCESS = "success"  # ✅
    WARNING = "warning"  # ⚠️
    ERROR = "error"  # ❌

    @property
    def emoji(self) -> str:
        return {"success": "✅", "warning": "⚠️", "error": "❌"}[self.value]


# --------------------------------------------------------------------------- messages as codes
@dataclass(frozen=True)
class Message:
    """A user-facing statement as a code and arguments; ``text`` is the English rendering.

    The UI and CLI translate by ``code`` (config/strings.*.toml: ``msg.<code>``) with ``args``;
    nothing parses ``text``.
    """

    code: str
    args: Mapping[str, Any] = field(default_factory=dict)
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.code


def msg(code: str, text: str, **args: Any) -> Message:
    return Message(code=code, args=dict(args), text=text)


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    name: str | None
    used_bytes: int | None  # None when the driver does not say


@dataclass(frozen=True)
class DeviceSnapshot:
    """One device at one moment. For the host, ``index`` is None and memory is RAM."""

    kind: DeviceKind
    index: int | None
    name: str
    uuid: str | None
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    utilization_pct: float | None
    processes: tuple[ProcessMemory, ...] = ()
    status: DeviceStatus = DeviceStatus.OK
    hint: str | None = None
    taken_at: float = 0.0  # time.time()

    @property
    def key(self) -> str:
        """Stable id for selectors and logs: ``gpu:0`` or ``host``."""
        return "host" if self.kind is DeviceKind.HOST else f"gpu:{self.index}"


@dataclass(frozen=True)
class SystemSnapshot:
    """All devices at one moment, plus why there are no GPUs when there are none."""

    gpus: tuple[DeviceSnapshot, ...]
    host: DeviceSnapshot
    nvml_status: NvmlStatus
    nvml_hint: str | None = None
    driver_version: str | None = None
    taken_at: float = 0.0

    @property
    def devices(self) -> tuple[DeviceSnapshot, ...]:
        return (*self.gpus, self.host)

    @property
    def has_gpu(self) -> bool:
        return any(g.status is not DeviceStatus.LOST for g in self.gpus)

    def device(self, key: str) -> DeviceSnapshot | None:
        return next((d for d in self.devices if d.key == key), None)

    def most_free_gpu(self) -> DeviceSnapshot | None:
        """The readable GPU with the most free memory (None when no GPU's memory can be read)."""
        readable = [g for g in self.gpus if g.free_bytes is not None]
        return max(readable, key=lambda g: g.free_bytes or 0) if readable else None


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """How to serve a model: the knobs the guide's recommendation table sets."""

    mode: str  # the backend id that serves it ("inmem", or whatever [backends] in the config names)
    precision: Precision
    context_tokens: int
    batch: int
    double_quant: bool = False  # 4-bit double quantisation (where the backend has it)
    device: str = "cuda"  # "cuda" | "cpu"
    gpu_ids: tuple[int, ...] | None = None  # None = all visible GPUs / auto

    def with_(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ProfileBand:
    """A row of the recommendation table (from config): applies when free >= min_free_bytes."""

    name: str
    min_free_bytes: int
    mode: str  # a backend id
    precision: Precision
    context_tokens: int
    batch: int
    limited: bool = False


@dataclass(frozen=True)
class Recommendation:
    device_key: str  # "gpu:0" / "host"
    free_bytes: int | None
    level: Level
    band: str  # ProfileBand.name that applies
    profile: Profile
    preferred_available: bool  # every backend the table names can serve on this device
    preferred_reason: str | None  # else why the first one cannot (no GPU, its engine is down...)
    reason: str  # one sentence: why this profile
    notes: tuple[Message, ...] = ()  # each adjustment, as a code + args (text: English)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class CachedModel:
    model_id: str  # "org/name" for the HF cache, or an absolute path for a local dir
    revision: str | None
    size_on_disk_bytes: int
    has_safetensors: bool
    has_config: bool
    architecture: str | None
    path: str  # snapshot directory
    source: str = "hf_cache"  # "hf_cache" | "local_dir"


@dataclass(frozen=True)
class CatalogResult:
    models: tuple[CachedModel, ...]
    warnings: tuple[str, ...] = ()
    cache_dir: str | None = None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs under a profile, broken down."""

    model_id: str
    profile: Profile
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    cuda_context_bytes: int
    total_bytes: int
    parameters: int
    source: str  # "safetensors_headers" | "weight_files"
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProgressEvent:
    """A step's progress, sent to callbacks. ``fraction`` in [0, 1] or None."""

    stage: str
    message: str
    fraction: float | None = None
    elapsed_s: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class StepRecord:
    name: str
    outcome: Outcome
    duration_s: float
    message: str = ""
    memory_before_bytes: int | None = None  # used on the target device
    memory_after_bytes: int | None = None
    code: str = ""  # the message as a code (UIs translate ``msg.<code>`` with ``args``); "" = English only
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> Message:
        return Message(self.code, dict(self.args), self.message)


@dataclass
class OperationRecord:
    op_id: str
    kind: str
    params: dict
    started_at: float
    ended_at: float | None = None
    steps: list[StepRecord] = field(default_factory=list)
    outcome: Outcome | None = None
    error: str | None = None
    memory_before: dict[str, int | None] = field(default_factory=dict)  # device key -> used bytes
    memory_after: dict[str, int | None] = field(default_factory=dict)


def to_jsonable(value: Any) -> Any:
    """Dataclasses/enums/tuples → plain JSON types (recursively)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value
