"""Every call the check makes into memctl, in one place: the controller's public surface and the CLI.

``MemoryController(settings)``: ``.devices()``, ``.estimate(model, profile)``, ``.max_context(model,
profile, free_bytes)``, ``.plan("transformers", model, profile)`` then ``.apply(plan)``, ``.deployments()``,
``.unload(model)`` (a ``ReleaseReport``: expected_bytes, freed_bytes, still_held_bytes, measure),
``.clear_memory()``, ``.emergency_clear()`` (an ``EmergencyReport``: outcome, steps, remaining, verdict),
``.holders()``, ``.recommend(model)``, ``.generating(deployment)`` with the backend's ``generate_stream``;
the CLI is ``python -m memctl_cli``; the server is ``server.openai_api.OpenAIService`` when the checkout has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory_controller import MemoryController
from memory_controller.errors import InsufficientMemoryError, MemctlError
from memory_controller.settings import Settings, load_settings
from memory_controller.types import Precision, Profile

BACKEND = "transformers"  # the backend id
ROOT = Path(__file__).resolve().parents[2]


def make_settings(**overrides: Any) -> Settings:
    """Settings from the environment (the check sets MEMCTL_HF_CACHE_DIR etc.), with ``overrides``."""
    return load_settings(**overrides)


def make_controller(settings: Settings) -> MemoryController:
    return MemoryController(settings)


def profile(precision: str, context_tokens: int, device: str, gpu_index: int | None = None,
            double_quant: bool = False) -> Profile:
    return Profile(mode="transformers", precision=Precision(precision), context_tokens=context_tokens, batch=1,
                   device=device, gpu_ids=None if gpu_index is None else (gpu_index,), double_quant=double_quant)


def devices(ctl: MemoryController):
    return ctl.devices()


def model_path(ctl: MemoryController, model_id: str) -> str:
    """The model's snapshot folder, as the catalog resolves it."""
    return ctl.resolve(model_id).path


def model_max_context(ctl: MemoryController, model_id: str) -> int | None:
    """The model's own maximum context (config ``max_position_embeddings``), None when it does not say."""
    from memory_controller.estimate import read_model_spec

    return read_model_spec(model_path(ctl, model_id)).max_position_embeddings


def cuda_context_reserve_bytes(settings: Settings) -> int:
    return int(settings.cuda_context_reserve_bytes)


def estimate(ctl: MemoryController, model_id: str, prof: Profile):
    return ctl.estimate(model_id, prof)


def max_context(ctl: MemoryController, model_id: str, prof: Profile, free_bytes: int | None = None) -> int:
    return ctl.max_context(model_id, prof, free_bytes)


@dataclass(frozen=True)
class PlanView:
    fits: bool
    needed_bytes: int
    free_bytes: int | None
    blockers: tuple[str, ...]
    raw: Any


def plan(ctl: MemoryController, model_id: str, prof: Profile) -> PlanView:
    p = ctl.plan(BACKEND, model_id, prof)
    return PlanView(bool(p.fits), int(p.needed_bytes), p.free_bytes_after_unload,
                    tuple(str(b) for b in p.blockers), p)


def apply(ctl: MemoryController, p: PlanView) -> None:
    """Runs the plan; raises the controller's MemctlError (InsufficientMemoryError when it refuses)."""
    ctl.apply(p.raw)


def loaded_ids(ctl: MemoryController) -> list[str]:
    return [d.model_id for d in ctl.deployments()]


@dataclass(frozen=True)
class UnloadView:
    expected_bytes: int
    freed_bytes: int
    still_held_bytes: int
    measure: str  # how the backend measured the release ("rss_anon" on the host, "nvml_used" on a GPU)
    verdict: str
    message: str


def unload(ctl: MemoryController, model_id: str) -> UnloadView:
    r = ctl.unload(model_id)
    return UnloadView(int(r.expected_bytes), int(r.freed_bytes), int(r.still_held_bytes), str(r.measure),
                      getattr(r.verdict, "value", str(r.verdict)), str(r.message))


def clear(ctl: MemoryController) -> None:
    ctl.clear_memory()


