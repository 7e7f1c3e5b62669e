"""A stand-in Ollama server for tests (the real one cannot be installed here).

A stdlib HTTP server on 127.0.0.1 speaking the documented endpoints memctl uses:
``GET /api/version``, ``GET /api/ps`` (models: name, model, size, size_vram, expires_at, context_length,
details), ``GET /api/tags``, ``POST /api/show`` (``model_info`` read from the model's real GGUF file with
``gguf``'s reader, ``capabilities``), ``POST /api/create`` (``from`` + ``parameters``: a derived tag),
``DELETE /api/delete``, ``POST /api/generate`` (no prompt: ``keep_alive: 0`` unloads, anything else loads)
and ``POST /v1/chat/completions`` (streamed or not; a tools request for a model without tools: 400, as
Ollama answers). Installed models are real GGUF files (:func:`write_gguf`) laid out as Ollama's models
folder (``manifests/registry.ollama.ai/library/<model>/<tag>``, ``blobs/sha256-<hex>``).

A load holds ``weights + KV + graph + overhead_bytes`` on the fake NVML GPU: KV = per layer
kv_heads × (key_length + value_length) × cells × 2 bytes (f16; a sliding-window layer holds
min(ctx, window + 512) cells), graph as Ollama's default formula. When that is more than the GPU's free
memory less Ollama's 457 MiB reserve, it spills: only what fits is on the GPU (``size_vram < size``).
``load_mode``: "ok", "refuse" (HTTP 500), "die" (the connection drops mid-load, nothing loaded),
"spill" (always spills half), "wrong_ctx" (loads at 2048 whatever the tag says).
Each loaded model is backed by a runner process in a fake NVML GPU (tests/fake_pynvml.py): an unload
removes the model from ``/api/ps`` after ``unload_delay_s`` and gives its bytes back to the GPU after
``memory_delay_s`` — the way a real runner exits some time after Ollama answers.

Failure modes per endpoint (``server.fail[path] = mode``): "refuse" (HTTP 500 with Ollama's
``{"error": ...}``), "slow" (answers after ``slow_s``), "malformed" (not JSON), "huge" (an endless body),
"keep" (accepts the unload but never unloads).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.fake_pynvml import FakeGpu, FakeProcess

GIB = 1024**3


@dataclass
class FakeOllamaModel:
    name: str
    size_vram: int
    size: int | None = None
    gpu: FakeGpu | None = None  # the fake NVML GPU its runner holds memory on
    runner_pid: int = 0
    expires_at: str = "2026-11-24T15:00:00.123456789Z"
    context_length: int = 8192


@dataclass
class FakeOllama:
    models: list[FakeOllamaModel] = field(default_factory=list)
    version: str = "0.13.0"
    unload_delay_s: float = 0.3
    memory_delay_s: float = 0.6
    slow_s: float = 5.0
    fail: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str, dict | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    models_dir: Path | None = None  # the Ollama models folder (installed models); None: none installed
    gpu: FakeGpu | None = None  # where loads go; None: Ollama runs on the CPU
    overhead_bytes: int = 96 * 1024 * 1024  # what the formulas do not count (measured > estimated)
    load_mode: str = "ok"
    load_delay_s: float = 0.05
    installed: dict[str, InstalledModel] = field(default_factory=dict)
    next_pid: int = 40000

    def __post_init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timers: list[threading.Timer] = []
        for m in self.models:
            self._hold(m)

    # ------------------------------------------------------------------ the fake GPU side
    def _hold(self, m: FakeOllamaModel) -> None:
        if m.gpu is None:
            return
        with self.lock:
            m.gpu.used_bytes += m.size_vram
            m.gpu.processes.append(FakeProcess(pid=m.runner_pid, usedGpuMemory=m.size_vram))

    def _release(self, m: FakeOllamaModel) -> None:
        if m.gpu is None:
            return
        with self.lock:
            m.gpu.used_bytes -= m.size_vram
            m.gpu.processes[:] = [p for p in m.gpu.processes if p.pid != m.runner_pid]

    def _unload(self, m: FakeOllamaModel) -> None:
        def drop() -> None:
            with self.lock:
                if m in self.models:
                    self.models.remove(m)

        for delay, fn in ((self.unload_delay_s, drop), (self.memory_delay_s, lambda: self._release(m))):
            t = threading.Timer(delay, fn)
            t.daemon = True
            self._timers.append(t)
            t.start()

    # ------------------------------------------------------------------ server
    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeOllama:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _answer(self, path: str, make) -> None:
                mode = fake.fail.get(path)
                if mode == "slow":
                    time.sleep(fake.slow_s)
                if mode == "refuse":
                    return self._send(500, b'{"error":"llama runner process has terminated: exit status 2"}')
                if mode == "malformed":
                    return self._send(200, b"<html>not json")
                if mode == "huge":
                    self.send_response(200)
                    self.end_headers()
                    chunk = b"[" * 65536
                    try:
                        for _ in range(64):
                            self.wfile.write(chunk)
                    except OSError:
                        pass
                    return None
                code, data = make()
                return self._send(code, json.dumps(data).encode())

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append(("GET", self.path, None))
                if self.path == "/api/version":
                    return self._answer(self.path, lambda: (200, {"version": fake.version}))
                if self.path == "/api/ps":
                    return self._answer(self.path, fake._ps)
                if self.path == "/api/tags":
                    return self._answer(self.path, fake._tags)
                return self._send(404, b"404 page not found")

            def _body(self) -> dict | None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return None
                return body if isinstance(body, dict) else None

            def do_DELETE(self) -> None:  # noqa: N802
                body = self._body()
                fake.requests.append(("DELETE", self.path, body))
                if self.path != "/api/delete" or body is None:
                    return self._send(400, b'{"error":"bad request"}')
                return self._answer(self.path, lambda: fake._delete(body))

            def _chat(self, body: dict) -> None:
                code, data, chunks = fake._chat(body)
                if code != 200 or not body.get("stream"):
                    return self._send(code, json.dumps(data).encode())
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for c in chunks:
                        self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                except OSError:
                    pass
                self.close_connection = True
                return None

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = None
                fake.requests.append(("POST", self.path, body))
                if not isinstance(body, dict):
                    return self._send(400, b'{"error":"bad request"}')
                if self.path == "/api/show":
                    return self._answer(self.path, lambda: fake._show(body))
                if self.path == "/api/create":
                    return self._answer(self.path, lambda: fake._create(body))
                if self.path == "/v1/chat/completions":
                    return self._chat(body)
                if self.path != "/api/generate":
                    return self._send(404, b"404 page not found")
                if body.get("keep_alive") not in (0, "0", "0s") and not body.get("prompt"):
                    if fake.load_mode == "die":
                        fake.requests.append(("DIED", self.path, body))
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)  # the runner crashed: no answer at all
                        return None
                    return self._answer(self.path, lambda: fake._load(body))
                return self._answer(self.path, lambda: fake._generate(body))

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that hung up (timeouts, size limits) is what some tests do on purpose

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-ollama", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the API
    def _ps(self) -> tuple[int, dict]:
        with self.lock:
            models = [{
                "name": m.name, "model": m.name, "size": m.size or m.size_vram, "digest": "0" * 64,
                "details": {"format": "gguf", "family": "llama", "parameter_size": "20B",
                            "quantization_level": "MXFP4"},
                "expires_at": m.expires_at, "size_vram": m.size_vram, "context_length": m.context_length,
            } for m in self.models]
        return 200, {"models": models}

    def _generate(self, body: dict) -> tuple[int, dict]:
        name = body.get("model")
        with self.lock:
            m = next((x for x in self.models if x.name == name), None)
        if body.get("keep_alive") not in (0, "0", "0s") or body.get("prompt"):
            return 400, {"error": "this stand-in only unloads (keep_alive: 0, no prompt)"}
        if m is None:
            return 404, {"error": f"model '{name}' not found"}
        if self.fail.get("unload") != "keep":
            self._unload(m)
        return 200, {"model": name, "created_at": "2026-11-24T14:00:00Z", "response": "", "done": True,
                     "done_reason": "unload"}


# ---------------------------------------------------------------------------- installed models (GGUF)
@dataclass
class InstalledModel:
    name: str  # "gpt-oss:20b"
    path: Path  # the GGUF blob
    meta: dict
    weights_bytes: int
    tools: bool = True
    quantization: str = "Q4_K_M"
    parameters: dict = field(default_factory=dict)  # a derived tag's (num_ctx)
    base: str | None = None


def write_gguf(path: Path, *, arch: str = "llama", layers: int = 32, heads: int = 32, kv_heads: int | list = 8,
               embd: int = 4096, context: int = 131072, vocab: int = 32000, head_dim: int | None = None,
               sliding_window: int | None = None, swa_pattern: int | list | None = None,
               weight_mib: int = 8) -> Path:
    """A real GGUF file: the architecture's metadata and ``weight_mib`` MiB of f16 tensors."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(embd)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_vocab_size(vocab)
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    if swa_pattern is not None:
        w.add_sliding_window_pattern(swa_pattern)
    n = weight_mib * 1024 * 1024 // 2 // 4
    for i in range(4):
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((n // 1024, 1024), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _read_meta(path: Path) -> tuple[dict, int]:
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        meta[k] = v
    return meta, sum(int(t.n_bytes) for t in r.tensors)


def _ollama_kv(meta: dict, num_ctx: int) -> int:
    """The stand-in's own accounting (f16, one slot), written apart from the estimator's."""
    arch = meta["general.architecture"]
    layers = meta[f"{arch}.block_count"]
    heads = meta[f"{arch}.attention.head_count"]
    kvh = meta.get(f"{arch}.attention.head_count_kv", heads)
    kvh = kvh if isinstance(kvh, list) else [kvh] * layers
    hd = meta.get(f"{arch}.attention.key_length") or meta[f"{arch}.embedding_length"] // heads
    window = meta.get(f"{arch}.attention.sliding_window")
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    total = 0
    for i in range(layers):
        slides = bool(window) and (pattern[i] if isinstance(pattern, list) else
                                   (i + 1) % pattern != 0 if isinstance(pattern, int) else True)
        cells = min(num_ctx, -(-(window + 512) // 256) * 256) if slides else num_ctx
        total += kvh[i] * hd * cells * 2 * 2
    return total


def _graph(meta: dict, num_ctx: int) -> int:
    arch = meta["general.architecture"]
    b = min(num_ctx, 512)
    embd, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    vocab = meta.get(f"{arch}.vocab_size", 0)
    return max(4 * b * (1 + 4 * embd + num_ctx * (1 + heads)), 4 * b * (embd + vocab))


RESERVE = 457 * 1024 * 1024


def _install(self: FakeOllama, name: str, gguf_path: Path, *, tools: bool = True, quantization: str = "Q4_K_M") -> None:
    """Install a GGUF file as ``name`` in the models folder (blob + manifest), as ``ollama create`` would."""
    assert self.models_dir is not None
    data = Path(gguf_path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blobs = self.models_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / f"sha256-{digest}"
    blob.write_bytes(data)
    self._manifest(name, digest, len(data))
    meta, weights = _read_meta(blob)
    self.installed[name] = InstalledModel(name, blob, meta, weights, tools, quantization)


def _manifest(self: FakeOllama, name: str, digest: str, size: int, params: dict | None = None) -> None:
    assert self.models_dir is not None
    model, _, tag = name.partition(":")
    mdir = self.models_dir / "manifests" / "registry.ollama.ai" / "library" / model
    mdir.mkdir(parents=True, exist_ok=True)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": size}]
    if params:
        layers.append({"mediaType": "application/vnd.ollama.image.params", "digest": "sha256:" + "1" * 64,
                       "size": 20})
    (mdir / (tag or "latest")).write_text(json.dumps({"schemaVersion": 2, "layers": layers}))


def _tags(self: FakeOllama) -> tuple[int, dict]:
    with self.lock:
        items = list(self.installed.values())
    return 200, {"models": [{
        "name": m.name, "model": m.name, "size": m.path.stat().st_size,
        "digest": hashlib.sha256(m.name.encode()).hexdigest(),
        "details": {"format": "gguf", "family": m.meta["general.architecture"], "quantization_level": m.quantization,
                    "parameter_size": "7B"}} for m in items]}


def _show(self: FakeOllama, body: dict) -> tuple[int, dict]:
    name = body.get("model") or body.get("name")
    with self.lock:
        m = self.installed.get(name) or self.installed.get(f"{name}:latest")
    if m is None:
        return 404, {"error": f"model '{name}' not found"}
    info = {k: v for k, v in m.meta.items() if not k.startswith("tokenizer.")}
    caps = ["completion"] + (["tools"] if m.tools else [])
    params = "\n".join(f"{k} {v}" for k, v in m.parameters.items())
    return 200, {"modelfile": "", "parameters": params, "template": "{{ .Prompt }}", "model_info": info,
                 "capabilities": caps, "details": {"format": "gguf", "family": m.meta["general.architecture"],
                                                   "quantization_level": m.quantization, "parameter_size": "7B"}}


def _create(self: FakeOllama, body: dict) -> tuple[int, dict]:
    name, src = body.get("model"), body.get("from")
    with self.lock:
        base = self.installed.get(src)
    if base is None:
        return 404, {"error": f"model '{src}' not found"}
    params = body.get("parameters") or {}
    if not isinstance(params, dict) or not isinstance(params.get("num_ctx", 0), int):
        return 400, {"error": "invalid parameters"}
    derived = InstalledModel(name, base.path, base.meta, base.weights_bytes, base.tools, base.quantization,
                             dict(params), base=src)
    with self.lock:
        self.installed[name] = derived
    self._manifest(name, base.path.name.split("-", 1)[1], base.path.stat().st_size, params)
    return 200, {"status": "success"}


def _delete(self: FakeOllama, body: dict) -> tuple[int, dict]:
    name = body.get("model")
    with self.lock:
        m = self.installed.pop(name, None)
    if m is None:
        return 404, {"error": f"model '{name}' not found"}
    return 200, {}


def load_size(self: FakeOllama, m: InstalledModel, num_ctx: int) -> int:
    return m.weights_bytes + _ollama_kv(m.meta, num_ctx) + _graph(m.meta, num_ctx) + self.overhead_bytes


def _load(self: FakeOllama, body: dict) -> tuple[int, dict]:
    name = body.get("model")
    with self.lock:
        m = self.installed.get(name)
        already = next((x for x in self.models if x.name == name), None)
    if m is None:
        return 404, {"error": f"model '{name}' not found, try pulling it first"}
    if already is not None:
        return 200, {"model": name, "response": "", "done": True, "done_reason": "load"}
    if self.load_mode == "refuse":
        return 500, {"error": "llama runner process has terminated: cudaMalloc failed: out of memory"}
    time.sleep(self.load_delay_s)
    num_ctx = 2048 if self.load_mode == "wrong_ctx" else int(m.parameters.get("num_ctx") or 4096)
    size = self.load_size(m, num_ctx)
    if self.gpu is None:
        vram = 0
    else:
        free = self.gpu.total_bytes - self.gpu.used_bytes - RESERVE
        vram = size if size <= free else max(0, free)
        if self.load_mode == "spill":
            vram = min(vram, size // 2)
    self.next_pid += 1
    loaded = FakeOllamaModel(name, vram, size=size, gpu=self.gpu if vram else None, runner_pid=self.next_pid,
                             context_length=num_ctx)
    with self.lock:
        self.models.append(loaded)
    self._hold(loaded)
    return 200, {"model": name, "response": "", "done": True, "done_reason": "load"}


def _chat(self: FakeOllama, body: dict) -> tuple[int, dict, list]:
    name = body.get("model")
    with self.lock:
        m = self.installed.get(name)
    if m is None:
        return 404, {"error": {"message": f"model \"{name}\" not found, try pulling it first",
                               "type": "api_error", "param": None, "code": None}}, []
    if body.get("tools") and not m.tools:
        return 400, {"error": {"message": f"registry.ollama.ai/library/{m.base or name} does not support tools",
                               "type": "api_error", "param": None, "code": None}}, []
    code, _ = self._load({"model": name})
    if code != 200:
        return 500, {"error": {"message": "llama runner process has terminated", "type": "api_error"}}, []
    self.requests.append(("CHAT", name, body))
    words = ["Hello", " from", " the", " stand-in", " Ollama", "."]
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": name,
            "system_fingerprint": "fp_ollama"}
    chunks = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": w}, "finish_reason": None}])
              for w in words]
    chunks.append(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": "stop"}]))
    full = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}}
    return 200, full, chunks


for _fn in (_install, _manifest, _tags, _show, _create, _delete, load_size, _load, _chat):
    setattr(FakeOllama, _fn.__name__ if _fn.__name__ != "_install" else "install", _fn)
