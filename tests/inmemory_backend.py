"""A third backend, real and in memory: it implements the Backend protocol without torch or Docker.

It proves that adding a backend is one module plus one registry line (``MEMCTL_BACKENDS`` or
``[backends]`` in config: ``inmem = "tests.inmemory_backend:create"``), and gives the controller and
server tests a fast backend. Its "model" answers deterministically:

* chat: ``"echo: <last user message>"``, one word per token;
* with tools, a last user message ``"call <tool> <json arguments>"`` gives a Qwen-style
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (family "qwen");
* the memory it claims is the estimate, booked on a ledger (tests wire it to the fake NVML's used bytes).

Knobs (class attributes a test may change on an instance): ``start_delay_s``, ``token_delay_s``,
``fail_on_start`` / ``fail_on_verify`` / ``no_tools`` (model ids).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
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
    msg,
)
from memory_controller.errors import ModelLoadError, OperationCancelledError
from memory_controller.types import CachedModel, MemoryEstimate, Outcome, Precision, Profile, SystemSnapshot

Ledger = Callable[[str, int], None]  # (device key, delta bytes)


class InMemoryBackend(BackendBase):
    id = "inmem"
    capabilities = Capabilities(
        precisions=(Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8, Precision.NF4),
        devices=("cuda", "cpu"),
        fit_ladder=(Precision.INT8, Precision.NF4),
        serves_http=False,
        generates_in_process=True,
        needs_gpu=False,
        label="in-memory (tests)",
    )

    def __init__(self, settings: Any = None, probe: Any = None, *, ledger: Ledger | None = None,
                 backend_id: str = "inmem") -> None:
        self.id = backend_id
        self.settings = settings
        self.ledger = ledger
        self.start_delay_s = 0.0
        self.token_delay_s = 0.0
        self.fail_on_start: set[str] = set()
        self.fail_on_verify: set[str] = set()
        self.no_tools: set[str] = set()  # model ids whose "template" does not render tools
        self.requests: list[GenerationRequest] = []  # what generate_stream was asked, in order
        self.start_gate: threading.Event | None = None  # set: a start waits for it (tests order events)
        self.starts = 0
        self.stops = 0
        self._lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._running: dict[str, Deployment] = {}

    # ------------------------------------------------------------------ protocol
    def availability(self, snapshot: SystemSnapshot) -> Availability:
        return Availability(True)

    @staticmethod
    def _device_key(profile: Profile) -> str:
        if profile.device == "cpu":
            return "host"
        return f"gpu:{profile.gpu_ids[0] if profile.gpu_ids else 0}"

    def claim(self, model: CachedModel, profile: Profile, estimate: MemoryEstimate,
              snapshot: SystemSnapshot) -> Claim:
        blockers: tuple[Message, ...] = ()
        if profile.precision not in self.capabilities.precisions:
            blockers = (msg("backend.precision_unsupported", f"{self.id} cannot serve {profile.precision.value}",
                            backend=self.id, precision=profile.precision.value),)
        return Claim({self._device_key(profile): estimate.total_bytes}, blockers)

    def check_model(self, model: CachedModel, profile: Profile) -> tuple[Message, ...]:
        return ()

    def deployments(self) -> list[Deployment]:
        with self._lock:
            return list(self._running.values())

    def start(self, model: CachedModel, profile: Profile, claim: Claim, *, progress: Any = None,
              cancel: Callable[[], bool] | None = None) -> Deployment:
        end = time.monotonic() + self.start_delay_s
        while time.monotonic() < end:
            if cancel is not None and cancel():
                raise OperationCancelledError(f"start of {model.model_id} cancelled", "start it again")
            time.sleep(0.01)
        if self.start_gate is not None:
            while not self.start_gate.wait(0.01):
                if cancel is not None and cancel():
                    raise OperationCancelledError(f"start of {model.model_id} cancelled", "start it again")
        if model.model_id in self.fail_on_start:
            raise ModelLoadError(f"{model.model_id}: the in-memory backend was told to fail", "a test knob")
        dep = Deployment(
            backend_id=self.id, handle=model.model_id, model_id=model.model_id, profile=profile,
            state=DeploymentState.STARTING, memory_bytes=dict(claim.bytes_by_device), started_at=time.time(),
            name=model.model_id, device="cpu" if profile.device == "cpu" else "cuda:0",
        )
        with self._lock:
            if model.model_id in self._running:
                raise ModelLoadError(f"{model.model_id} is already running", "stop it first")
            self._running[model.model_id] = dep.to(DeploymentState.READY)
            self.starts += 1
        for key, n in claim.bytes_by_device.items():
            if self.ledger:
                self.ledger(key, n)
        return self._running[model.model_id]

    def stop(self, handle: str) -> ReleaseReport:
        with self._lock:
            dep = self._running.pop(handle, None)
            if dep is not None:
                self.stops += 1
        if dep is None:
            return ReleaseReport(self.id, handle, handle, "", 0, 0, 0, "memory", Outcome.SUCCESS,
                                 msg("release.already_gone", f"{handle} was not running", handle=handle))
        for key, n in dep.memory_bytes.items():
            if self.ledger:
                self.ledger(key, -n)
        total = dep.footprint_bytes
        return ReleaseReport(self.id, handle, dep.model_id, dep.device, total, total, 0, "memory", Outcome.SUCCESS,
                             msg("release.freed", f"{dep.model_id}: freed {total} bytes",
                                 model=dep.model_id, freed_bytes=total))

    def verify(self, deployment: Deployment) -> str:
        if deployment.model_id in self.fail_on_verify:
            raise ModelLoadError(f"{deployment.model_id} did not answer", "a test knob")
        return "answered"

    def clear_caches(self) -> dict[str, Any]:
        return {"inmem": True}

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _prompt_text(request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        return " ".join(str(m.get("content") or "") for m in request.messages or ())

    def prompt_tokens(self, deployment: Deployment, request: GenerationRequest) -> int:
        n_msgs = len(request.messages or ())
        return len(self._prompt_text(request).split()) + 3 * n_msgs + (8 * len(request.tools or ()))

    def model_family(self, deployment: Deployment) -> str | None:
        return None if deployment.model_id in self.no_tools else "qwen"

    # optional: read before loading (the serving scheduler's admission)
    def count_prompt_tokens(self, model: CachedModel, request: GenerationRequest) -> int:
        """The prompt's tokens as :meth:`prompt_tokens` counts them, without the model running."""
        return self.prompt_tokens(None, request)  # type: ignore[arg-type]

    def tool_support(self, model: CachedModel) -> bool | None:
        """Whether the model's "template" renders tools (``no_tools``: a knob)."""
        return model.model_id not in self.no_tools

    def _answer(self, request: GenerationRequest) -> list[str]:
        if request.prompt is not None:
            words = request.prompt.split()
            return [" " + w for w in reversed(words)] or [" ."]
        last = next((m for m in reversed(request.messages or ()) if m.get("role") == "user"), None)
        text = str(last.get("content") or "") if last else ""
        if request.tools and text.startswith("call "):
            _, _, rest = text.partition(" ")
            name, _, args = rest.partition(" ")
            try:
                arguments = json.loads(args) if args.strip() else {}
            except ValueError:
                arguments = {"raw": args}
            call = json.dumps({"name": name, "arguments": arguments})
            return ["<tool_call>", "\n", call, "\n", "</tool_call>"]
        words = ["echo:"] + text.split()
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def generate_stream(self, deployment: Deployment, request: GenerationRequest,
                        cancel: Callable[[], bool]) -> Iterator[GenerationChunk]:
        with self._gen_lock:
            self.requests.append(request)
            pieces = self._answer(request)
            prompt = self.prompt_tokens(deployment, request)
            produced = ""
            n = 0
            for piece in pieces:
                if cancel():
                    yield GenerationChunk("", "cancelled", prompt, n)
                    return
                if n >= request.max_new_tokens:
                    yield GenerationChunk("", "length", prompt, n)
                    return
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
                candidate = produced + piece
                hit = next((s for s in request.stop if s and s in candidate), None)
                if hit is not None:
                    cut = candidate[: candidate.index(hit)]
                    yield GenerationChunk(cut[len(produced):], None, None, None)
                    yield GenerationChunk("", "stop", prompt, n + 1)
                    return
                produced = candidate
                n += 1
                yield GenerationChunk(piece, None, None, None)
            yield GenerationChunk("", "stop", prompt, n)


def create(settings: Any, probe: Any) -> InMemoryBackend:
    """Registry factory: ``inmem = "tests.inmemory_backend:create"``."""
    return InMemoryBackend(settings, probe)
