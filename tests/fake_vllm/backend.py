"""An HTTP backend for tests and the bench: each deployment is a fake vLLM container on the test engine.

It is the in-memory backend (tests/inmemory_backend.py: claims, ledger, knobs) whose ``start`` runs the
fake image on a user-defined bridge ``network`` (``--served-model-name``, port published on
127.0.0.1: the private engine has no default bridge, and the fake serves chat only in a namespace of
its own) and waits for ``/health``, and whose
deployments carry the container's OpenAI ``endpoint``; it does not generate in-process, so the server
proxies to the container.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from memory_controller.backend import Claim, Deployment, DeploymentState, ReleaseReport
from memory_controller.errors import ModelLoadError
from memory_controller.types import CachedModel, Profile
from tests.inmemory_backend import InMemoryBackend

LABEL = "memctl-test.fake-http-backend"


def wait_healthy(port: int, timeout_s: float = 20.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with opener.open(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ModelLoadError(f"the fake vLLM container on port {port} never became healthy", "see its log")
        time.sleep(0.05)


class FakeVllmHttpBackend(InMemoryBackend):
    def __init__(self, settings: Any, docker_client: Any, image: str, port_for: Callable[[], int],
                 network: str, *, backend_id: str = "fakevllm", **kw: Any) -> None:
        super().__init__(settings, backend_id=backend_id, **kw)
        self.capabilities = dataclasses.replace(self.capabilities, serves_http=True, generates_in_process=False,
                                                label="fake vLLM (Docker, tests)")
        self.client = docker_client
        self.image = image
        self.port_for = port_for
        self.network = network
        self.containers: dict[str, Any] = {}

    def start(self, model: CachedModel, profile: Profile, claim: Claim, *, progress: Any = None,
              cancel: Callable[[], bool] | None = None) -> Deployment:
        port = self.port_for()
        container = self.client.containers.run(
            self.image, command=[model.model_id, "--host", "0.0.0.0", "--port", str(port),
                                 "--served-model-name", model.model_id,
                                 "--max-model-len", str(profile.context_tokens)],
            ports={f"{port}/tcp": ("127.0.0.1", port)}, network=self.network, detach=True, init=True,
            labels={LABEL: "1"})
        try:
            wait_healthy(port)
        except Exception:
            container.remove(force=True)
            raise
        dep = super().start(model, profile, claim, progress=progress, cancel=cancel)
        self.containers[model.model_id] = container
        ready = dataclasses.replace(dep, endpoint=f"http://127.0.0.1:{port}/v1", name=container.name,
                                    detail={"served_name": model.model_id, "container": container.id})
        with self._lock:
            self._running[model.model_id] = ready
        return ready

    def stop(self, handle: str) -> ReleaseReport:
        container = self.containers.pop(handle, None)
        if container is not None:
            container.remove(force=True)
        return super().stop(handle)

    def deployments(self) -> list[Deployment]:
        return [d for d in super().deployments() if d.state is DeploymentState.READY]
