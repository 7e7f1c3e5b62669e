"""The Docker client (lazy), docker-py errors mapped to memctl's, HTTP probes of vLLM's endpoints,
and plain-words causes of a failed start. The only module of memctl that imports ``docker``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from memory_controller.errors import ContainerError, ContainerStartError, DockerUnavailableError, MemctlError
from memory_controller.safejson import loads_bounded

log = logging.getLogger(__name__)

API_TIMEOUT_S = 60.0
PING_TIMEOUT_S = 3.0  # availability: a dead or unreachable DOCKER_HOST must not hang the UI
LOG_TAIL_LINES = 50

# Most common start failures: (regex over the log tail, cause key, plain-words cause).
_CAUSES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory", re.I), "cuda_oom",
     "the GPU ran out of memory while loading the model (CUDA out of memory)"),
    (re.compile(r"No available memory for the cache blocks", re.I), "no_kv_cache_memory",
     "no GPU memory was left for the KV cache blocks after the weights were loaded"),
    (re.compile(r"larger than the available KV cache memory|max_model_len.*(larger|greater) than|"
                r"estimated maximum model length", re.I), "max_model_len_too_large",
     "the context (max_model_len) is larger than the KV cache that fits in GPU memory"),
    (re.compile(r"less than desired GPU memory utilization|Free memory on device", re.I), "gpu_memory_busy",
     "less GPU memory was free than --gpu-memory-utilization asks for (other processes hold it)"),
    (re.compile(r"Address already in use", re.I), "port_in_use", "the server port is already in use"),
    (re.compile(r"--quantization.*invalid choice|Unknown quantization method", re.I), "quantization_unsupported",
     "this vLLM image does not know the quantization memctl asked for (nf4 needs vLLM v0.27 or older)"),
)

CAUSE_HINTS = {
    "cuda_oom": "pick a smaller model or a 4-bit profile, or free GPU memory held by other processes",
    "no_kv_cache_memory": "lower the context or batch, or raise MEMCTL_VLLM_GPU_UTIL_MAX if the GPU has room",
    "max_model_len_too_large": "lower the context (max_model_len) or the batch, or use a smaller model",
    "gpu_memory_busy": "stop other programs using the GPU, or lower the context or batch",
    "port_in_use": "stop what listens on that port or set MEMCTL_VLLM_PORT to a free one",
    "quantization_unsupported": "use fp16/bf16 with this image, or the Transformers backend for 4-bit",
}


def classify_failure(log_lines: Sequence[str]) -> tuple[str | None, str | None]:
    """(cause key, plain-words cause) for the last matching known failure in the log, or (None, None)."""
    for line in reversed(log_lines):
        for pattern, key, words in _CAUSES:
            if pattern.search(line):
                return key, words
    return None, None


def api_explanation(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc)


class DockerAccess:
    """One lazily created docker-py client and the mapping of its failures. Thread-safe."""

    def __init__(self, docker_host: str | None) -> None:
        self.docker_host = docker_host
        self._client_obj: Any = None
        self._lock = threading.Lock()

    @property
    def host_label(self) -> str:
        """Where we talk to Docker, for messages."""
        return self.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    def new_client(self, timeout_s: float) -> Any:
        import docker

        if self.docker_host:
            return docker.DockerClient(base_url=self.docker_host, timeout=timeout_s)
        return docker.from_env(timeout=timeout_s)

    def client(self) -> Any:
        """The shared client, created on first use; raises DockerUnavailableError."""
        with self._lock:
            if self._client_obj is None:
                with self.errors("connect to Docker"):
                    self._client_obj = self.new_client(API_TIMEOUT_S)
            return self._client_obj

    def close(self) -> None:
        with self._lock:
            if self._client_obj is not None:
                with contextlib.suppress(Exception):
                    self._client_obj.close()
                self._client_obj = None

    def ping(self, timeout_s: float = PING_TIMEOUT_S) -> DockerUnavailableError | None:
        """None when the engine answers a ping within ``timeout_s``; else why not. Never raises."""
        client = None
        try:
            client = self.new_client(timeout_s)
            client.ping()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
            return exc if isinstance(exc, DockerUnavailableError) else self.unavailable(exc)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        return None

    def unavailable(self, exc: BaseException) -> DockerUnavailableError:
        """Turn a connection failure into plain words: daemon down, permission denied, unreachable."""
        host = self.host_label
        chain: list[BaseException] = []
        e: BaseException | None = exc
        while e is not None and e not in chain and len(chain) < 10:
            chain.append(e)
            e = e.__cause__ or e.__context__
        text = " ".join(str(x) for x in chain)
        details = f"{type(exc).__name__}: {exc}"
        if any(isinstance(x, PermissionError) for x in chain) or "Permission denied" in text:
            return DockerUnavailableError(
                f"permission denied on the Docker socket ({host})",
                "add your user to the docker group (sudo usermod -aG docker $USER, then log in again) "
                "or run memctl as a user allowed to use Docker", details=details)
        if any(isinstance(x, FileNotFoundError) for x in chain) or "No such file or directory" in text:
            return DockerUnavailableError(
                f"the Docker daemon is not running: no socket at {host}",
                "start Docker (sudo systemctl start docker) or set MEMCTL_DOCKER_HOST / DOCKER_HOST",
                details=details)
        if any(isinstance(x, ConnectionRefusedError) for x in chain) or "Connection refused" in text:
            what = "the Docker daemon is not running" if host.startswith("unix://") else "nothing answers"
            return DockerUnavailableError(f"{what} at {host} (connection refused)",
                                          "start Docker, or fix MEMCTL_DOCKER_HOST / DOCKER_HOST", details=details)
        if re.search(r"timed out|Name or service not known|No route to host|resolve|unreachable", text, re.I):
            return DockerUnavailableError(f"cannot reach the Docker host {host}",
                                          "check the address in MEMCTL_DOCKER_HOST / DOCKER_HOST and the "
                                          "network to it", details=details)
        if re.search(r"fetching server API version: (404|400|403|502|503)", text):
            return DockerUnavailableError(
                f"something answers at {host}, but it is not a Docker engine",
                "check the address and port in MEMCTL_DOCKER_HOST / DOCKER_HOST (Docker's TCP port is 2375/2376)",
                details=details)
        return DockerUnavailableError(f"cannot talk to Docker at {host}: {exc}",
                                      "check that Docker runs (docker info) and MEMCTL_DOCKER_HOST / DOCKER_HOST",
                                      details=details)

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Map docker-py / requests failures raised inside the block to project errors.

        The original docker-py exception stays as ``__cause__`` (see :func:`is_not_found`).
        """
        import docker.errors
        import requests.exceptions

        try:
            yield
        except MemctlError:
            raise
        except docker.errors.NotFound as exc:
            raise ContainerError(f"could not {doing}: {api_explanation(exc)}",
                                 "refresh the list: it may have been removed") from exc
        except docker.errors.APIError as exc:
            raise ContainerError(f"Docker refused to {doing}: {api_explanation(exc)}",
                                 "see the message; docker info / docker ps may tell more") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            raise self.unavailable(exc) from exc


