"""vLLM in Docker: start, watch and stop ``vllm/vllm-openai`` containers through the Docker SDK.

The only module that imports ``docker`` (lazily: nothing connects at import or construction).
Every docker-py exception is turned into a project error here (see ``_docker_errors``).

State lives in Docker, not here: containers carry the label ``memctl.managed=true`` plus the model,
served name, port, bind address and profile (JSON), so a restarted dashboard finds its running
containers again with :meth:`VllmDockerBackend.list`. A container without our label is never
stopped or removed, even one that squats our name.

Networking: the port is published on ``settings.bind_address`` (127.0.0.1 by default) through
docker-proxy on the engine's default ``bridge`` network, or on ``network`` when one is given.
An engine started with ``--bridge=none`` has no network that can publish ports; then the
container shares the host network and vLLM itself listens on ``bind_address:port`` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memory_controller.errors import (
    ContainerError,
    ContainerStartError,
    DockerUnavailableError,
    InsufficientMemoryError,
    InvalidModelIdError,
    MemctlError,
    ModelNotFoundError,
    OperationCancelledError,
    QuantizationUnavailableError,
    SettingsError,
)
from memory_controller.types import (
    CachedModel,
    ContainerInfo,
    DeviceSnapshot,
    DeviceStatus,
    Precision,
    Profile,
    ProgressCallback,
    ProgressEvent,
    to_jsonable,
)
from memory_controller.units import fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

log = logging.getLogger(__name__)

MANAGED_LABEL = "memctl.managed"
MODEL_LABEL = "memctl.model"
PROFILE_LABEL = "memctl.profile"
SERVED_NAME_LABEL = "memctl.served_name"
PORT_LABEL = "memctl.port"
HOST_LABEL = "memctl.host"
GPU_UTIL_LABEL = "memctl.gpu_util"
NAME_PREFIX = "memctl-vllm-"

CONTAINER_HF_CACHE = "/root/.cache/huggingface/hub"
CONTAINER_MODELS_DIR = "/models"

READY_POLL_INTERVAL_S = 0.2  # readiness poll period: the "ready" report lags /health by at most this
LOG_POLL_INTERVAL_S = 1.0  # how often the latest log line is fetched for progress
HEALTH_PROBE_TIMEOUT_S = 0.5  # list(): one quick /health probe per running container
VERIFY_TIMEOUT_S = 2.0
AVAILABLE_TIMEOUT_S = 3.0  # available(): a dead or unreachable DOCKER_HOST must not hang the UI
API_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 50
_NAME_SLUG_MAX = 48

# Most common start failures: (regex over the log tail, cause key, plain-words cause).
_CAUSES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory", re.I),
        "cuda_oom",
        "the GPU ran out of memory while loading the model (CUDA out of memory)",
    ),
    (
        re.compile(r"No available memory for the cache blocks", re.I),
        "no_kv_cache_memory",
        "no GPU memory was left for the KV cache blocks after the weights were loaded",
    ),
    (
        re.compile(
            r"larger than the available KV cache memory|max_model_len.*(larger|greater) than|"
            r"estimated maximum model length",
            re.I,
        ),
        "max_model_len_too_large",
        "the context (max_model_len) is larger than the KV cache that fits in GPU memory",
    ),
    (
        re.compile(r"less than desired GPU memory utilization|Free memory on device", re.I),
        "gpu_memory_busy",
        "less GPU memory was free than --gpu-memory-utilization asks for (other processes hold it)",
    ),
    (
        re.compile(r"Address already in use", re.I),
        "port_in_use",
        "the server port is already in use",
    ),
)

_CAUSE_HINTS = {
    "cuda_oom": "pick a smaller model or a 4-bit profile, or free GPU memory held by other processes",
    "no_kv_cache_memory": "lower the context or batch, or raise vllm_gpu_util_max if the GPU has room",
    "max_model_len_too_large": "lower the context (max_model_len) or the batch, or use a smaller model",
    "gpu_memory_busy": "stop other programs using the GPU, or lower the context or batch",
    "port_in_use": "stop what listens on that port or set MEMCTL_VLLM_PORT to a free one",
}


# --------------------------------------------------------------------------- pure helpers


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


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_.-]+", "-", text.strip().lower()).strip("-._")
    slug = re.sub(r"-{2,}", "-", slug)
    if len(slug) > _NAME_SLUG_MAX:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        slug = slug[: _NAME_SLUG_MAX - 9].rstrip("-._") + "-" + digest
    return slug


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
            "fix vllm_gpu_util_margin / vllm_gpu_util_max in the settings",
        )
    raw = needed_bytes / total_bytes + margin
    if raw > cap + 1e-9:
        raise InsufficientMemoryError(
            f"the model needs {fmt_bytes(needed_bytes)} of the GPU's {fmt_bytes(total_bytes)} "
            f"({needed_bytes / total_bytes:.3f} + margin {margin:.2f} = {raw:.3f}), "
            f"above the cap of {cap:.2f} (vllm_gpu_util_max)",
            "lower the context or batch, pick a 4-bit profile or a smaller model",
            needed_bytes=needed_bytes + int(margin * total_bytes),
            free_bytes=int(cap * total_bytes),
        )
    return min(cap, math.ceil(round(raw * 100, 6)) / 100)


_DTYPES = {
    Precision.FP16: "float16",
    Precision.BF16: "bfloat16",
    Precision.FP32: "float32",
    Precision.NF4: "auto",
}


def build_vllm_args(
    model_ref: str,
    served_name: str,
    profile: Profile,
    gpu_util: float,
    port: int,
    api_key: str | None,
    *,
    host: str = "0.0.0.0",
    tensor_parallel_size: int | None = None,
    revision: str | None = None,
) -> list[str]:
    """Arguments for the image's ``vllm serve`` entrypoint (model first, then flags).

    ``tensor_parallel_size`` defaults to ``len(profile.gpu_ids)`` or 1. NF4 becomes vLLM's in-flight
    ``--quantization bitsandbytes``; INT8 and FP4 raise QuantizationUnavailableError (vLLM only
    quantizes on the fly to 4-bit NF4). Raises ContainerError for an out-of-range util or port.
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
    if api_key:
        args += ["--api-key", api_key]
    return args


