"""One container start, all or nothing: what to create (a :class:`LaunchSpec`, computed without
Docker), the checks before creating (image, name, port), the creation, readiness polling, and the
clean-up of exactly the container this start created (by id, never by name).

Networking: the port is published on ``settings.bind_address`` (127.0.0.1 by default) through
docker-proxy on the engine's default ``bridge`` network, or on ``network`` when one is given.
An engine started with ``--bridge=none`` has no network that can publish ports; then the
container shares the host network and vLLM itself listens on ``bind_address:port`` only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memory_controller.errors import (
    ContainerError,
    ContainerStartError,
    MemctlError,
    ModelNotFoundError,
    OperationCancelledError,
)
from memory_controller.types import CachedModel, Profile, ProgressCallback, ProgressEvent

from . import client as dc
from .args import (
    API_KEY_ENV,
    CONTAINER_HF_CACHE,
    CONTAINER_MODELS_DIR,
    _slug,
    build_vllm_args,
    container_name_for,
)
from .labels import MODEL_LABEL, is_managed, label_text, write_labels
from .options import vllm_options
from .view import parse_docker_time

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

log = logging.getLogger(__name__)

READY_POLL_INTERVAL_S = 0.2  # the "ready" report lags /health by at most this
LOG_POLL_INTERVAL_S = 1.0  # how often the latest log line is fetched for progress
HEALTH_PROBE_TIMEOUT_S = 0.5
VERIFY_TIMEOUT_S = 2.0
CREATED_STALE_S = 120.0  # a "created" container younger than this may be another process's start


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a start hands to Docker, computed before anything is created."""

    name: str
    image: str
    args: list[str]
    environment: dict[str, str]  # holds VLLM_API_KEY when a key is set: never log it
    volumes: dict[str, dict[str, str]]
    labels: dict[str, str]
    gpu_util: float
    served_name: str
    port: int
    host: str
    tool_parser: str | None