def is_not_found(exc: BaseException) -> bool:
    """True when ``exc`` (a ContainerError from :meth:`DockerAccess.errors`) came from a 404."""
    import docker.errors

    return isinstance(exc.__cause__, docker.errors.NotFound)


def is_image_not_found(exc: BaseException) -> bool:
    import docker.errors

    return isinstance(exc.__cause__, docker.errors.ImageNotFound)


def is_conflict(exc: BaseException) -> bool:
    """A 409 from Docker: a name already in use, or a removal already in progress."""
    cause = exc.__cause__
    return getattr(cause, "status_code", None) == 409


def not_found_type() -> type[BaseException]:
    import docker.errors

    return docker.errors.NotFound


def docker_exception_type() -> type[BaseException]:
    import docker.errors

    return docker.errors.DockerException


def device_request(gpu_ids: Sequence[int] | None) -> Any:
    import docker.types

    if gpu_ids is None:
        return docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
    return docker.types.DeviceRequest(device_ids=[str(i) for i in gpu_ids], capabilities=[["gpu"]])


# --------------------------------------------------------------------------- HTTP to vLLM
def url_host(bind_host: str) -> str:
    """The host part of a URL reaching a server bound to ``bind_host`` (a wildcard -> loopback)."""
    host = "127.0.0.1" if not bind_host or bind_host in ("0.0.0.0", "::") else bind_host
    return f"[{host}]" if ":" in host else host


def http_get(url: str, timeout_s: float, api_key: str | None = None) -> tuple[int, bytes]:
    """(status, body ≤ 1 MiB) of a GET without proxies; (0, b"") when nothing answers."""
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return resp.status, resp.read(1024 * 1024)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return 0, b""


def models_lists(body: bytes, served_name: str) -> bool:
    """True when a /v1/models body (parsed with limits) lists ``served_name``."""
    try:
        data = loads_bounded(body, what="/v1/models", max_bytes=1024 * 1024, max_depth=16)
    except MemctlError:
        return False
    items = data.get("data") if isinstance(data, dict) else None
    return isinstance(items, list) and any(isinstance(m, dict) and m.get("id") == served_name for m in items)


def port_busy(host: str, port: int) -> bool:
    """True when something already listens on host:port (we cannot bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------- logs and start failures
def log_tail(container: Any, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        raw = container.logs(stdout=True, stderr=True, tail=lines)
    except Exception as exc:  # noqa: BLE001 - the tail is best effort
        return [f"(could not read the container log: {exc})"]
    return raw.decode("utf-8", errors="replace").splitlines()[-lines:]


def last_log_line(container: Any) -> str:
    tail = log_tail(container, 3)
    lines = [ln.strip() for ln in tail if ln.strip() and not ln.startswith("(could not read")]
    return lines[-1][:200] if lines else ""


def crash_error(container: Any, name: str) -> ContainerStartError:
    state = container.attrs.get("State", {})
    code = state.get("ExitCode")
    tail = log_tail(container)
    cause, words = classify_failure(tail)
    if cause is None and state.get("OOMKilled"):
        cause, words = "host_oom", "the host ran out of RAM (the kernel killed the container)"
    message = f"{name} exited with status {code} while starting" + (f": {words}" if words else "")
    hint = CAUSE_HINTS.get(cause or "", "read the last log lines below")
    if cause == "host_oom":
        hint = "close programs using RAM, or lower the batch"
    return ContainerStartError(message, hint, log_tail=tail, cause=cause or "exited")


def start_refused(exc: Any, name: str, host: str, port: int) -> ContainerStartError:
    text = api_explanation(exc)
    if "could not select device driver" in text or "nvidia" in text.lower():
        return ContainerStartError(
            f"Docker cannot give {name} a GPU: {text}",
            "install the NVIDIA Container Toolkit and restart Docker (nvidia-ctk runtime configure --runtime=docker)",
            cause="no_gpu_runtime")
    if "address already in use" in text.lower() or "port is already allocated" in text.lower():
        return ContainerStartError(f"port {port} on {host} is already in use: {text}", CAUSE_HINTS["port_in_use"],
                                   cause="port_in_use")
    return ContainerStartError(f"Docker could not start {name}: {text}", "see the message; docker info may tell more",
                               cause="start_refused")