def classify_failure(log_lines: Sequence[str]) -> tuple[str | None, str | None]:
    """(cause key, plain-words cause) for the last matching known failure in the log, or (None, None)."""
    for line in reversed(log_lines):
        for pattern, key, words in _CAUSES:
            if pattern.search(line):
                return key, words
    return None, None


def _hf_cache_root(model: CachedModel, fallback: Path) -> Path:
    """The hub cache directory holding ``model`` (``.../hub``), from its snapshot path if it has one."""
    p = Path(model.path)
    # <hub>/models--org--name/snapshots/<revision>
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.parent
    return fallback


def _parse_docker_time(value: str | None) -> float | None:
    if not value or value.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        # nanoseconds: cut the fraction to microseconds
        m = re.match(r"^(.*\.\d{6})\d*(.*)$", value)
        if not m:
            return None
        try:
            return datetime.fromisoformat((m.group(1) + m.group(2)).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None


def _probe_host(bind_host: str | None) -> str:
    return "127.0.0.1" if not bind_host or bind_host in ("0.0.0.0", "::") else bind_host


def _http_get(url: str, timeout_s: float, api_key: str | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET without proxies; (0, b"") when nothing answers."""
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return 0, b""


def _models_lists(body: bytes, served_name: str) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    items = data.get("data") if isinstance(data, dict) else None
    return isinstance(items, list) and any(isinstance(m, dict) and m.get("id") == served_name for m in items)


def _port_busy(host: str, port: int) -> bool:
    """True when something already listens on host:port (we cannot bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class _Plan:
    """Everything ``start`` hands to Docker, computed before anything is created."""

    name: str
    image: str
    args: list[str]
    environment: dict[str, str]
    volumes: dict[str, dict[str, str]]
    labels: dict[str, str]
    gpu_util: float
    served_name: str
    port: int
    host: str


# --------------------------------------------------------------------------- backend


class VllmDockerBackend:
    """Starts, lists, verifies and stops memctl's vLLM containers. Thread-safe for concurrent calls.

    ``network``: a user-defined Docker network to attach started containers to (ports are
    published from it); None = the engine's default bridge, or the host network when the engine
    has no bridge (see the module docstring).
    """

    def __init__(self, settings: Settings, *, network: str | None = None) -> None:
        self.settings = settings
        self.network = network
        self._client_obj: Any = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- client
    @property
    def docker_host_label(self) -> str:
        """Where we talk to Docker, for messages."""
        return self.settings.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    def _new_client(self, timeout_s: float) -> Any:
        import docker

        if self.settings.docker_host:
            return docker.DockerClient(base_url=self.settings.docker_host, timeout=timeout_s)
        return docker.from_env(timeout=timeout_s)

    def _client(self) -> Any:
        """The shared docker client, created on first use; raises DockerUnavailableError."""
        with self._lock:
            if self._client_obj is None:
                with self._docker_errors("connect to Docker"):
                    self._client_obj = self._new_client(API_TIMEOUT_S)
            return self._client_obj

    def close(self) -> None:
        """Drop the client (a new one is made on next use)."""
        with self._lock:
            if self._client_obj is not None:
                with contextlib.suppress(Exception):
                    self._client_obj.close()
                self._client_obj = None

    def _unavailable(self, exc: BaseException) -> DockerUnavailableError:
        """Turn a connection failure into plain words: daemon down, permission denied, unreachable."""
        host = self.docker_host_label
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
                "or run memctl as a user allowed to use Docker",
                details=details,
            )
        if any(isinstance(x, FileNotFoundError) for x in chain) or "No such file or directory" in text:
            return DockerUnavailableError(
                f"the Docker daemon is not running: no socket at {host}",
                "start Docker (sudo systemctl start docker) or set MEMCTL_DOCKER_HOST / DOCKER_HOST",
                details=details,
            )
        if any(isinstance(x, ConnectionRefusedError) for x in chain) or "Connection refused" in text:
            what = "the Docker daemon is not running" if host.startswith("unix://") else "nothing answers"
            return DockerUnavailableError(
                f"{what} at {host} (connection refused)",
                "start Docker, or fix MEMCTL_DOCKER_HOST / DOCKER_HOST",
                details=details,
            )
        if re.search(r"timed out|Name or service not known|No route to host|resolve|unreachable", text, re.I):
            return DockerUnavailableError(
                f"cannot reach the Docker host {host}",
                "check the address in MEMCTL_DOCKER_HOST / DOCKER_HOST and the network to it",
                details=details,
            )
        if re.search(r"fetching server API version: (404|400|403|502|503)", text):
            return DockerUnavailableError(
                f"something answers at {host}, but it is not a Docker engine",
                "check the address and port in MEMCTL_DOCKER_HOST / DOCKER_HOST (Docker's TCP port is 2375/2376)",
                details=details,
            )
        return DockerUnavailableError(
            f"cannot talk to Docker at {host}: {exc}",
            "check that Docker runs (docker info) and MEMCTL_DOCKER_HOST / DOCKER_HOST",
            details=details,
        )

    @contextlib.contextmanager
    def _docker_errors(self, doing: str) -> Iterator[None]:
        """Map docker-py / requests failures raised inside the block to project errors."""
        import docker.errors
        import requests.exceptions

        try:
            yield
        except MemctlError:
            raise
        except docker.errors.NotFound as exc:
            raise ContainerError(f"could not {doing}: {_api_explanation(exc)}",
                                 "refresh the list: it may have been removed") from exc
        except docker.errors.APIError as exc:
            raise ContainerError(f"Docker refused to {doing}: {_api_explanation(exc)}",
                                 "see the message; docker info / docker ps may tell more") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            raise self._unavailable(exc) from exc

    def available(self) -> tuple[bool, str | None]:
        """(True, None) when the engine answers a ping within ~3 s; else (False, reason in plain words)."""
        client = None
        try:
            client = self._new_client(AVAILABLE_TIMEOUT_S)
            client.ping()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
            err = exc if isinstance(exc, MemctlError) else self._unavailable(exc)
            return False, str(err)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        return True, None

    # ---------------------------------------------------------------- start
    def plan_start(
        self,
        model: CachedModel,
        profile: Profile,
        needed_bytes: int,
        gpus: Sequence[DeviceSnapshot],
    ) -> _Plan:
        """Compute name, args, env, mounts and labels; check memory. No Docker calls.

        Raises InsufficientMemoryError (does not fit, a chosen GPU lacks free memory or its memory
        is unknown), ContainerError (no GPU chosen / unknown GPU id), ModelNotFoundError (snapshot or
        model directory missing), QuantizationUnavailableError, InvalidModelIdError.
        """
        s = self.settings
        chosen = _chosen_gpus(profile, gpus)
        tp = len(chosen)
        per_gpu_bytes = math.ceil(needed_bytes / tp)
        min_total = min(g.total_bytes for g in chosen)  # _chosen_gpus checked they are known
        util = compute_gpu_memory_utilization(per_gpu_bytes, min_total, s.vllm_gpu_util_margin, s.vllm_gpu_util_max)
        for g in chosen:
            claim = int(util * g.total_bytes)
            if g.free_bytes < claim:
                raise InsufficientMemoryError(
                    f"vLLM would claim {fmt_bytes(claim)} ({util:.2f} × {fmt_bytes(g.total_bytes)}) on GPU "
                    f"{g.index} ({g.name}), but only {fmt_bytes(g.free_bytes)} is free",
                    "free GPU memory (unload other models, close programs using the GPU), "
                    "or lower the context or batch",
                    needed_bytes=claim,
                    free_bytes=g.free_bytes,
                )

        name = container_name_for(model.model_id)
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        volumes: dict[str, dict[str, str]] = {}
        mode = "ro" if s.vllm_hf_cache_readonly else "rw"
        revision = None
        if model.source == "local_dir":
            local = Path(model.path)
            if not local.is_dir():
                raise ModelNotFoundError(f"model directory {local} does not exist",
                                     "rescan the models or fix local_model_dirs in the settings")
            model_ref = f"{CONTAINER_MODELS_DIR}/{_slug(model.model_id) or 'model'}"
            volumes[str(local.resolve())] = {"bind": model_ref, "mode": "ro"}
            served_name = local.name or model.model_id
        else:
            if not Path(model.path).is_dir():
                raise ModelNotFoundError(
                    f"{model.model_id} is not in the Hugging Face cache any more ({model.path} is missing)",
                    "rescan the models; download it again with huggingface-cli download if needed",
                )
            hub = _hf_cache_root(model, s.resolved_hf_cache_dir)
            volumes[str(Path(hub).expanduser().resolve())] = {"bind": CONTAINER_HF_CACHE, "mode": mode}
            env["HF_HUB_OFFLINE"] = "1"
            env["HF_HUB_CACHE"] = CONTAINER_HF_CACHE
            model_ref = model.model_id
            served_name = model.model_id
            revision = model.revision if model.revision and re.fullmatch(r"[0-9a-f]{40}", model.revision) else None

        api_key = s.vllm_api_key.get_secret_value() if s.vllm_api_key else None
        # Inside its own network namespace vLLM listens on all interfaces and Docker publishes the
        # port on bind_address only; with the host network, _create_kwargs swaps in bind_address.
        args = build_vllm_args(model_ref, served_name, profile, util, s.vllm_port, api_key,
                               host="0.0.0.0", tensor_parallel_size=tp, revision=revision)
        labels = {
            MANAGED_LABEL: "true",
            MODEL_LABEL: model.model_id,
            SERVED_NAME_LABEL: served_name,
            PROFILE_LABEL: json.dumps(to_jsonable(profile), sort_keys=True),
            PORT_LABEL: str(s.vllm_port),
            HOST_LABEL: s.bind_address,
            GPU_UTIL_LABEL: f"{util:.2f}",
        }
        return _Plan(name, s.vllm_image_ref, args, env, volumes, labels, util, served_name, s.vllm_port,
                     s.bind_address)

    def start(
        self,
        model: CachedModel,
        profile: Profile,
        needed_bytes: int,
        gpus: Sequence[DeviceSnapshot],
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> ContainerInfo:
        """Start vLLM for ``model`` under ``profile`` and wait until it serves; return its info.

        ``needed_bytes`` is the estimate for the whole model (split evenly over the chosen GPUs);
        ``gpus`` are the probe's snapshots of the GPUs to use (``profile.gpu_ids`` picks among
        them; None = all of them). Memory is checked BEFORE anything is created. Readiness:
        ``/health`` answers 200 and ``/v1/models`` lists the served name, polled every 0.2 s until
        ``settings.vllm_ready_timeout_s``. On cancel, failure or timeout the container is stopped
        and removed before raising.

        Raises InsufficientMemoryError, ModelNotFoundError, QuantizationUnavailableError, DockerUnavailableError,
        ContainerError (name squatted by a container we did not start, port in use, ours already
        running), ContainerStartError (image missing, no GPU runtime, crash with ``log_tail`` and
        ``cause``, readiness timeout), OperationCancelledError.
        """
        t0 = time.monotonic()
        emit = _emitter(progress, t0)
        plan = self.plan_start(model, profile, needed_bytes, gpus)
        if cancel and cancel():
            raise OperationCancelledError("vLLM start cancelled before the container was created")
        client = self._client()
        emit("checking", f"checking Docker for {plan.name}")
        self._check_image(client, plan.image, emit)
        self._clear_name(client, plan.name)
        self._check_port(client, plan)

        kwargs = self._create_kwargs(client, plan, profile)
        emit("creating", f"creating container {plan.name} ({plan.image})")
        import docker.errors

        try:
            with self._docker_errors(f"create container {plan.name}"):
                container = client.containers.create(plan.image, kwargs.pop("command"), **kwargs)
        except ContainerError as exc:
            raise ContainerStartError(exc.message, exc.hint, cause="create_failed", details=exc.details) from exc
        try:
            try:
                container.start()
            except docker.errors.APIError as exc:
                raise _start_refused(exc, plan) from exc
            emit("waiting", f"container {plan.name} started; waiting for vLLM on port {plan.port}")
            self._wait_ready(container, plan, emit, cancel, t0)
        except BaseException as exc:
            cleanup_problem = self._discard(container)
            if cleanup_problem and isinstance(exc, MemctlError):
                exc.details = "; ".join(x for x in (exc.details, cleanup_problem) if x)
            if isinstance(exc, MemctlError | KeyboardInterrupt):
                raise
            if isinstance(exc, docker.errors.DockerException | OSError):
                raise self._unavailable(exc) from exc
            raise
        emit("ready", f"{plan.served_name} is ready on port {plan.port}", fraction=1.0)
        with self._docker_errors(f"read container {plan.name}"):
            container.reload()
        return self._info(container, probe=False, health="ready")

    def _create_kwargs(self, client: Any, plan: _Plan, profile: Profile) -> dict[str, Any]:
        import docker.types

        s = self.settings
        if profile.gpu_ids is None:
            device = docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
        else:
            device = docker.types.DeviceRequest(device_ids=[str(i) for i in profile.gpu_ids],
                                                capabilities=[["gpu"]])
        args = list(plan.args)
        kwargs: dict[str, Any] = {
            "command": args,
            "name": plan.name,
            "labels": dict(plan.labels),
            "environment": dict(plan.environment),
            "volumes": plan.volumes,
            "device_requests": [device],
            "init": True,
            "detach": True,
        }
        if s.vllm_ipc_host:
            kwargs["ipc_mode"] = "host"
        else:
            kwargs["shm_size"] = s.vllm_shm_size
        if self._use_host_network(client):
            # No bridge to publish from: vLLM listens on bind_address itself, in the host's network.
            kwargs["network_mode"] = "host"
            i = args.index("--host")
            args[i + 1] = plan.host
        else:
            kwargs["ports"] = {f"{plan.port}/tcp": (plan.host, plan.port)}
            if self.network:
                kwargs["network"] = self.network
        return kwargs

    def _use_host_network(self, client: Any) -> bool:
        if self.network:
            return False
        with self._docker_errors("list Docker networks"):
            return not client.networks.list(names=["bridge"])

    def _check_image(self, client: Any, image: str, emit: Callable[..., None]) -> None:
        import docker.errors

        try:
            with self._docker_errors(f"look up image {image}"):
                client.images.get(image)
            return
        except ContainerError as exc:
            if not isinstance(exc.__cause__, docker.errors.ImageNotFound):
                raise
        if not self.settings.vllm_allow_pull:
            raise ContainerStartError(
                f"the image {image} is not on this Docker engine ({self.docker_host_label})",
                f"get it with: docker pull {image} (about 10 GB), or set MEMCTL_VLLM_ALLOW_PULL=true "
                "to let memctl pull it",
                cause="image_missing",
            )
        emit("pulling", f"pulling {image} (this can take many minutes)")
        repo, _, tag = image.rpartition(":")
        try:
            with self._docker_errors(f"pull image {image}"):
                client.images.pull(repo, tag=tag)
        except ContainerError as exc:
            raise ContainerStartError(f"could not pull {image}: {exc.message}",
                                      f"pull it by hand (docker pull {image}) and retry",
                                      cause="image_missing", details=exc.details) from exc

    def _clear_name(self, client: Any, name: str) -> None:
        """Refuse a squatted name; remove our own stale (not running) container of that name."""
        import docker.errors

        try:
            with self._docker_errors(f"look up container {name}"):
                existing = client.containers.get(name)
        except ContainerError as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                return
            raise
        labels = existing.labels or {}
        if labels.get(MANAGED_LABEL) != "true":
            raise ContainerError(
                f"a container named {name} exists but memctl did not start it (no {MANAGED_LABEL} label); "
                "memctl leaves it alone",
                f"remove or rename it yourself (docker rm -f {name}) if it is not needed",
            )
        if existing.status in ("running", "restarting", "paused"):
            raise ContainerError(
                f"{name} is already running ({labels.get(MODEL_LABEL)})",
                f"stop it first (memctl stop {name}) or use the running one",
            )
        log.info("removing stale container %s (%s)", name, existing.status)
        with self._docker_errors(f"remove stale container {name}"):
            existing.remove(v=True, force=True)

    def _check_port(self, client: Any, plan: _Plan) -> None:
        holder = None
        if _port_busy(plan.host, plan.port):
            with contextlib.suppress(MemctlError):
                holder = next((c.name for c in self.list(probe=False) if c.port == plan.port
                               and c.state == "running"), None)
            who = f" by memctl's container {holder}" if holder else ""
            raise ContainerError(
                f"port {plan.port} on {plan.host} is already in use{who}",
                (f"stop it (memctl stop {holder})" if holder else "stop what listens there")
                + " or set MEMCTL_VLLM_PORT to a free port",
            )

    def _wait_ready(
        self,
        container: Any,
        plan: _Plan,
        emit: Callable[..., None],
        cancel: Callable[[], bool] | None,
        t0: float,
    ) -> None:
        """Poll until /health is 200 and /v1/models lists the served name; raise on exit/timeout/cancel."""
        import docker.errors

        s = self.settings
        api_key = s.vllm_api_key.get_secret_value() if s.vllm_api_key else None
        base = f"http://{_probe_host(plan.host)}:{plan.port}"
        deadline = time.monotonic() + s.vllm_ready_timeout_s
        next_log = time.monotonic() + LOG_POLL_INTERVAL_S
        last_line = ""
        healthy_seen = False
        while True:
            if cancel and cancel():
                raise OperationCancelledError(
                    f"start of {plan.name} cancelled after {time.monotonic() - t0:.1f} s; container removed")
            try:
                container.reload()
            except docker.errors.NotFound as exc:
                raise ContainerStartError(f"{plan.name} disappeared while starting (removed by someone else)",
                                          "start it again", cause="container_removed") from exc
            if container.status in ("exited", "dead"):
                raise self._crash_error(container, plan)
            status, _ = _http_get(base + "/health", HEALTH_PROBE_TIMEOUT_S)
            if status == 200:
                healthy_seen = True
                mstatus, body = _http_get(base + "/v1/models", VERIFY_TIMEOUT_S, api_key)
                if mstatus == 200 and _models_lists(body, plan.served_name):
                    return
            now = time.monotonic()
            if now >= next_log:
                next_log = now + LOG_POLL_INTERVAL_S
                line = _last_log_line(container) or last_line
                last_line = line
                emit("waiting", f"waiting for vLLM ({now - t0:.0f} s): {line}" if line else
                     f"waiting for vLLM ({now - t0:.0f} s)")
            if now >= deadline:
                tail = _log_tail(container)
                what = ("answers /health but /v1/models does not list " + plan.served_name if healthy_seen
                        else "did not answer /health")
                raise ContainerStartError(
                    f"{plan.name} {what} within {s.vllm_ready_timeout_s:g} s; it was stopped and removed",
                    "a cold start can take minutes: raise MEMCTL_VLLM_READY_TIMEOUT_S, or read the log tail",
                    log_tail=tail,
                    cause="ready_timeout",
                )
            time.sleep(min(READY_POLL_INTERVAL_S, max(0.0, deadline - now)))

    def _crash_error(self, container: Any, plan: _Plan) -> ContainerStartError:
        state = container.attrs.get("State", {})
        code = state.get("ExitCode")
        oom_killed = state.get("OOMKilled")
        tail = _log_tail(container)
        cause, words = classify_failure(tail)
        if cause is None and oom_killed:
            cause, words = "host_oom", "the host ran out of RAM (the kernel killed the container)"
        msg = f"{plan.name} exited with status {code} while starting"
        msg += f": {words}" if words else ""
        hint = _CAUSE_HINTS.get(cause or "", "read the last log lines below")
        if cause == "host_oom":
            hint = "close programs using RAM, or lower the batch"
        return ContainerStartError(msg, hint, log_tail=tail, cause=cause or "exited")

    def _discard(self, container: Any) -> str | None:
        """Stop (gracefully, then forced) and remove ``container``; a problem as text, or None."""
        import docker.errors

        try:
            with contextlib.suppress(docker.errors.NotFound):
                container.stop(timeout=int(math.ceil(self.settings.vllm_stop_timeout_s)))
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(v=True, force=True)
        except Exception as exc:  # noqa: BLE001 - reported with the original error
            log.warning("could not remove %s: %s", getattr(container, "name", "?"), exc)
            return f"clean-up of {getattr(container, 'name', '?')} failed: {exc}"
        return None

    # ---------------------------------------------------------------- management
    def list(self, probe: bool = True) -> list[ContainerInfo]:  # noqa: A003 - the documented name
        """memctl's containers (label ``memctl.managed=true``), any state, freshest attrs from Docker.

        ``probe``: ask each running container's ``/health`` (≤ 0.5 s each) for its health.
        Raises DockerUnavailableError.
        """
        client = self._client()
        with self._docker_errors("list containers"):
            found = client.containers.list(all=True, filters={"label": f"{MANAGED_LABEL}=true"},
                                           ignore_removed=True)
        infos = []
        for c in found:
            with contextlib.suppress(ContainerError):  # removed between list and reload
                with self._docker_errors(f"read container {c.name}"):
                    c.reload()
                infos.append(self._info(c, probe=probe))
        return sorted(infos, key=lambda i: i.name)

    def _info(self, c: Any, probe: bool, health: str | None = None) -> ContainerInfo:
        labels = c.labels or {}
        state = c.attrs.get("State", {})
        status = state.get("Status") or c.status
        started_at = _parse_docker_time(state.get("StartedAt")) if status != "created" else None
        uptime = max(0.0, time.time() - started_at) if started_at and status == "running" else None
        try:
            port: int | None = int(labels.get(PORT_LABEL, ""))
        except ValueError:
            port = None
        try:
            profile = json.loads(labels[PROFILE_LABEL]) if PROFILE_LABEL in labels else None
        except ValueError:
            profile = None
        try:
            gpu_util: float | None = float(labels[GPU_UTIL_LABEL])
        except (KeyError, ValueError):
            gpu_util = None
        if health is None:
            if status != "running":
                health = "stopped" if status in ("exited", "dead", "created") else "unknown"
            elif not probe or port is None:
                health = "unknown"
            else:
                code, _ = _http_get(f"http://{_probe_host(labels.get(HOST_LABEL))}:{port}/health",
                                    HEALTH_PROBE_TIMEOUT_S)
                health = "ready" if code == 200 else ("starting" if code in (0, 404) else "unhealthy")
        return ContainerInfo(
            name=c.name,
            container_id=c.id,
            state=status,
            model_id=labels.get(MODEL_LABEL),
            port=port,
            started_at=started_at,
            uptime_s=uptime,
            health=health,
            profile=profile,
            image=(c.attrs.get("Config") or {}).get("Image"),
            gpu_memory_utilization=gpu_util,
        )

    def _get_managed(self, name: str, doing: str) -> Any:
        """The container ``name`` if memctl manages it; ContainerError when gone or not ours."""
        import docker.errors

        client = self._client()
        try:
            with self._docker_errors(f"{doing} {name}"):
                c = client.containers.get(name)
        except ContainerError as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                raise ContainerError(f"container {name} is already gone (not found on {self.docker_host_label})",
                                     "refresh the container list") from exc
            raise
        if (c.labels or {}).get(MANAGED_LABEL) != "true":
            raise ContainerError(
                f"refusing to {doing} {name}: memctl did not start it (no {MANAGED_LABEL}=true label)",
                f"manage it with docker directly (docker stop {name}) if you mean to",
            )
        return c

    def stop(self, name: str, timeout_s: float | None = None) -> None:
        """Stop (SIGTERM, then SIGKILL after ``timeout_s``, default settings.vllm_stop_timeout_s) and remove.

        Raises ContainerError for an unlabelled container (left untouched) or one already gone;
        DockerUnavailableError.
        """
        import docker.errors

        c = self._get_managed(name, "stop")
        t = self.settings.vllm_stop_timeout_s if timeout_s is None else timeout_s
        try:
            with self._docker_errors(f"stop {name}"):
                try:
                    c.stop(timeout=int(math.ceil(max(0.0, t))))
                except docker.errors.NotFound:
                    raise ContainerError(f"container {name} is already gone", "refresh the list") from None
                try:
                    c.remove(v=True, force=True)
                except docker.errors.NotFound:
                    pass  # removed meanwhile (auto-remove or someone else): that is what we wanted
                except docker.errors.APIError as exc:
                    if exc.status_code == 409 and "in progress" in str(exc):
                        return
                    raise
        except ContainerError as exc:
            if "already gone" in exc.message:
                raise
            raise ContainerError(f"could not stop {name}: {exc.message}",
                                 f"try: docker rm -f {name}", details=exc.details) from exc

    def stop_all_managed(self, timeout_s: float | None = None) -> list[tuple[str, bool, str]]:
        """Stop and remove every memctl container; (name, ok, message) for each. Tries all of them.

        Raises DockerUnavailableError only when the list itself cannot be read.
        """
        results: list[tuple[str, bool, str]] = []
        for info in self.list(probe=False):
            t0 = time.monotonic()
            try:
                self.stop(info.name, timeout_s)
            except MemctlError as exc:
                results.append((info.name, False, str(exc)))
            else:
                results.append((info.name, True, f"stopped and removed in {time.monotonic() - t0:.1f} s"))
        return results

    def verify(self, name: str) -> bool:
        """True when the container runs and its ``/v1/models`` lists the served model.

        Raises ContainerError when the container is gone or not memctl's; DockerUnavailableError.
        """
        c = self._get_managed(name, "verify")
        with self._docker_errors(f"read container {name}"):
            c.reload()
        if c.status != "running":
            return False
        labels = c.labels or {}
        served = labels.get(SERVED_NAME_LABEL) or labels.get(MODEL_LABEL)
        try:
            port = int(labels.get(PORT_LABEL, ""))
        except ValueError:
            return False
        s = self.settings
        api_key = s.vllm_api_key.get_secret_value() if s.vllm_api_key else None
        code, body = _http_get(f"http://{_probe_host(labels.get(HOST_LABEL))}:{port}/v1/models",
                               VERIFY_TIMEOUT_S, api_key)
        return code == 200 and served is not None and _models_lists(body, served)

    def logs_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last ``lines`` log lines of a memctl container. Raises ContainerError / DockerUnavailableError."""
        c = self._get_managed(name, "read logs of")
        return _log_tail(c, lines)


# --------------------------------------------------------------------------- small helpers


def _chosen_gpus(profile: Profile, gpus: Sequence[DeviceSnapshot]) -> list[DeviceSnapshot]:
    if profile.gpu_ids is None:
        chosen = list(gpus)
    else:
        by_index = {g.index: g for g in gpus}
        missing = [i for i in profile.gpu_ids if i not in by_index]
        if missing:
            raise ContainerError(
                f"GPU {', '.join(map(str, missing))} asked for by the profile is not among the probed GPUs "
                f"({', '.join(str(g.index) for g in gpus) or 'none'})",
                "refresh the GPU list and choose GPUs that exist",
            )
        chosen = [by_index[i] for i in profile.gpu_ids]
    if not chosen:
        raise ContainerError("vLLM needs a GPU, and none was chosen or found",
                             "use the Transformers backend on CPU, or check the NVIDIA driver (nvidia-smi)")
    for g in chosen:
        if g.status is DeviceStatus.LOST or g.total_bytes is None or g.free_bytes is None:
            raise InsufficientMemoryError(
                f"GPU {g.index} ({g.name}) memory is unknown ({g.status.value}): cannot check that vLLM fits",
                g.hint or "check the GPU with nvidia-smi, then refresh",
            )
    return chosen


def _emitter(progress: ProgressCallback | None, t0: float) -> Callable[..., None]:
    def emit(stage: str, message: str, fraction: float | None = None) -> None:
        if progress is None:
            return
        try:
            progress(ProgressEvent(stage=stage, message=message, fraction=fraction,
                                   elapsed_s=time.monotonic() - t0))
        except Exception:  # noqa: BLE001 - a broken UI callback must not break the start
            log.exception("progress callback failed")

    return emit


def _log_tail(container: Any, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        raw = container.logs(stdout=True, stderr=True, tail=lines)
    except Exception as exc:  # noqa: BLE001 - the tail is best effort
        return [f"(could not read the container log: {exc})"]
    return raw.decode("utf-8", errors="replace").splitlines()[-lines:]


def _last_log_line(container: Any) -> str:
    tail = _log_tail(container, 3)
    lines = [ln.strip() for ln in tail if ln.strip() and not ln.startswith("(could not read")]
    return lines[-1][:200] if lines else ""


def _api_explanation(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc)


def _start_refused(exc: Any, plan: _Plan) -> ContainerStartError:
    text = _api_explanation(exc)
    if "could not select device driver" in text or "nvidia" in text.lower():
        return ContainerStartError(
            f"Docker cannot give {plan.name} a GPU: {text}",
            "install the NVIDIA Container Toolkit and restart Docker "
            "(nvidia-ctk runtime configure --runtime=docker)",
            cause="no_gpu_runtime",
        )
    if "address already in use" in text.lower() or "port is already allocated" in text.lower():
        return ContainerStartError(
            f"port {plan.port} on {plan.host} is already in use: {text}",
            _CAUSE_HINTS["port_in_use"],
            cause="port_in_use",
        )
    return ContainerStartError(f"Docker could not start {plan.name}: {text}",
                               "see the message; docker info may tell more", cause="start_refused")
