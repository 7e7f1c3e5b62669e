"""The memctl server's cost, as ratios from one run (issue 10, item 13).

1. Proxy (vLLM mode): time to first byte and streaming time of a chat answer through memctl's /v1
   vs straight to the fake vLLM container (private dockerd, tests/fake_vllm). Goals: median first-byte
   overhead <= 5 ms, streaming throughput >= 0.98x. Requests alternate direct/proxied, each on a new
   connection (the fake closes every connection), medians of ROUNDS.
2. Transformers mode (needs the Transformers backend with in-process generation): tokens/s through
   /v1/completions vs plain ``model.generate`` on the same prompt and length (goal >= 0.95x), and vs
   ``transformers serve`` on the same model and request (goal >= 0.98x), when it runs offline here.
3. On demand: first token of a request for model B while A runs, through the server, vs
   unload(A) + load(B) + first token by hand (goal <= +0.5 s). Uses the Transformers backend when
   section 2 can run, else the fake vLLM container backend.

Run: .venv/bin/python bench/bench_serve.py [--rounds N] [--skip-proxy] [--skip-transformers]
(section 2 uses the ~63 M-parameter test shape; MEMCTL_BENCH_SERVE_05B=1 takes the ~0.5 B one, slow on 2 cores)
Nothing is left running: containers, the private dockerd and the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from memory_controller.settings import load_settings  # noqa: E402
from memory_controller.types import Precision, Profile  # noqa: E402
from tests import model_factory as mf  # noqa: E402

ANSWER_WORDS = 400
PACED_WORDS = 200
PACE_S = 0.005  # 200 tokens/s: a fast engine's streaming pace
COMPLETION_TOKENS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_stream(port: int, path: str, body: dict) -> tuple[float, float, bytes]:
    """(seconds to the first body byte, seconds to the end, body) on a fresh connection."""
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = resp.read1(1) if hasattr(resp, "read1") else resp.read(1)
    t_first = time.perf_counter() - t0
    rest = resp.read()
    t_end = time.perf_counter() - t0
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {(first + rest)[:300]!r}")
    return t_first, t_end, first + rest


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Server:
    """OpenAIService over a MemoryController on a real uvicorn (background thread)."""

    def __init__(self, ctl: Any, settings: Any) -> None:
        import threading

        import uvicorn
        from fastapi import FastAPI

        from server.openai_api import OpenAIService

        self.service = OpenAIService(ctl, settings)
        app = FastAPI()
        app.include_router(self.service.router)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.service.close()
        self.server.should_exit = True
        self.thread.join(10)


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def build_hub(work: Path, shape: Any, names: tuple[str, ...]) -> Path:
    """Random-weight models in a temporary HF cache, each with a minimal chat template (IDE plans
    refuse a model without one)."""
    hub = work / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        snap = mf.build_into_cache(hub, name, shape, seed=i)
        cfg_path = Path(snap) / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            cfg["chat_template"] = CHAT_TEMPLATE
            text = json.dumps(cfg)
            cfg_path.unlink()  # a snapshot file may be a link to a blob: write a file of its own
            cfg_path.write_text(text)
    return hub


# --------------------------------------------------------------------------- 1. proxy
def bench_proxy(rounds: int, work: Path) -> dict[str, Any]:
    import docker

    from memory_controller import MemoryController
    from tests.fake_pynvml import FakeGpu, FakeNvml
    from tests.fake_vllm.backend import FakeVllmHttpBackend
    from tests.fake_vllm.engine import start_engine
    from tests.fake_vllm.image import build_fake_image

    engine = start_engine()
    client = docker.DockerClient(base_url=engine.docker_host, timeout=60)
    net = None
    server = None
    ctl = None
    try:
        image = build_fake_image(client, variants={"paced": {"FAKE_VLLM_TOKEN_DELAY_S": str(PACE_S)}})
        net = client.networks.create(f"memctl-bench-{os.getpid()}", driver="bridge")
        hub = build_hub(work, mf.TINY, ("bench-a", "bench-b"))
        settings = load_settings(hf_cache_dir=hub, local_model_dirs=[], state_dir=work / "state",
                                 docker_host="unix:///nonexistent.sock", host_memory_budget_bytes=4096)
        gpu = FakeGpu(total_bytes=24 * 1024**3, used_bytes=1024**3)
        backend = FakeVllmHttpBackend(settings, client, image, free_port, net.name)
        ctl = MemoryController(settings, nvml=FakeNvml([gpu]).module(), backends={backend.id: backend})
        a, b = f"{mf.TEST_ORG}/bench-a", f"{mf.TEST_ORG}/bench-b"
        profile = Profile(mode=backend.id, precision=Precision.FP16, context_tokens=2048, batch=1, device="cuda")
        server = Server(ctl, settings)
        out: dict[str, Any] = {}
        # burst: the fake writes the whole answer at once (the proxy's own per-chunk cost, worst case);
        # paced: one token every PACE_S (a fast engine's real pace)
        for label, tag, words, n in (("burst", "test", ANSWER_WORDS, rounds),
                                     ("paced", "paced", PACED_WORDS, max(3, rounds // 2))):
            backend.image = image.rsplit(":", 1)[0] + ":" + tag
            ctl.apply(backend.id, a, profile)
            dep = next(d for d in ctl.deployments() if d.model_id == a)
            direct_port = int(dep.endpoint.rsplit(":", 1)[1].split("/")[0])
            body = {"model": a, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(words))}]}
            for port in (direct_port, server.port):  # warm-up
                post_stream(port, "/v1/chat/completions", body)
            ttfb: dict[str, list[float]] = {"direct": [], "proxy": []}
            total: dict[str, list[float]] = {"direct": [], "proxy": []}
            for i in range(n):
                order = [("direct", direct_port), ("proxy", server.port)]
                if i % 2:
                    order.reverse()
                for name, port in order:
                    t_first, t_end, raw = post_stream(port, "/v1/chat/completions", body)
                    assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
                    ttfb[name].append(t_first)
                    total[name].append(t_end - t_first)
            out[f"{label}_ttfb_direct_ms"] = median(ttfb["direct"]) * 1e3
            out[f"{label}_ttfb_proxy_ms"] = median(ttfb["proxy"]) * 1e3
            # median of the per-pair differences (each pair ran back to back, so the machine's load cancels)
            diffs = sorted((p - d) * 1e3 for d, p in zip(ttfb["direct"], ttfb["proxy"], strict=True))
            out[f"{label}_first_byte_overhead_ms"] = median(diffs)
            out[f"{label}_first_byte_overhead_p25_p75_ms"] = (
                f"{diffs[len(diffs) // 4]:.2f} .. {diffs[(3 * len(diffs)) // 4]:.2f}")
            out[f"{label}_stream_direct_s"] = median(total["direct"])
            out[f"{label}_stream_proxy_s"] = median(total["proxy"])
            out[f"{label}_throughput_ratio"] = median([d / p for d, p in zip(total["direct"], total["proxy"], strict=True)])
            ctl.unload(a)
        ctl.apply(backend.id, a, profile)

        # 3. on demand (HTTP backend): B while A runs, vs unload(A) + load(B) + first token by hand
        out.update(bench_on_demand(ctl, server, backend.id, a, b, profile, rounds=max(2, rounds // 10)))
        return out
    finally:
        if server is not None:
            server.stop()
        if ctl is not None:
            try:
                ctl.emergency_clear()
            except Exception as exc:  # noqa: BLE001
                print(f"clean-up: {exc}")
        if net is not None:
            try:
                net.remove()
            except Exception:  # noqa: BLE001
                pass
        client.close()
        engine.stop()


def first_token_s(port: int, model: str) -> float:
    """Seconds until a one-token answer is complete (= its first token), heartbeats and loading included."""
    t0 = time.perf_counter()
    post_stream(port, "/v1/completions", {"model": model, "prompt": "hello there", "max_tokens": 1,
                                          "stream": True})
    return time.perf_counter() - t0


def bench_on_demand(ctl: Any, server: Server, backend_id: str, a: str, b: str, profile: Profile,
                    rounds: int) -> dict[str, float]:
    on_demand, by_hand = [], []
    for _ in range(rounds):
        if not any(d.model_id == a for d in ctl.deployments()):
            ctl.apply(backend_id, a, profile)
        on_demand.append(first_token_s(server.port, b))  # A runs; the request for B switches
        ctl.unload(b)
        ctl.apply(backend_id, a, profile)
        t0 = time.perf_counter()
        ctl.unload(a)
        ctl.ensure_deployment(b)  # the same IDE-sized plan the server makes
        first_token_s(server.port, b)
        by_hand.append(time.perf_counter() - t0)
        ctl.unload(b)
        ctl.apply(backend_id, a, profile)
    return {"on_demand_first_token_s": median(on_demand), "by_hand_first_token_s": median(by_hand),
            "on_demand_extra_s": median(on_demand) - median(by_hand)}


# --------------------------------------------------------------------------- 2. transformers mode
def transformers_generation_available(ctl: Any) -> str | None:
    try:
        backend = ctl.backend("transformers")
    except Exception as exc:  # noqa: BLE001
        return f"no Transformers backend in the registry ({exc})"
    if not getattr(backend.capabilities, "generates_in_process", False) or not hasattr(backend, "generate_stream"):
        return "the Transformers backend does not generate in-process yet"
    return None


def bench_transformers(rounds: int, work: Path) -> dict[str, Any]:
    from memory_controller import MemoryController

    shape = getattr(mf, "BENCH_05B", mf.BIG) if os.environ.get("MEMCTL_BENCH_SERVE_05B") else mf.BIG
    hub = build_hub(work, shape, ("bench-tf-a", "bench-tf-b"))
    settings = load_settings(hf_cache_dir=hub, local_model_dirs=[], state_dir=work / "state-tf",
                             docker_host="unix:///nonexistent.sock")
    ctl = MemoryController(settings)
    why = transformers_generation_available(ctl)
    if why:
        return {"skipped": why}
    a, b = f"{mf.TEST_ORG}/bench-tf-a", f"{mf.TEST_ORG}/bench-tf-b"
    # fp32 on both sides: bf16 matmuls are emulated on CPUs without AVX-512 BF16 (4x slower here)
    profile = Profile(mode="transformers", precision=Precision.FP32, context_tokens=1024, batch=1, device="cpu")
    server = Server(ctl, settings)
    out: dict[str, Any] = {}
    try:
        ctl.apply("transformers", a, profile)
        prompt = "the quick brown fox jumps over the lazy dog " * 4
        body = {"model": a, "prompt": prompt, "max_tokens": COMPLETION_TOKENS, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        post_stream(server.port, "/v1/completions", body)  # warm-up
        ep = []
        for _ in range(rounds):
            _, t_end, raw = post_stream(server.port, "/v1/completions", body)
            ep.append(completion_tokens(raw, COMPLETION_TOKENS) / t_end)
        out["endpoint_tok_s"] = median(ep)
        out.update(plain_generate(ctl, a, prompt, rounds))
        out["endpoint_vs_generate"] = out["endpoint_tok_s"] / out["generate_tok_s"]
        out.update(transformers_serve(ctl, a, body, rounds))
        if "serve_tok_s" in out:
            out["endpoint_vs_transformers_serve"] = out["endpoint_tok_s"] / out["serve_tok_s"]
        try:
            out.update(bench_on_demand(ctl, server, "transformers", a, b, profile, rounds=2))
        except Exception as exc:  # noqa: BLE001 - the figures above still count
            out["on_demand_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        server.stop()
        ctl.emergency_clear()
    return out


def completion_tokens(raw: bytes, max_tokens: int) -> int:
    """Tokens an SSE answer produced: its usage chunk, else max_tokens when it stopped for length,
    else the number of text chunks."""
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    for ev in reversed(events):
        if ev.get("usage"):
            return int(ev["usage"]["completion_tokens"])
    if any(c.get("finish_reason") == "length" for ev in events for c in ev.get("choices", ())):
        return max_tokens
    return sum(1 for ev in events for c in ev.get("choices", ()) if c.get("text"))


def plain_generate(ctl: Any, model_id: str, prompt: str, rounds: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ctl.resolve(model_id).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")
    kw = {"max_new_tokens": COMPLETION_TOKENS, "min_new_tokens": COMPLETION_TOKENS, "do_sample": False}
    model.generate(**ids, **kw)  # warm-up
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model.generate(**ids, **kw)
        rates.append(COMPLETION_TOKENS / (time.perf_counter() - t0))
    del model
    return {"generate_tok_s": median(rates)}


def transformers_serve(ctl: Any, model_id: str, body: dict, rounds: int) -> dict[str, Any]:
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        return {"serve_skipped": "the transformers CLI is not installed"}
    path = ctl.resolve(model_id).path
    port = free_port()
    proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                post_stream(port, "/v1/completions", {**body, "model": path})
                break
            except Exception as exc:  # noqa: BLE001
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = (proc.stderr.read() if proc.poll() is not None else "")[-300:]
                    return {"serve_skipped": f"transformers serve did not answer ({exc}; {err.strip()})"}
                time.sleep(0.5)
        rates = []
        for _ in range(rounds):
            _, t_end, raw = post_stream(port, "/v1/completions", {**body, "model": path})
            rates.append(completion_tokens(raw, body["max_tokens"]) / t_end)
        return {"serve_tok_s": median(rates)}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- main
def show(title: str, res: dict[str, Any], goals: dict[str, Callable[[float], bool]]) -> None:
    print(f"\n== {title}")
    for k, v in res.items():
        mark = ""
        if k in goals and isinstance(v, float):
            mark = "  goal met" if goals[k](v) else "  GOAL MISSED"
        print(f"  {k:32s} {v:.4g}{mark}" if isinstance(v, float) else f"  {k:32s} {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--skip-proxy", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="memctl-bench-serve."))
    try:
        if not args.skip_proxy:
            show("proxy to the fake vLLM container; on demand (HTTP backend)", bench_proxy(args.rounds, work), {
                "paced_first_byte_overhead_ms": lambda v: v <= 5.0, "paced_throughput_ratio": lambda v: v >= 0.98,
                "burst_first_byte_overhead_ms": lambda v: v <= 5.0,
                "on_demand_extra_s": lambda v: v <= 0.5})
        if not args.skip_transformers:
            show("Transformers mode", bench_transformers(max(3, args.rounds // 6), work / "tf"), {
                "endpoint_vs_generate": lambda v: v >= 0.95, "endpoint_vs_transformers_serve": lambda v: v >= 0.98,
                "on_demand_extra_s": lambda v: v <= 0.5})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
