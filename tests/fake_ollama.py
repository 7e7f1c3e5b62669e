"""A stand-in Ollama server for tests (the real one cannot be installed here).

A stdlib HTTP server on 127.0.0.1 speaking the documented endpoints memctl uses:
``GET /api/version``, ``GET /api/ps`` (models: name, model, size, size_vram, expires_at, details) and
``POST /api/generate`` with ``keep_alive: 0`` and no prompt (unload: answers ``done_reason: "unload"``).
Each loaded model is backed by a runner process in a fake NVML GPU (tests/fake_pynvml.py): an unload
removes the model from ``/api/ps`` after ``unload_delay_s`` and gives its bytes back to the GPU after
``memory_delay_s`` — the way a real runner exits some time after Ollama answers.

Failure modes per endpoint (``server.fail[path] = mode``): "refuse" (HTTP 500 with Ollama's
``{"error": ...}``), "slow" (answers after ``slow_s``), "malformed" (not JSON), "huge" (an endless body),
"keep" (accepts the unload but never unloads).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
                return self._send(404, b"404 page not found")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = None
                fake.requests.append(("POST", self.path, body))
                if self.path != "/api/generate" or not isinstance(body, dict):
                    return self._send(400, b'{"error":"bad request"}')
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
                "expires_at": m.expires_at, "size_vram": m.size_vram, "context_length": 8192,
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
