"""vLLM in Docker as a :class:`memory_controller.backend.Backend`.

State lives in Docker, not here: containers carry ``memctl.managed=true`` plus the model, served
name, port, profile, gpu_util and claim (see labels.py), so a restarted process finds its running
containers again. Labels are untrusted: a container with malformed labels is listed with a warning
and can still be stopped. A container without memctl's label is never stopped or removed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from memory_controller.backend import (
    Availability,
    BackendBase,
    Capabilities,
    Claim,
    Deployment,
    Message,
    ReleaseReport,
    msg,
)
from memory_controller.cache import TTLCache
from memory_controller.errors import (
    ContainerError,
    InsufficientMemoryError,
    MemctlError,
    OperationCancelledError,
    QuantizationUnavailableError,
)
from memory_controller.types import (
    CachedModel,
    MemoryEstimate,
    Outcome,
    Precision,
    Profile,
    ProgressCallback,
    SystemSnapshot,
)

from . import client as dc
from . import launch
from .args import (
    check_free,
    compute_claim,
    inflight_nf4_supported,
    model_family,
    precision_blocker,
    tool_parser_for,
    validate_container_name,
)
from .holders import ContainerHolder, docker_lookup, holders_for_pids
from .labels import MANAGED_LABEL, is_managed, read_labels
from .options import vllm_options
from .view import BACKEND_ID, gone_report, probe_health, release_report, to_deployment, wait_released

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.probe import DeviceProbe
    from memory_controller.settings import Settings

log = logging.getLogger(__name__)

AVAILABILITY_TTL_S = 5.0
REFRESH_INTERVAL_S = 2.0  # deployments(): a cache older than this is refreshed in the background
FIRST_REFRESH_WAIT_S = 2.0  # the very first deployments() waits this long for Docker's answer
VERIFY_TIMEOUT_S = 2.0
_BLOCKER_ERRORS: dict[str, type[MemctlError]] = {
    "backend.precision_unsupported": QuantizationUnavailableError,
    "backend.over_util_cap": InsufficientMemoryError,
    "backend.gpu_memory_unknown": InsufficientMemoryError,
}


class VllmDockerBackend(BackendBase):
    """Starts, lists, verifies and stops memctl's vLLM containers. Thread-safe."""

    id = BACKEND_ID
    # What an image that still quantizes in flight (<= v0.27) can do; an instance narrows it to its image.
    capabilities = Capabilities(
        precisions=(Precision.FP16, Precision.BF16, Precision.NF4), devices=("cuda",), fit_ladder=(Precision.NF4,),
        serves_http=True, generates_in_process=False, needs_gpu=True, label="vLLM (Docker)")
    validate_container_name = staticmethod(validate_container_name)
    export_formats = ("production-stack", "rayservice")  # documents for cluster engines (export.py)

    def __init__(self, settings: Settings, probe: DeviceProbe | None = None, *, network: str | None = None) -> None:
        self.settings = settings
        self.probe = probe
        self.network = network if network is not None else vllm_options(settings).network
        self.access = dc.DockerAccess(settings.docker_host)
        if inflight_nf4_supported(vllm_options(settings).tag) is False:  # v0.28+: no bitsandbytes in flight
            self.capabilities = dataclasses.replace(VllmDockerBackend.capabilities,
                                                    precisions=(Precision.FP16, Precision.BF16), fit_ladder=())
        self._lock = threading.RLock()
        self._docker_status: TTLCache[tuple[MemctlError | None]] = TTLCache(AVAILABILITY_TTL_S)
        self._cache: dict[str, Deployment] | None = None
        self._cache_at = 0.0
        self._generation = 0  # bumped by start/stop: a refresh begun before them is out of date
        self._refresher: threading.Thread | None = None
        self._starting: set[str] = set()
        self._stopping: set[str] = set()

    def close(self) -> None:
        self.access.close()

    # ---------------------------------------------------------------- availability
    def docker_problem(self, refresh: bool = False) -> MemctlError | None:
        """Why Docker cannot be used now (None when it answers); cached AVAILABILITY_TTL_S."""
        return self._docker_status.get_or(lambda: (self.access.ping(),), refresh=refresh)[0]

    @property
    def start_timeout_s(self) -> float:
        """How long the controller waits for a start: vLLM's own readiness deadline plus container set-up."""
        return vllm_options(self.settings).ready_timeout_s + 60

    @property
    def stop_timeout_s(self) -> float:
        """How long a stop waits for the container to exit."""
        return vllm_options(self.settings).stop_timeout_s

    def availability(self, snapshot: SystemSnapshot) -> Availability:
        try:
            if not snapshot.has_gpu:
                detail = snapshot.nvml_hint or "no NVIDIA GPU was found"
                return Availability(False, msg("backend.no_gpu", f"vLLM needs an NVIDIA GPU: {detail}",
                                               backend=self.id, detail=detail))
            problem = self.docker_problem()
            if problem is not None:
                return Availability(False, msg("backend.docker_unavailable", str(problem), backend=self.id,
                                               detail=str(problem), host=self.access.host_label))
            return Availability(True)
        except Exception as exc:  # noqa: BLE001 - availability never raises
            return Availability(False, msg("backend.docker_unavailable", f"Docker check failed: {exc}",
                                           backend=self.id, detail=str(exc), host=self.access.host_label))

    def export(self, fmt: str, model: CachedModel, request: Any) -> Any:
        """A document for a cluster engine (``export_formats``), sized by memctl's fit (see export.py)."""
        from .export import export

        return export(self.settings, self.id, fmt, model, request)

    # ---------------------------------------------------------------- claim
    def check_model(self, model: CachedModel, profile: Profile) -> tuple[Message, ...]:
        from pathlib import Path

        out: list[Message] = []
        if not Path(model.path).is_dir():
            out.append(msg("backend.model_missing", f"{model.model_id}: {model.path} is missing; rescan the models",
                           model=model.model_id))
        blocker = precision_blocker(profile.precision, vllm_options(self.settings).tag)
        return (*out, blocker) if blocker else tuple(out)

    def claim(self, model: CachedModel, profile: Profile, estimate: MemoryEstimate,
              snapshot: SystemSnapshot) -> Claim:
        """gpu_memory_utilization × total on each chosen GPU. No Docker call; never raises."""
        return compute_claim(self.settings, model, profile, estimate, snapshot)

    # ---------------------------------------------------------------- deployments
    def deployments(self, *, max_wait_s: float = 0.0) -> list[Deployment]:
        """memctl's containers from a cache refreshed in the background; never blocks on Docker,
        except that the first call waits up to FIRST_REFRESH_WAIT_S (or ``max_wait_s``) for one answer."""
        with self._lock:
            first = self._cache is None
            stale = first or time.monotonic() - self._cache_at > REFRESH_INTERVAL_S
            worker = self._kick_refresh() if stale or max_wait_s > 0 else None
        wait = max(max_wait_s, FIRST_REFRESH_WAIT_S if first else 0.0)
        if worker is not None and wait > 0:
            worker.join(wait)
        with self._lock:
            return sorted((self._cache or {}).values(), key=lambda d: d.name or d.handle)

    def _kick_refresh(self) -> threading.Thread:
        if self._refresher is None or not self._refresher.is_alive():
            self._refresher = threading.Thread(target=self._refresh, name="memctl-vllm-refresh", daemon=True)
            self._refresher.start()
        return self._refresher

    def _refresh(self) -> None:
        with self._lock:
            generation = self._generation
        try:
            found = self.list_managed(probe=True)
        except MemctlError as exc:
            log.info("vLLM containers not listed: %s", exc)
            found = []
        except Exception:  # noqa: BLE001 - a background refresh must not die loudly
            log.exception("vLLM container refresh failed")
            found = []
        with self._lock:
            if generation != self._generation and self._cache is not None:
                return  # a start/stop finished meanwhile: keep what it recorded; the next call refreshes
            self._cache = {d.handle: d for d in found}
            self._cache_at = time.monotonic()

    def list_managed(self, probe: bool = True) -> list[Deployment]:
        """Every container labelled memctl.managed=true, straight from Docker (blocks).
        Raises DockerUnavailableError."""
        client = self.access.client()
        with self.access.errors("list containers"):
            found = client.containers.list(all=True, filters={"label": f"{MANAGED_LABEL}=true"},
                                           ignore_removed=True)
        with self._lock:
            starting, stopping = set(self._starting), set(self._stopping)
        return [to_deployment(self.settings, c, probe=probe, starting=c.id in starting,
                              stopping=c.id in stopping) for c in found]

    def _remember(self, dep: Deployment | None, forget: str | None = None) -> None:
        with self._lock:
            self._generation += 1
            if self._cache is None:
                self._cache = {}
            if forget is not None:
                self._cache.pop(forget, None)
            if dep is not None:
                self._cache[dep.handle] = dep

    # ---------------------------------------------------------------- start
    def start(self, model: CachedModel, profile: Profile, claim: Claim, *,
              progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None) -> Deployment:
        """Start vLLM for ``model`` and wait until it serves; all or nothing.

        Free memory is checked (fresh probe snapshot) BEFORE anything is created. On cancel,
        failure or timeout the container this call created is removed, by id, before raising.
        Raises InsufficientMemoryError, ModelNotFoundError, QuantizationUnavailableError,
        DockerUnavailableError, ContainerError (name squatted, port in use, already running —
        started by another process), ContainerStartError (image missing, no GPU runtime, crash with
        ``log_tail``/``cause``, readiness timeout), OperationCancelledError.
        """
        t0 = time.monotonic()
        emit = launch.emitter(progress, t0)
        if claim.blockers:
            b = claim.blockers[0]
            err = _BLOCKER_ERRORS.get(b.code, ContainerError)
            raise err(b.text or b.code, "choose another profile or backend")
        gpu_util = claim.detail.get("gpu_util")
        if not isinstance(gpu_util, float) or not 0 < gpu_util <= 1 or not claim.bytes_by_device:
            raise ContainerError("this claim was not made by the vLLM backend (no gpu_util)",
                                 "plan the start again with the vLLM backend")
        parser = claim.detail["tool_parser"] if "tool_parser" in claim.detail else tool_parser_for(model_family(model))
        spec = launch.launch_spec(self.settings, model, profile, gpu_util, dict(claim.bytes_by_device), parser)
        if self.probe is not None:
            check_free(dict(claim.bytes_by_device), self.probe.snapshot().gpus, gpu_util)
        if cancel and cancel():
            raise OperationCancelledError("vLLM start cancelled before the container was created")
        container = launch.run(self.settings, self.access, spec, profile, self.network, emit, cancel, t0,
                               port_check=self._check_port, tracking=self._starting, lock=self._lock)
        emit("ready", f"{spec.served_name} is ready on port {spec.port}", fraction=1.0)
        dep = to_deployment(self.settings, container, health="ready")
        self._remember(dep)
        return dep

    def _check_port(self, spec: launch.LaunchSpec) -> None:
        if not dc.port_busy(spec.host, spec.port):
            return
        holder = next((d.name for d in self.deployments() if d.detail.get("port") == spec.port
                       and d.detail.get("docker_state") == "running"), None)
        who = f" by memctl's container {holder}" if holder else ""
        raise ContainerError(f"port {spec.port} on {spec.host} is already in use{who}",
                             (f"stop it (memctl stop {holder})" if holder else "stop what listens there")
                             + " or set MEMCTL_VLLM_PORT to a free port")

    # ---------------------------------------------------------------- stop
    def _get_managed(self, handle: str, doing: str) -> Any | None:
        """The container ``handle`` (id or name) if memctl manages it; None when it is gone.
        Raises InvalidContainerNameError, ContainerError (not memctl's), DockerUnavailableError."""
        validate_container_name(handle)
        client = self.access.client()
        try:
            with self.access.errors(f"{doing} {handle}"):
                c = client.containers.get(handle)
        except ContainerError as exc:
            if dc.is_not_found(exc):
                return None
            raise
        if not is_managed(c.labels):
            raise ContainerError(
                f"refusing to {doing} {c.name}: memctl did not start it (no {MANAGED_LABEL}=true label)",
                f"manage it with docker directly (docker stop {c.name}) if you mean to")
        return c

    def _gpu_used(self) -> dict[str, int | None]:
        if self.probe is None:
            return {}
        return {g.key: g.used_bytes for g in self.probe.snapshot().gpus}

    def stop(self, handle: str, timeout_s: float | None = None) -> ReleaseReport:
        """Stop (SIGTERM, then SIGKILL after ``timeout_s``) and remove; idempotent (gone = success,
        "release.already_gone"). The GPU memory given back is measured on NVML when it can be.
        Raises InvalidContainerNameError, ContainerError (not memctl's: left untouched; Docker refused),
        DockerUnavailableError."""
        c = self._get_managed(handle, "stop")
        if c is None:
            self._remember(None, forget=handle)
            return gone_report(handle)
        info = read_labels(c.labels)
        before = self._gpu_used()
        t = vllm_options(self.settings).stop_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            self._stopping.add(c.id)
        t0 = time.monotonic()
        gone = dc.not_found_type()
        try:
            with self.access.errors(f"stop {c.name}"):
                try:
                    c.stop(timeout=int(math.ceil(max(0.0, t))))
                except gone:
                    return gone_report(handle)
                try:
                    c.remove(v=True, force=True)
                except gone:
                    pass  # removed meanwhile (auto-remove or someone else): what we wanted
                except dc.docker_exception_type() as exc:
                    if not (getattr(exc, "status_code", None) == 409 and "in progress" in str(exc)):
                        raise
        except ContainerError as exc:
            raise ContainerError(f"could not stop {c.name}: {exc.message}", f"try: docker rm -f {c.name}",
                                 details=exc.details) from exc
        finally:
            with self._lock:
                self._stopping.discard(c.id)
            self._remember(None, forget=c.id)
        seconds = time.monotonic() - t0
        after = wait_released(self._gpu_used, before, info.claim_bytes if info.readable else {})
        return release_report(c.id, c.name, info, before, after, seconds)

    def stop_all_managed(self, timeout_s: float | None = None) -> list[ReleaseReport]:
        """Stop and remove every memctl container (emergency); one report each, failures as ERROR.
        Raises DockerUnavailableError only when the list itself cannot be read."""
        reports = []
        for dep in self.list_managed(probe=False):
            try:
                reports.append(self.stop(dep.handle, timeout_s))
            except MemctlError as exc:
                reports.append(ReleaseReport(self.id, dep.handle, dep.model_id, dep.device, dep.footprint_bytes, 0,
                                             dep.footprint_bytes, "docker", Outcome.ERROR,
                                             msg("release.failed", str(exc), container=dep.name, error=exc.message)))
        return reports

    # ---------------------------------------------------------------- verify, logs, holders
    def verify(self, deployment: Deployment) -> str:
        """A short English detail when the container runs and /v1/models lists its model.
        Raises ContainerError (gone, not memctl's, not running, does not answer)."""
        c = self._get_managed(deployment.handle, "verify")
        if c is None:
            raise ContainerError(f"container {deployment.name or deployment.handle} is gone", "start it again")
        with self.access.errors(f"read container {c.name}"):
            c.reload()
        info = read_labels(c.labels)
        served = info.raw_served_name
        if c.status != "running" or info.port is None or served is None:
            raise ContainerError(f"{c.name} is {c.status}" + ("" if info.readable else " (unreadable labels)"),
                                 "read its log (memctl logs) or start it again")
        s = self.settings
        key = vllm_options(s).api_key.get_secret_value() if vllm_options(s).api_key else None
        url = f"http://{dc.url_host(s.bind_address)}:{info.port}/v1/models"
        code, body = dc.http_get(url, VERIFY_TIMEOUT_S, key)
        if code == 200 and dc.models_lists(body, served):
            return f"{served} answers on port {info.port}"
        raise ContainerError(f"{c.name} does not list {served} on /v1/models (HTTP {code or 'no answer'})",
                             f"health: {probe_health(s, info.port)}; read its log or restart it")

    def logs_tail(self, handle: str, lines: int = dc.LOG_TAIL_LINES) -> list[str]:
        c = self._get_managed(handle, "read logs of")
        if c is None:
            raise ContainerError(f"container {handle} is already gone", "refresh the list")
        return dc.log_tail(c, lines)

    def containers_for_pids(self, pids: Iterable[int], timeout_s: float = 2.0) -> dict[int, ContainerHolder]:
        """Host PID -> the container it runs in (managed or not); never waits more than ``timeout_s``."""

        return holders_for_pids(pids, docker_lookup(self.access, timeout_s), timeout_s)

    def clear_caches(self) -> dict[str, Any]:
        return {}  # vLLM's memory lives in its container: nothing to clear in this process

