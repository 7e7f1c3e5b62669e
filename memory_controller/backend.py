"""The one interface every backend implements, and the values it speaks in.

The controller holds a registry ``{backend id: Backend}`` built from ``config/defaults.toml``
(``[backends]``: id -> "package.module:Class") and never branches on which backend it has.
Adding a backend is one module implementing :class:`Backend` plus one config line.

Contract per call (all sizes in bytes, device keys are ``"gpu:N"`` or ``"host"``):

* ``capabilities`` — static: precisions, devices, the fit ladder, whether it serves HTTP itself
  or generates in-process.
* ``availability(snapshot)`` — cheap (cached), never raises: can it run here, and why not.
* ``claim(model, profile, estimate, snapshot)`` — pure of side effects: how much each device will
  hold once it runs (an engine that reserves a fraction of the GPU claims that fraction; in-process
  backends claim the estimate) and blockers that forbid it. ``snapshot`` already counts what a plan unloads as free.
* ``deployments()`` — what runs now; never blocks on a slow engine (answers from a cache and
  refreshes it in the background when needed).
* ``start(model, profile, claim, progress, cancel)`` — all or nothing: returns a READY
  :class:`Deployment` or raises a ``MemctlError`` leaving nothing of its own behind.
* ``stop(handle)`` — idempotent (a handle that is gone is a success with nothing freed); returns a
  measured :class:`ReleaseReport`. Touches only what this backend owns.
* ``verify(deployment)`` — a quick check it answers; returns a short English detail or raises.
* ``clear_caches()`` — allocator/gc caches; returns {action: done?}.
* ``list_managed()`` — what runs, straight from the engine (raises when it cannot be reached); an
  emergency clear and ``deployments(fresh=True)`` use it. Default: ``deployments()``.
* ``containers_for_pids(pids, timeout_s)`` — host PID -> what of this backend's world runs it (a
  container...), for naming GPU holders. Default: nothing.
* ``start_timeout_s`` — how long a start may take (None: the controller's ``operation_timeout_s``);
  ``stop_timeout_s`` — how long a stop may wait for the engine (the controller's deadline adds it).
* ``count_prompt_tokens(model, request)`` / ``tool_support(model)`` — read before loading (the serving
  scheduler's admission): the prompt's tokens and whether the chat template renders tools, from the
  model's files alone. Default: None (not offered; admission asks another backend, or passes).
* For a backend with its own model store (not checkpoint folders; e.g. Ollama's GGUF files; it sets
  ``capabilities.own_models_only``): ``list_models()`` and ``resolve_model(id)`` give :class:`CachedModel`
  values whose ``source`` is the backend id and whose ``path`` is a ``scheme://`` address it registered a
  sizer for (``memory_controller.estimate.register_sizer``); ``supports_tools(model)`` says whether such a
  model can call tools (the server refuses a tools request with 400 before loading when it says False).
  Default: ``[]``, None, None.
* ``holder_client`` — a server holding models memctl did not load (another holder, a
  :class:`~memory_controller.holders.HolderSource`), which the core may ask for its models and to unload
  them. Default: None.

:class:`BackendBase` gives every default above; a backend inherits it and overrides what it has. The core
calls each member directly: it never probes a backend with ``getattr``/``hasattr``
(``tests/test_backend_protocol.py`` fails when it does).

In-process backends (``capabilities.generates_in_process``) also implement
:class:`InProcessGenerator`; HTTP backends give ``Deployment.endpoint`` and the server proxies.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .types import (
    CachedModel,
    MemoryEstimate,
    Outcome,
    Precision,
    Profile,
    ProgressCallback,
    SystemSnapshot,
)
from .types import Message as Message  # re-exported: backends build messages from here
from .types import msg as msg

if TYPE_CHECKING:  # pragma: no cover
    from .holders import HolderSource


# --------------------------------------------------------------------------- capabilities
@dataclass(frozen=True)
class Capabilities:
    precisions: tuple[Precision, ...]
    devices: tuple[str, ...]  # "cuda", "cpu"
    # precisions the fit ladder steps down to, in order, when the chosen one does not fit
    fit_ladder: tuple[Precision, ...]
    serves_http: bool  # runs its own OpenAI-compatible server (Deployment.endpoint)
    generates_in_process: bool  # implements InProcessGenerator
    needs_gpu: bool
    label: str = ""  # human name shown in the UI
    # serves only the models it lists itself (list_models/resolve_model): a checkpoint folder asked of it
    # goes to another backend
    own_models_only: bool = False


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: Message | None = None


@dataclass(frozen=True)
class Claim:
    """What a start would hold per device, and what forbids it."""

    bytes_by_device: Mapping[str, int]
    blockers: tuple[Message, ...] = ()
    notes: tuple[Message, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)  # backend's own (e.g. gpu_util)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_device.values())


# --------------------------------------------------------------------------- deployments
class DeploymentState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_TRANSITIONS: dict[DeploymentState, frozenset[DeploymentState]] = {
    DeploymentState.STARTING: frozenset({DeploymentState.READY, DeploymentState.FAILED, DeploymentState.STOPPING}),
    DeploymentState.READY: frozenset({DeploymentState.STOPPING, DeploymentState.FAILED}),
    DeploymentState.STOPPING: frozenset({DeploymentState.STOPPED, DeploymentState.FAILED}),
    DeploymentState.FAILED: frozenset({DeploymentState.STOPPING, DeploymentState.STOPPED}),
    DeploymentState.STOPPED: frozenset(),
}


class InvalidTransitionError(RuntimeError):
    pass


@dataclass(frozen=True)
class Deployment:
    """Whatever runs: an in-process model, a container, ...; the one value UI, CLI, log and server use."""

    backend_id: str
    handle: str  # the backend's own id (model id in-process; container id for Docker)
    model_id: str
    profile: Profile | None
    state: DeploymentState
    memory_bytes: Mapping[str, int]  # device key -> bytes this deployment holds (or claims)
    endpoint: str | None = None  # OpenAI base URL ("http://127.0.0.1:8000/v1") when it serves HTTP
    started_at: float = 0.0
    name: str | None = None  # a human name (container name)
    device: str = ""  # where it runs, as the backend says it: "cpu", "cuda:0", "cuda:0,1"
    warnings: tuple[Message, ...] = ()  # e.g. unreadable labels
    detail: Mapping[str, Any] = field(default_factory=dict)  # backend-specific facts (image, health…)

    @property
    def footprint_bytes(self) -> int:
        return sum(self.memory_bytes.values())

    @property
    def mapped_bytes(self) -> int:
        """Resident pages of memory-mapped weight files the model reads its weights from (a bf16 load on
        the CPU): page cache the model occupies, counted apart from ``memory_bytes`` (private memory,
        which the plan counts); 0 when none (``detail["mapped_bytes"]``)."""
        try:
            return max(0, int(self.detail.get("mapped_bytes") or 0))
        except (TypeError, ValueError):
            return 0

    @property
    def context_tokens(self) -> int | None:
        return self.profile.context_tokens if self.profile else None

    def to(self, state: DeploymentState, **changes: Any) -> Deployment:
        """The same deployment in ``state``; raises InvalidTransitionError for a transition the
        lifecycle does not allow (e.g. STOPPED -> READY)."""
        if state is not self.state and state not in _TRANSITIONS[self.state]:
            raise InvalidTransitionError(f"{self.backend_id}:{self.handle}: {self.state.value} -> {state.value}")
        return dataclasses.replace(self, state=state, **changes)


@dataclass(frozen=True)
class ReleaseReport:
    """What a stop gave back, measured (not assumed)."""

    backend_id: str
    handle: str
    model_id: str
    device: str
    expected_bytes: int  # what the deployment held
    freed_bytes: int  # measured
    still_held_bytes: int  # max(0, expected - freed)
    measure: str  # "nvml_used" | "rss_anon" | "docker" | "memory" ...
    verdict: Outcome
    message: Message
    mapped_bytes: int = 0  # resident pages of mapped weight files before the stop (Deployment.mapped_bytes)
    mapped_freed_bytes: int = 0  # of those, no longer mapped by the process after it (measured)

    @property
    def already_gone(self) -> bool:
        return self.message.code == "release.already_gone"


def describe_memory(memory_bytes: Mapping[str, int], mapped_bytes: int = 0) -> str:
    """What a deployment occupies, each part named: ``host 128 B private + 942.0 MiB mapped weight
    files`` (English; UIs render the numbers themselves)."""
    from .units import fmt_bytes

    parts = []
    for key, value in memory_bytes.items():
        if key == "host" and mapped_bytes:
            parts.append(f"host {fmt_bytes(value)} private + {fmt_bytes(mapped_bytes)} mapped weight files")
        else:
            parts.append(f"{key} {fmt_bytes(value)}")
    if mapped_bytes and "host" not in memory_bytes:
        parts.append(f"host {fmt_bytes(mapped_bytes)} mapped weight files")
    return ", ".join(parts)


# --------------------------------------------------------------------------- generation (serving)
@dataclass(frozen=True)
class GenerationRequest:
    """One request for an in-process backend. ``messages`` (chat, OpenAI shape, may hold tool calls
    and ``role: tool`` messages) or ``prompt`` (completions)."""

    messages: tuple[Mapping[str, Any], ...] | None = None
    prompt: str | None = None
    tools: tuple[Mapping[str, Any], ...] | None = None
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of generated text; the last chunk has ``finish_reason`` ("stop" | "length")
    and the token counts."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@runtime_checkable
class InProcessGenerator(Protocol):
    def prompt_tokens(self, deployment: Deployment, request: GenerationRequest) -> int:
        """Tokens the request's prompt takes once templated (the context guard uses it).
        Raises MemctlError (e.g. no chat template)."""

    def generate_stream(self, deployment: Deployment, request: GenerationRequest,
                        cancel: Callable[[], bool]) -> Iterator[GenerationChunk]:
        """Yield text as it is generated; stop early (finish_reason "cancelled") when ``cancel()``."""

    def model_family(self, deployment: Deployment) -> str | None:
        """Tool-call family ("qwen", "llama3", "mistral") or None when unknown."""


# --------------------------------------------------------------------------- the protocol
@runtime_checkable
class Backend(Protocol):
    id: str
    capabilities: Capabilities

    def availability(self, snapshot: SystemSnapshot) -> Availability: ...

    def claim(self, model: CachedModel, profile: Profile, estimate: MemoryEstimate,
              snapshot: SystemSnapshot) -> Claim: ...

    def check_model(self, model: CachedModel, profile: Profile) -> tuple[Message, ...]:
        """Blockers this backend sees in the model itself (no tokenizer, no chat template...)."""

    def deployments(self) -> list[Deployment]: ...

    def start(self, model: CachedModel, profile: Profile, claim: Claim, *,
              progress: ProgressCallback | None = None,
              cancel: Callable[[], bool] | None = None) -> Deployment: ...

    def stop(self, handle: str) -> ReleaseReport: ...

    def verify(self, deployment: Deployment) -> str: ...

    def clear_caches(self) -> dict[str, Any]: ...

    def list_managed(self) -> list[Deployment]:
        """What runs, straight from the engine (raises MemctlError when it cannot be reached); an emergency
        clear and ``deployments(fresh=True)`` use it."""

    def containers_for_pids(self, pids: Iterable[int], timeout_s: float = 2.0) -> Mapping[int, Any]:
        """Host PID -> what of this backend's world runs it (a container...), for naming GPU holders;
        {} when it runs nothing the PIDs belong to."""

    @property
    def start_timeout_s(self) -> float | None:
        """How long a start may take; None: the controller's ``operation_timeout_s``."""

    @property
    def stop_timeout_s(self) -> float:
        """How long a stop may wait for the engine (the controller's deadline adds it)."""

    def count_prompt_tokens(self, model: CachedModel, request: GenerationRequest) -> int | None:
        """Tokens ``request``'s prompt takes once templated for ``model``, counted without loading it (the
        serving scheduler's admission). None: this backend does not count (admission asks another backend,
        or passes). Raises MemctlError when the model cannot be templated (no tokenizer, no chat template)."""

    def tool_support(self, model: CachedModel) -> bool | None:
        """Whether ``model``'s chat template renders tools, read from its files without loading it.
        None: unknown (no template, or this backend does not read templates)."""

    def supports_tools(self, model: CachedModel) -> bool | None:
        """Whether a model this backend lists itself can call tools (False: the server refuses a tools
        request with 400 before loading). None: unknown, or not one of this backend's own models."""

    def list_models(self) -> list[CachedModel]:
        """The models of this backend's own store (``source``: the backend id, ``path``: a ``scheme://``
        address it registered a sizer for); [] when it has no store or the store does not answer."""

    def resolve_model(self, model_id: str) -> CachedModel | None:
        """``model_id`` as one of this backend's own models, or None when it is not one of them (or the
        store does not answer)."""

    @property
    def holder_client(self) -> HolderSource | None:
        """A server holding models memctl did not load (another holder: a :class:`HolderSource`), or None when
        this backend hands over none. May raise MemctlError."""


class BackendBase:
    """Defaults for the optional parts of :class:`Backend`: each means "this backend does not offer it"."""

    def deployments(self) -> list[Deployment]:  # pragma: no cover - every backend overrides it
        raise NotImplementedError

    def list_managed(self) -> list[Deployment]:
        return self.deployments()

    def containers_for_pids(self, pids: Iterable[int], timeout_s: float = 2.0) -> Mapping[int, Any]:
        return {}

    @property
    def start_timeout_s(self) -> float | None:
        return None

    @property
    def stop_timeout_s(self) -> float:
        return 0.0

    def count_prompt_tokens(self, model: CachedModel, request: GenerationRequest) -> int | None:
        return None

    def tool_support(self, model: CachedModel) -> bool | None:
        return None

    def supports_tools(self, model: CachedModel) -> bool | None:
        return None

    def list_models(self) -> list[CachedModel]:
        return []

    def resolve_model(self, model_id: str) -> CachedModel | None:
        return None

    @property
    def holder_client(self) -> HolderSource | None:
        return None


BackendFactory = Callable[..., Backend]
"""How the registry builds one: ``factory(settings, probe)``."""