def _hf_cache_root(model: CachedModel, fallback: Path) -> Path:
    """The hub cache directory holding ``model`` (``.../hub``), from its snapshot path if it has one."""
    p = Path(model.path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.parent
    return fallback


def launch_spec(settings: Settings, model: CachedModel, profile: Profile, gpu_util: float,
                claim_bytes: dict[str, int], tool_parser: str | None) -> LaunchSpec:
    """Name, args, env, mounts and labels. No Docker call. Raises ModelNotFoundError,
    QuantizationUnavailableError, InvalidModelIdError, ContainerError (bad util/port)."""
    s = settings
    name = container_name_for(model.model_id)
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    volumes: dict[str, dict[str, str]] = {}
    revision = None
    if model.source == "local_dir":
        local = Path(model.path)
        if not local.is_dir():
            raise ModelNotFoundError(f"model directory {local} does not exist",
                                     "rescan the models or fix MEMCTL_LOCAL_MODEL_DIRS")
        model_ref = f"{CONTAINER_MODELS_DIR}/{_slug(model.model_id) or 'model'}"
        volumes[str(local.resolve())] = {"bind": model_ref, "mode": "ro"}
        served_name = local.name or model.model_id
    else:
        if not Path(model.path).is_dir():
            raise ModelNotFoundError(
                f"{model.model_id} is not in the Hugging Face cache any more ({model.path} is missing)",
                "rescan the models; download it again with huggingface-cli download if needed")
        hub = _hf_cache_root(model, s.resolved_hf_cache_dir)
        mode = "ro" if vllm_options(s).hf_cache_readonly else "rw"
        volumes[str(Path(hub).expanduser().resolve())] = {"bind": CONTAINER_HF_CACHE, "mode": mode}
        env["HF_HUB_OFFLINE"] = "1"
        env["HF_HUB_CACHE"] = CONTAINER_HF_CACHE
        model_ref = served_name = model.model_id
        revision = model.revision if model.revision and re.fullmatch(r"[0-9a-f]{40}", model.revision) else None
    if vllm_options(s).api_key:
        # vLLM reads VLLM_API_KEY when --api-key is absent: the key stays out of `ps` and the Args.
        env[API_KEY_ENV] = vllm_options(s).api_key.get_secret_value()
    tp = len(claim_bytes) or 1
    # Inside its own network namespace vLLM listens on all interfaces and Docker publishes the
    # port on bind_address only; with the host network, create_kwargs swaps in bind_address.
    args = build_vllm_args(model_ref, served_name, profile, gpu_util, vllm_options(s).port, host="0.0.0.0",
                           tensor_parallel_size=tp, revision=revision, tool_parser=tool_parser)
    labels = write_labels(model_id=model.model_id, served_name=served_name, profile=profile, port=vllm_options(s).port,
                          gpu_util=gpu_util, claim_bytes=claim_bytes, tool_parser=tool_parser)
    return LaunchSpec(name, vllm_options(s).image_ref, args, env, volumes, labels, gpu_util, served_name, vllm_options(s).port,
                      s.bind_address, tool_parser)


def create_kwargs(settings: Settings, client: Any, spec: LaunchSpec, profile: Profile, network: str | None,
                  access: dc.DockerAccess) -> dict[str, Any]:
    args = list(spec.args)
    kwargs: dict[str, Any] = {
        "command": args, "name": spec.name, "labels": dict(spec.labels), "environment": dict(spec.environment),
        "volumes": spec.volumes, "device_requests": [dc.device_request(profile.gpu_ids)], "init": True,
        "detach": True,
    }
    if vllm_options(settings).ipc_host:
        kwargs["ipc_mode"] = "host"
    else:
        kwargs["shm_size"] = vllm_options(settings).shm_size
    with access.errors("list Docker networks"):
        host_net = not network and not client.networks.list(names=["bridge"])
    if host_net:  # no bridge to publish from: vLLM listens on bind_address itself
        kwargs["network_mode"] = "host"
        args[args.index("--host") + 1] = spec.host
    else:
        kwargs["ports"] = {f"{spec.port}/tcp": (spec.host, spec.port)}
        if network:
            kwargs["network"] = network
    return kwargs


def check_image(settings: Settings, access: dc.DockerAccess, client: Any, image: str,
                emit: Callable[..., None]) -> None:
    try:
        with access.errors(f"look up image {image}"):
            client.images.get(image)
        return
    except ContainerError as exc:
        if not dc.is_image_not_found(exc):
            raise
    if not vllm_options(settings).allow_pull:
        raise ContainerStartError(
            f"the image {image} is not on this Docker engine ({access.host_label})",
            f"get it with: docker pull {image} (about 10 GB), or set MEMCTL_VLLM_ALLOW_PULL=true to let memctl pull it",
            cause="image_missing")
    emit("pulling", f"pulling {image} (this can take many minutes)")
    repo, _, tag = image.rpartition(":")
    try:
        with access.errors(f"pull image {image}"):
            client.images.pull(repo, tag=tag)
    except ContainerError as exc:
        raise ContainerStartError(f"could not pull {image}: {exc.message}", f"pull it by hand (docker pull {image}) "
                                  "and retry", cause="image_missing", details=exc.details) from exc


def already_running(name: str, model: str | None) -> ContainerError:
    return ContainerError(
        f"{name} is already running (started by another process){': ' + model if model else ''}; "
        "memctl left it alone",
        f"use the running one, or stop it first (memctl stop {name})")


def clear_name(access: dc.DockerAccess, client: Any, name: str) -> None:
    """Refuse a name held by a foreign or running container; remove our own stale one by its id."""
    try:
        with access.errors(f"look up container {name}"):
            existing = client.containers.get(name)
    except ContainerError as exc:
        if dc.is_not_found(exc):
            return
        raise
    labels = existing.labels or {}
    if not is_managed(labels):
        raise ContainerError(
            f"a container named {name} exists but memctl did not start it (no memctl.managed label); "
            "memctl leaves it alone",
            f"remove or rename it yourself (docker rm -f {name}) if it is not needed")
    model = label_text(labels.get(MODEL_LABEL) or "") or None
    created = parse_docker_time((existing.attrs or {}).get("Created"))
    fresh = created is None or time.time() - created < CREATED_STALE_S
    if existing.status in ("running", "restarting", "paused", "removing") or (existing.status == "created" and fresh):
        raise already_running(name, model)
    log.info("removing stale container %s (%s, %s)", name, existing.status, existing.id[:12])
    with access.errors(f"remove stale container {name}"):
        try:
            client.api.remove_container(existing.id, v=True, force=True)
        except Exception as exc:  # removed meanwhile by someone else: the name is free, that is all we need
            if getattr(exc, "status_code", None) not in (404, 409):
                raise


def create(access: dc.DockerAccess, client: Any, spec: LaunchSpec, kwargs: dict[str, Any]) -> Any:
    """Create the container; a name taken meanwhile (409) is another process's start: nothing is removed."""
    try:
        with access.errors(f"create container {spec.name}"):
            return client.containers.create(spec.image, kwargs.pop("command"), **kwargs)
    except ContainerError as exc:
        if dc.is_conflict(exc):
            raise already_running(spec.name, label_text(spec.labels.get(MODEL_LABEL, ""))) from exc
        raise ContainerStartError(exc.message, exc.hint, cause="create_failed", details=exc.details) from exc


def wait_ready(settings: Settings, container: Any, spec: LaunchSpec, emit: Callable[..., None],
               cancel: Callable[[], bool] | None, t0: float) -> None:
    """Poll until /health is 200 and /v1/models lists the served name; raise on exit/timeout/cancel."""
    s = settings
    api_key = vllm_options(s).api_key.get_secret_value() if vllm_options(s).api_key else None
    base = f"http://{dc.url_host(spec.host)}:{spec.port}"
    deadline = time.monotonic() + vllm_options(s).ready_timeout_s
    next_log = time.monotonic() + LOG_POLL_INTERVAL_S
    last_line = ""
    healthy_seen = False
    not_found = dc.not_found_type()
    while True:
        if cancel and cancel():
            raise OperationCancelledError(
                f"start of {spec.name} cancelled after {time.monotonic() - t0:.1f} s; container removed")
        try:
            container.reload()
        except not_found as exc:
            raise ContainerStartError(f"{spec.name} disappeared while starting (removed by someone else)",
                                      "start it again", cause="container_removed") from exc
        if container.status in ("exited", "dead"):
            raise dc.crash_error(container, spec.name)
        status, _ = dc.http_get(base + "/health", HEALTH_PROBE_TIMEOUT_S)
        if status == 200:
            healthy_seen = True
            mstatus, body = dc.http_get(base + "/v1/models", VERIFY_TIMEOUT_S, api_key)
            if mstatus == 200 and dc.models_lists(body, spec.served_name):
                return
        now = time.monotonic()
        if now >= next_log:
            next_log = now + LOG_POLL_INTERVAL_S
            last_line = dc.last_log_line(container) or last_line
            emit("waiting", f"waiting for vLLM ({now - t0:.0f} s): {last_line}" if last_line
                 else f"waiting for vLLM ({now - t0:.0f} s)")
        if now >= deadline:
            what = ("answers /health but /v1/models does not list " + spec.served_name if healthy_seen
                    else "did not answer /health")
            raise ContainerStartError(
                f"{spec.name} {what} within {vllm_options(s).ready_timeout_s:g} s; it was stopped and removed",
                "a cold start can take minutes: raise MEMCTL_VLLM_READY_TIMEOUT_S, or read the log tail",
                log_tail=dc.log_tail(container), cause="ready_timeout")
        time.sleep(min(READY_POLL_INTERVAL_S, max(0.0, deadline - now)))


def discard(settings: Settings, container: Any) -> str | None:
    """Stop (gracefully, then forced) and remove exactly ``container`` (by its id); a problem as text."""
    try:
        with contextlib.suppress(dc.not_found_type()):
            container.stop(timeout=int(math.ceil(vllm_options(settings).stop_timeout_s)))
        with contextlib.suppress(dc.not_found_type()):
            container.remove(v=True, force=True)
    except Exception as exc:  # noqa: BLE001 - reported with the original error
        log.warning("could not remove %s: %s", getattr(container, "name", "?"), exc)
        return f"clean-up of {getattr(container, 'name', '?')} failed: {exc}"
    return None



def emitter(progress: ProgressCallback | None, t0: float) -> Callable[..., None]:
    def emit(stage: str, message: str, fraction: float | None = None) -> None:
        if progress is None:
            return
        try:
            progress(ProgressEvent(stage=stage, message=message, fraction=fraction, elapsed_s=time.monotonic() - t0))
        except Exception:  # noqa: BLE001 - a broken UI callback must not break the start
            log.exception("progress callback failed")

    return emit


def run(settings: Settings, access: dc.DockerAccess, spec: LaunchSpec, profile: Profile, network: str | None,
        emit: Callable[..., None], cancel: Callable[[], bool] | None, t0: float, *,
        port_check: Callable[[LaunchSpec], None], tracking: set[str], lock: threading.RLock) -> Any:
    """Check image, name and port; create; start; wait until ready. Returns the reloaded container.
    Anything that goes wrong after the create removes exactly that container (by id) before raising.
    ``tracking`` holds the new container's id while it starts (under ``lock``)."""
    client = access.client()
    emit("checking", f"checking Docker for {spec.name}")
    check_image(settings, access, client, spec.image, emit)
    clear_name(access, client, spec.name)
    port_check(spec)
    kwargs = create_kwargs(settings, client, spec, profile, network, access)
    emit("creating", f"creating container {spec.name} ({spec.image})")
    container = create(access, client, spec, kwargs)
    with lock:
        tracking.add(container.id)
    try:
        try:
            container.start()
        except dc.docker_exception_type() as exc:
            raise dc.start_refused(exc, spec.name, spec.host, spec.port) from exc
        emit("waiting", f"container {spec.name} started; waiting for vLLM on port {spec.port}")
        wait_ready(settings, container, spec, emit, cancel, t0)
        with access.errors(f"read container {spec.name}"):
            container.reload()
    except BaseException as exc:
        problem = discard(settings, container)  # exactly what this call created
        if problem and isinstance(exc, MemctlError):
            exc.details = "; ".join(x for x in (exc.details, problem) if x)
        if isinstance(exc, dc.docker_exception_type() | OSError):
            raise access.unavailable(exc) from exc
        raise
    finally:
        with lock:
            tracking.discard(container.id)
    return container