@dataclass(frozen=True)
class EmergencyView:
    outcome: str
    steps: tuple[str, ...]  # "name: outcome" per step
    remaining_bytes: dict[str, int]  # device key -> bytes still held by named holders after the clear
    verdict: str  # what still holds memory, or that nothing does


def emergency_clear(ctl: MemoryController) -> EmergencyView:
    r = ctl.emergency_clear()
    steps = tuple(f"{s.name}: {getattr(s.outcome, 'value', s.outcome)}" for s in r.steps)
    remaining = {d.device_key: sum(h.bytes or 0 for h in d.holders) for d in r.remaining}
    return EmergencyView(getattr(r.outcome, "value", str(r.outcome)), steps, remaining,
                         "" if r.verdict is None else str(r.verdict))


def holders_of(ctl: MemoryController, pid: int, device_key: str) -> int | None:
    """Bytes ``ctl.holders()`` names for process ``pid`` on ``device_key``; None when it is not listed."""
    found = [h for h in ctl.holders() if h.pid == pid and h.device_key == device_key]
    return None if not found else sum(h.bytes or 0 for h in found)


def recommend(ctl: MemoryController, model_id: str | None = None):
    return ctl.recommend(model_id)


def forward(ctl: MemoryController, model_id: str, prompt: str) -> None:
    """One pass over ``prompt`` and one generated token, through the controller's in-process generator."""
    from memory_controller.backend import GenerationRequest

    dep = next(d for d in ctl.deployments() if d.model_id == model_id)
    with ctl.generating(dep) as slot:
        req = GenerationRequest(prompt=prompt, max_new_tokens=1, temperature=0.0)
        for _chunk in slot.generator.generate_stream(dep, req, slot.cancelled):
            pass


def prompt_of_tokens(snapshot_dir: str, n_tokens: int) -> str:
    """A prompt the model's own tokenizer turns into exactly ``n_tokens`` tokens (checked)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(snapshot_dir, local_files_only=True)
    text = "a" + " a" * (n_tokens - 1)
    got = len(tok(text)["input_ids"])
    if got != n_tokens:
        raise RuntimeError(f"the check's prompt is {got} tokens, not {n_tokens}: the tokenizer changed")
    return text


def is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, InsufficientMemoryError)


def cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> tuple[int, Any, str]:
    """Run ``memctl ARGS --json`` with this interpreter and the checkout on PYTHONPATH: (exit code, JSON, stderr)."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "memctl_cli", *args, "--json"], env=full_env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        data = None
    return proc.returncode, data, proc.stderr


def has_server() -> bool:
    """Whether this checkout holds the memctl server's OpenAI API (``server/openai_api``)."""
    return (ROOT / "server" / "openai_api").is_dir() or (ROOT / "server" / "openai_api.py").is_file()


@dataclass(frozen=True)
class ChatView:
    events: int  # SSE data events before [DONE]
    done: bool  # whether [DONE] came
    completion_tokens: int | None  # from the usage chunk (stream_options.include_usage)
    text: str  # random weights often pick ids the small tokenizer renders as nothing


def serve_chat(ctl: MemoryController, settings: Settings, model_id: str, timeout_s: float = 300) -> ChatView:
    """A streamed chat completion through the memctl server's OpenAI API on 127.0.0.1 (a free port), as an
    IDE sends it (``stream_options.include_usage``). Needs ``has_server()`` and fastapi/uvicorn/httpx."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn
    from fastapi import FastAPI

    from server.openai_api import OpenAIService

    service = OpenAIService(ctl, settings)
    app = FastAPI()
    app.include_router(service.router)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gpu-check-server", daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 15
        while not server.started and thread.is_alive() and time.monotonic() < end:
            time.sleep(0.05)
        body = {"model": model_id, "stream": True, "max_tokens": 8, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}]}
        events, done, text, tokens = 0, False, "", None
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                          timeout=timeout_s) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data.strip() == "[DONE]":
                    done = True
                    break
                events += 1
                obj = json.loads(data)
                if obj.get("usage"):
                    tokens = int(obj["usage"].get("completion_tokens") or 0)
                for choice in obj.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or ""
        return ChatView(events, done, tokens, text)
    finally:
        server.should_exit = True
        thread.join(10)
        service.close()


__all__ = ["MemctlError"]
