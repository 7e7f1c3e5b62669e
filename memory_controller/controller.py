"""MemoryController: the one object the UI, the CLI and scripts talk to.

It owns the probe, the catalog, the estimator and both backends, and keeps the product's promise:
no load we could have predicted to fail, no half-done switch, nothing left holding memory without
the user being told.

Threading: Streamlit runs many sessions and fragments on threads against one instance.
Read-only calls (devices, recommend, models, estimate, plan, loaded, history) may run at any
time. State-changing calls (apply, unload, stop_container, clear_memory) take the operation
slot; a second one while one runs raises :class:`OperationBusyError` at once.
``emergency_clear`` never waits for the slot: it cancels the running operation and cleans up.

Backend calls that can take long run on a worker thread, awaited with a deadline and checked
for cancellation; progress events cross back to the caller's thread through a queue, so a
Streamlit callback always runs on the script thread.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import (
    ContainerError,
    DockerUnavailableError,
    InsufficientMemoryError,
    MemctlError,
    ModelLoadError,
    OperationBusyError,
    OperationCancelledError,
    OperationTimeoutError,
)
from .oplog import OperationLog
from .recommend import level_for, recommend
from .settings import Settings, load_settings
from .types import (
    CachedModel,
    CatalogResult,
    ContainerInfo,
    DeviceKind,
    DeviceSnapshot,
    Level,
    LoadedModel,
    MemoryEstimate,
    Mode,
    OperationRecord,
    Outcome,
    Precision,
    Profile,
    ProgressCallback,
    ProgressEvent,
    Recommendation,
    StepRecord,
    SystemSnapshot,
    UnloadReport,
    to_jsonable,
)
from .units import fmt_bytes

if TYPE_CHECKING:  # only for type names; the real imports are lazy
    from backends.transformers_backend import TransformersBackend
    from backends.vllm_docker import VllmDockerBackend

    from .devices import DeviceProbe

APPLY_STEPS = ("unload", "clear", "check", "switch", "prepare", "verify")
_DOCKER_STATUS_TTL_S = 5.0
_CATALOG_TTL_S = 10.0


@dataclass(frozen=True)
class Plan:
    """A dry run of :meth:`MemoryController.apply`: shown to the user before it runs."""

    mode: Mode
    model_id: str
    profile: Profile
    device_key: str
    steps: tuple[str, ...]
    to_unload: tuple[LoadedModel, ...]
    expected_freed_bytes: int
    needed_bytes: int
    free_bytes_now: int | None
    free_bytes_after_unload: int | None
    fits: bool
    already_active: bool
    estimate: MemoryEstimate | None
    suggestion: str | None = None  # when it does not fit: the largest context or a quantisation that would
    max_context_that_fits: int | None = None
    blockers: tuple[str, ...] = ()  # reasons it cannot run at all (vLLM unavailable...)


@dataclass
class ClearReport:
    before: dict[str, int | None]
    after: dict[str, int | None]
    actions: dict[str, Any] = field(default_factory=dict)

    @property
    def freed(self) -> dict[str, int | None]:
        return {
            k: (None if self.before.get(k) is None or self.after.get(k) is None else self.before[k] - self.after[k])
            for k in self.before
        }


@dataclass
class EmergencyReport:
    steps: list[StepRecord]
    outcome: Outcome
    cancelled_operation: str | None = None


@dataclass
class _Running:
    op_id: str
    kind: str
    description: str
    started_at: float
    last_event: ProgressEvent | None = None


class _Abandoned(Exception):
    pass


class MemoryController:
    """See the module docstring. ``MemoryController()`` reads settings from the environment.

    Args:
        settings: a :class:`Settings`; default ``load_settings()`` (raises SettingsError).
        nvml: an NVML module to hand to the probe (tests pass a fake); default: import by name.
        probe / transformers_backend / vllm_backend: ready-made parts (tests, benchmarks).
        step_hook: called with each apply step's name as it starts (fault injection in tests).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        nvml: Any | None = None,
        probe: DeviceProbe | None = None,
        transformers_backend: TransformersBackend | None = None,
        vllm_backend: VllmDockerBackend | None = None,
        step_hook: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        # Called with the step name as each apply step starts; an exception it raises fails that
        # step. Fault-injection seam for tests and the diagnostic page; None in normal use.
        self.step_hook = step_hook
        if probe is None:
            from .devices import DeviceProbe

            probe = DeviceProbe(
                nvml,
                nvml_module_name=self.settings.nvml_module,
                host_memory_budget_bytes=self.settings.host_memory_budget_bytes,
            )
        self.probe = probe
        self._tf = transformers_backend
        self._vllm = vllm_backend
        self._parts_lock = threading.Lock()
        self._op_lock = threading.Lock()
        self._state_lock = threading.RLock()
        self._running: _Running | None = None
        self._cancel = threading.Event()  # replaced by a fresh one for each operation
        self._emergency_running = False
        self._log = OperationLog(self.settings.state_dir)
        n_samples = max(2, int(self.settings.memory_history_s / self.settings.poll_interval_s))
        self._samples: deque[tuple[float, dict[str, tuple[int | None, int | None]]]] = deque(maxlen=n_samples)
        self._docker_status: tuple[float, bool, str | None] | None = None
        self._catalog: tuple[float, CatalogResult] | None = None
        self._mode: Mode | None = None
        self._active: tuple[str, Profile] | None = None  # what the last apply made active

    # ================================================================== parts (lazy)
    @property
    def transformers(self) -> TransformersBackend:
        """The in-process backend; importing it imports torch (seconds), so only on first use."""
        with self._parts_lock:
            if self._tf is None:
                from backends.transformers_backend import TransformersBackend

                self._tf = TransformersBackend(self.settings, gpu_used_bytes=self.probe.gpu_used_bytes)
            return self._tf

    @property
    def vllm(self) -> VllmDockerBackend:
        with self._parts_lock:
            if self._vllm is None:
                from backends.vllm_docker import VllmDockerBackend

                self._vllm = VllmDockerBackend(self.settings, network=self.settings.vllm_network)
            return self._vllm

    @property
    def transformers_started(self) -> bool:
        """True once the Transformers backend (and so torch) has been loaded in this process."""
        return self._tf is not None

    # ================================================================== read-only
    def devices(self) -> SystemSnapshot:
        """A fresh snapshot of every GPU and the host; also feeds the memory history."""
        snap = self.probe.snapshot()
        with self._state_lock:
            last = self._samples[-1][0] if self._samples else None
            if last is None or snap.taken_at - last >= self.settings.poll_interval_s * 0.5:
                self._samples.append(
                    (snap.taken_at, {d.key: (d.used_bytes, d.free_bytes) for d in snap.devices})
                )
        return snap

    def memory_history(self) -> list[tuple[float, dict[str, tuple[int | None, int | None]]]]:
        """Samples of (time, {device key: (used bytes, free bytes)}) over the last ``memory_history_s``."""
        with self._state_lock:
            return list(self._samples)

    def level(self, device: DeviceSnapshot) -> Level:
        return level_for(device.free_bytes, self.settings.green_min_bytes, self.settings.yellow_min_bytes)

    def docker_status(self, refresh: bool = False) -> tuple[bool, str | None]:
        """(available, reason when not). Cached a few seconds: a ping to a dead socket costs."""
        now = time.monotonic()
        cached = self._docker_status
        if not refresh and cached is not None and now - cached[0] < _DOCKER_STATUS_TTL_S:
            return cached[1], cached[2]
        try:
            ok, reason = self.vllm.available()
        except ImportError as exc:
            ok, reason = False, f"the docker Python package is missing ({exc})"
        self._docker_status = (now, ok, reason)
        return ok, reason

    def vllm_status(self, snapshot: SystemSnapshot | None = None) -> tuple[bool, str | None]:
        """Whether vLLM mode can run here, and why not."""
        snap = snapshot or self.probe.snapshot()
        if not snap.has_gpu:
            return False, "no NVIDIA GPU available" + (f": {snap.nvml_hint}" if snap.nvml_hint else "")
        ok, reason = self.docker_status()
        if not ok:
            return False, f"Docker is not available: {reason}"
        return True, None

    def recommend(self, model: str | None = None, device_key: str | None = None,
                  snapshot: SystemSnapshot | None = None) -> Recommendation:
        """The guide's table for the device; with ``model``, lowered until that model's estimate fits."""
        snap = snapshot or self.devices()
        docker_ok, docker_reason = self.docker_status() if snap.has_gpu else (False, None)
        fit = None
        if model is not None:
            cached = self.resolve(model)

            def fit(profile: Profile, free_bytes: int) -> tuple[Profile, tuple[str, ...]] | None:
                return self._fit_profile(cached, profile, free_bytes)

        return recommend(
            snap,
            bands=self.settings.bands,
            green_min_bytes=self.settings.green_min_bytes,
            yellow_min_bytes=self.settings.yellow_min_bytes,
            cpu_half_precision=self.settings.cpu_half_precision,
            docker_available=docker_ok,
            docker_reason=docker_reason,
            device_key=device_key,
            fit=fit,
        )

    def _fit_profile(self, model: CachedModel, profile: Profile,
                     free_bytes: int) -> tuple[Profile, tuple[str, ...]] | None:
        """Lower context, then quantise, until the estimate fits ``free_bytes``."""
        from . import estimate as est

        if est.estimate(model, profile, self.settings).total_bytes <= free_bytes:
            return profile, ()
        ladder = [profile.precision]
        # vLLM quantises only to bitsandbytes nf4 while loading; Transformers can also do int8
        steps_down = (Precision.NF4,) if profile.mode is Mode.VLLM else (Precision.INT8, Precision.NF4)
        for p in steps_down:
            if p not in ladder and _bits(p) < _bits(profile.precision):
                ladder.append(p)
        for precision in ladder:
            candidate = profile.with_(precision=precision, double_quant=precision.is_4bit)
            ctx = est.max_context_that_fits(model, free_bytes, candidate, self.settings)
            if ctx >= min(256, profile.context_tokens):
                ctx = min(ctx, profile.context_tokens)
                notes = []
                if precision is not profile.precision:
                    notes.append(f"{profile.precision.value} does not fit: {precision.value} instead")
                if ctx < profile.context_tokens:
                    notes.append(f"context lowered to {ctx} tokens to fit {model.model_id}")
                return candidate.with_(context_tokens=ctx), tuple(notes)
        return None

    def models(self, refresh: bool = False) -> CatalogResult:
        """Cached models (HF cache + local dirs), with warnings for corrupt entries."""
        from . import catalog

        now = time.monotonic()
        cached = self._catalog
        if not refresh and cached is not None and now - cached[0] < _CATALOG_TTL_S:
            return cached[1]
        result = catalog.scan_models(self.settings)
        self._catalog = (now, result)
        return result

    def resolve(self, model: str | CachedModel) -> CachedModel:
        if isinstance(model, CachedModel):
            return model
        from . import catalog

        # The catalog scanned a moment ago answers without another cache walk (UI reruns call this often).
        mid = catalog.validate_model_id(model, self.settings)
        cached = self._catalog
        if cached is not None and time.monotonic() - cached[0] < _CATALOG_TTL_S:
            for m in cached[1].models:
                if m.model_id == mid and os.path.isdir(m.path):
                    return m
        return catalog.resolve_model(mid, self.settings)

    def estimate(self, model: str | CachedModel, profile: Profile) -> MemoryEstimate:
        from . import estimate as est

        return est.estimate(self.resolve(model), profile, self.settings)

    def max_context(self, model: str | CachedModel, profile: Profile, free_bytes: int | None = None) -> int:
        """Largest context (tokens) for ``model`` under ``profile`` that fits ``free_bytes``
        (default: free memory on the profile's target device now); 0 when even the weights don't fit."""
        from . import estimate as est

        if free_bytes is None:
            free_bytes = self._target_device(self.probe.snapshot(), profile).free_bytes or 0
        return est.max_context_that_fits(self.resolve(model), free_bytes, profile, self.settings)

    def loaded(self) -> list[LoadedModel]:
        """Transformers models in this process and managed vLLM containers, together."""
        items: list[LoadedModel] = []
        if self._tf is not None:
            items.extend(self._tf.loaded())
        containers = self.containers()
        if containers:
            snap = self.probe.snapshot()
            for c in containers:
                items.append(_container_as_loaded(c, snap))
        return items

    def containers(self) -> list[ContainerInfo]:
        """Managed containers; empty when Docker is unavailable (see :meth:`docker_status`)."""
        ok, _ = self.docker_status()
        if not ok:
            return []
        try:
            return self.vllm.list()
        except DockerUnavailableError:
            self._docker_status = None
            return []

    def history(self, limit: int | None = 50) -> list[OperationRecord]:
        """Finished operations, newest first (read back from the log: survives restarts)."""
        return self._log.read(limit)

    @property
    def log_warnings(self) -> list[str]:
        return list(self._log.warnings)

    def current_operation(self) -> dict | None:
        """What is running now (kind, description, since, latest progress), or None."""
        with self._state_lock:
            r = self._running
            if r is None:
                return None
            return {
                "op_id": r.op_id,
                "kind": r.kind,
                "description": r.description,
                "started_at": r.started_at,
                "last_event": r.last_event,
            }

    @property
    def mode(self) -> Mode | None:
        return self._mode

    # ================================================================== planning
    def _target_device(self, snap: SystemSnapshot, profile: Profile) -> DeviceSnapshot:
        if profile.device == "cpu" or not snap.gpus:
            return snap.host
        ids = profile.gpu_ids
        if ids:
            dev = snap.device(f"gpu:{ids[0]}")
            if dev is not None:
                return dev
        readable = [g for g in snap.gpus if g.free_bytes is not None]
        return max(readable, key=lambda g: g.free_bytes or 0) if readable else snap.host

    def _normalise_profile(self, mode: Mode, profile: Profile, snap: SystemSnapshot) -> Profile:
        changes: dict[str, Any] = {}
        if profile.mode is not mode:
            changes["mode"] = mode
        if mode is Mode.VLLM and profile.device != "cuda":
            changes["device"] = "cuda"
        if mode is Mode.TRANSFORMERS and profile.device == "cuda" and not snap.has_gpu:
            changes["device"] = "cpu"
        return profile.with_(**changes) if changes else profile

    def plan(self, mode: Mode | str, model: str | CachedModel, profile: Profile | None = None) -> Plan:
        """A dry run: steps, what will be unloaded and freed, what is needed, whether it fits.

        Without ``profile`` the recommendation for the model is used, sized for the memory that will
        be free once the current models are unloaded (or the active profile, when it is this model).
        In vLLM mode "needed" is what vLLM will claim (gpu_memory_utilization × total), not the bare
        estimate. Raises InvalidModelIdError / ModelNotFoundError for a bad model id.
        """
        mode = Mode(mode)
        cached = self.resolve(model)
        snap = self.devices()
        loaded_now = self._loaded_quick()
        active = self._active
        if profile is None:
            if active is not None and active[0] == cached.model_id and active[1].mode is mode:
                profile = active[1]
            else:
                after = _with_freed(snap, loaded_now)
                profile = self.recommend(cached.model_id, snapshot=after).profile.with_(mode=mode)
                if mode is Mode.VLLM and profile.precision in (Precision.INT8, Precision.FP4):
                    profile = profile.with_(precision=Precision.NF4)  # the quantisation vLLM can do
        profile = self._normalise_profile(mode, profile, snap)
        blockers: list[str] = []
        if mode is Mode.VLLM:
            ok, reason = self.vllm_status(snap)
            if not ok:
                blockers.append(f"vLLM is unavailable: {reason}")
            if profile.precision in (Precision.INT8, Precision.FP4):
                blockers.append(
                    f"vLLM cannot serve {profile.precision.value}: it quantises only to bitsandbytes nf4 while "
                    "loading; choose fp16, bf16 or nf4, or Transformers mode"
                )
        target = self._target_device(snap, profile)
        estimate = self.estimate(cached, profile)
        from . import estimate as est

        max_positions = est.read_model_spec(cached.path).max_position_embeddings
        if max_positions and profile.context_tokens > max_positions:
            blockers.append(
                f"context {profile.context_tokens} exceeds the model's maximum {max_positions} tokens: "
                f"choose {max_positions} or less"
            )
        already = (
            active is not None
            and active[0] == cached.model_id
            and active[1] == profile
            and any(lm.model_id == cached.model_id for lm in loaded_now)
        )
        to_unload = tuple(loaded_now) if not already else ()
        freed_here = sum(
            (lm.footprint_bytes or 0) for lm in to_unload if _same_device(lm, target)
        )
        free_now = target.free_bytes
        free_after = None if free_now is None else free_now + freed_here
        needed = estimate.total_bytes
        fits = free_after is not None and needed <= free_after
        if mode is Mode.VLLM and not blockers:
            needed, fits, vllm_blocker = self._vllm_claim(cached, profile, needed, _with_freed(snap, to_unload))
            if vllm_blocker:
                blockers.append(vllm_blocker)
        suggestion, max_ctx = None, None
        if not fits and free_after is not None:
            max_ctx = est.max_context_that_fits(cached, free_after, profile, self.settings)
            adjusted = self._fit_profile(cached, profile, free_after)
            if adjusted is not None:
                p2, notes = adjusted
                suggestion = (
                    f"would fit with {p2.precision.value}, context {p2.context_tokens} tokens"
                    + (f" ({'; '.join(notes)})" if notes else "")
                )
            else:
                suggestion = "does not fit at any context or quantisation on this device: choose a smaller model"
        return Plan(
            mode=mode,
            model_id=cached.model_id,
            profile=profile,
            device_key=target.key,
            steps=APPLY_STEPS if not already else (),
            to_unload=to_unload,
            expected_freed_bytes=freed_here,
            needed_bytes=needed,
            free_bytes_now=free_now,
            free_bytes_after_unload=free_after,
            fits=fits,
            already_active=already,
            estimate=estimate,
            suggestion=suggestion,
            max_context_that_fits=max_ctx,
            blockers=tuple(blockers),
        )

    def _vllm_claim(self, cached: CachedModel, profile: Profile, needed_bytes: int,
                    snap_after: SystemSnapshot) -> tuple[int, bool, str | None]:
        """What vLLM will claim on the target GPU (bytes), whether that fits, and a blocker if it can't run.

        Uses the backend's own start plan (no Docker call), on a snapshot where the memory of what
        will be unloaded already counts as free.
        """
        gpus = [g for g in snap_after.gpus if not profile.gpu_ids or g.index in profile.gpu_ids]
        try:
            vplan = self.vllm.plan_start(cached, profile, needed_bytes, gpus)
        except InsufficientMemoryError as exc:
            return exc.needed_bytes or needed_bytes, False, None
        except MemctlError as exc:
            return needed_bytes, False, exc.message
        target = self._target_device(snap_after, profile)
        return int(vplan.gpu_util * (target.total_bytes or 0)) or needed_bytes, True, None

    def _loaded_quick(self) -> list[LoadedModel]:
        try:
            return self.loaded()
        except MemctlError:
            return list(self._tf.loaded()) if self._tf is not None else []

    # ================================================================== operation slot
    @contextmanager
    def _operation(self, kind: str, description: str, params: dict) -> Iterator[OperationRecord]:
        if not self._op_lock.acquire(blocking=False):
            r = self._running
            since = time.strftime("%H:%M:%S", time.localtime(r.started_at)) if r else "?"
            running = f"{r.kind} ({r.description})" if r else "another operation"
            elapsed = f"{time.time() - r.started_at:.0f} s" if r else "?"
            raise OperationBusyError(
                f"{running} is running since {since} ({elapsed} ago); {kind} was not started",
                "wait for it to finish, or use 🚨 emergency clear to stop it",
            )
        record = OperationRecord(
            op_id=uuid.uuid4().hex[:12], kind=kind, params=params, started_at=time.time()
        )
        with self._state_lock:
            if self._emergency_running:
                self._op_lock.release()
                raise OperationBusyError(
                    f"an emergency clear is running; {kind} was not started",
                    "wait a few seconds for it to finish",
                )
            self._running = _Running(record.op_id, kind, description, record.started_at)
            # A fresh flag per operation: workers of an abandoned operation keep theirs (still set),
            # so a later operation can never un-cancel them.
            self._cancel = threading.Event()
        try:
            record.memory_before = self._used_by_device()
            yield record
            if record.outcome is None:
                record.outcome = (
                    Outcome.WARNING if any(s.outcome is Outcome.WARNING for s in record.steps) else Outcome.SUCCESS
                )
        except BaseException as exc:
            record.outcome = Outcome.ERROR
            record.error = str(exc)
            raise
        finally:
            record.ended_at = time.time()
            try:
                record.memory_after = self._used_by_device()
            except Exception:  # noqa: BLE001 - never lose the log line for a probe glitch
                pass
            self._write_log(record)
            with self._state_lock:
                self._running = None
            self._op_lock.release()

    def _write_log(self, record: OperationRecord) -> None:
        try:
            self._log.append(record)
        except OSError as exc:
            self._log.warnings.append(f"could not write the operation log at {self._log.path}: {exc}")

    def _used_by_device(self) -> dict[str, int | None]:
        snap = self.probe.snapshot()
        return {d.key: d.used_bytes for d in snap.devices}

    def _emit(self, progress: ProgressCallback | None, event: ProgressEvent) -> None:
        with self._state_lock:
            if self._running is not None:
                self._running.last_event = event
        if progress is None:
            return
        try:
            progress(event)
        except Exception:  # noqa: BLE001 - a broken callback must not break the operation
            pass

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise OperationCancelledError(
                "the operation was stopped by an emergency clear", "start it again when ready"
            )

    def _await(
        self,
        fn: Callable[[ProgressCallback], Any],
        *,
        what: str,
        deadline_s: float,
        progress: ProgressCallback | None,
        on_late_result: Callable[[Any], None] | None = None,
        cancellable: bool = True,
    ) -> Any:
        """Run ``fn(progress_to_queue)`` on a worker; wait with a deadline, watching for cancel.

        If we stop waiting (cancel or deadline) and the worker later returns a result,
        ``on_late_result(result)`` cleans it up on the worker thread.
        """
        events: queue.Queue[ProgressEvent] = queue.Queue()
        done = threading.Event()
        box: dict[str, Any] = {}
        abandoned = threading.Event()
        lock = threading.Lock()

        def runner() -> None:
            try:
                result = fn(events.put)
                with lock:
                    box["result"] = result
                    late = abandoned.is_set()
                if late and on_late_result is not None:
                    try:
                        on_late_result(result)
                    except Exception:  # noqa: BLE001
                        pass
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = exc
            finally:
                done.set()

        cancel = self._cancel  # this operation's flag
        worker = threading.Thread(target=runner, name=f"memctl-{what}", daemon=True)
        worker.start()
        end = time.monotonic() + deadline_s
        while True:
            finished = done.wait(0.05)
            while True:
                try:
                    self._emit(progress, events.get_nowait())
                except queue.Empty:
                    break
            if finished:
                break
            cancelled = cancellable and cancel.is_set()
            if cancelled or time.monotonic() > end:
                with lock:
                    finished_now = done.is_set()
                    if not finished_now:
                        abandoned.set()
                if finished_now:
                    break
                if cancelled:
                    raise OperationCancelledError(
                        f"{what} was stopped by an emergency clear",
                        "its result is discarded when it returns",
                    )
                raise OperationTimeoutError(
                    f"{what} did not finish within {deadline_s:.0f} s",
                    "it is abandoned and cleaned up when it returns; check the logs, or raise the deadline "
                    "(operation_timeout_s / step_timeout_s)",
                )
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # ================================================================== apply
    def apply(
        self,
        mode: Mode | str | Plan,
        model: str | CachedModel | None = None,
        profile: Profile | None = None,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> OperationRecord:
        """Switch to ``model`` in ``mode``: the guide's steps, each reported and recorded.

        Steps: unload → clear → check → switch → prepare → verify. Refuses (InsufficientMemoryError,
        with the numbers) when the estimate does not fit, unless ``force``. When prepare or verify
        fails, the partial model/container is removed, memory is measured back, and the previous
        model is restored when ``settings.restore_previous_on_failure`` and it fits. Raises the
        project error that stopped it (the record is in the log and on ``error.operation``).
        """
        if isinstance(mode, Plan):
            plan_in = mode
            mode, model, profile = plan_in.mode, plan_in.model_id, plan_in.profile
        if model is None:
            raise ModelLoadError("no model chosen", "choose a model from the cached models")
        mode = Mode(mode)
        cached = self.resolve(model)
        params = {"mode": mode.value, "model": cached.model_id, "force": force}
        with self._operation("apply", f"{mode.value} → {cached.model_id}", params) as record:
            try:
                return self._apply(record, mode, cached, profile, force, progress)
            except MemctlError as exc:
                exc.operation = record  # type: ignore[attr-defined]
                raise

    def _step(self, record: OperationRecord, name: str, progress: ProgressCallback | None,
              device_key: str | None) -> _StepTimer:
        return _StepTimer(self, record, name, progress, device_key)

    def _apply(self, record: OperationRecord, mode: Mode, cached: CachedModel, profile: Profile | None,
               force: bool, progress: ProgressCallback | None) -> OperationRecord:
        plan = self.plan(mode, cached, profile)
        profile = plan.profile
        record.params.update({"profile": to_jsonable(profile), "device": plan.device_key,
                              "needed_bytes": plan.needed_bytes})
        if plan.already_active:
            record.steps.append(StepRecord("noop", Outcome.SUCCESS, 0.0,
                                           f"{cached.model_id} is already active with this profile: nothing to do"))
            self._emit(progress, ProgressEvent("noop", f"{cached.model_id} is already active with this profile"))
            return record
        if plan.blockers:
            if plan.blockers[0].startswith("vLLM is unavailable"):
                raise DockerUnavailableError(plan.blockers[0],
                                             "use Transformers mode, or start Docker / check the GPU driver")
            raise ModelLoadError(plan.blockers[0], "change the profile and apply again")
        if not plan.fits and not force:
            raise self._not_fit_error(plan)

        previous = [(lm.model_id, lm.profile) for lm in plan.to_unload if lm.profile is not None]
        prev_mode = self._mode
        prepare_started = False
        try:
            # (1) unload current models and stop managed containers
            with self._step(record, "unload", progress, plan.device_key) as st:
                st.message, unloaded_tf = self._unload_everything(progress)
            self._check_cancel()
            # (2) clear GPU memory
            with self._step(record, "clear", progress, plan.device_key) as st:
                if unloaded_tf:
                    # each Transformers unload already ran gc, empty_cache, ipc_collect and malloc_trim
                    st.message = "caches were cleared by each unload in step 1"
                else:
                    actions = self._clear_caches()
                    st.message = ", ".join(k for k, v in actions.items() if v) or "nothing to clear"
            self._check_cancel()
            # (3) check resources on a fresh snapshot
            with self._step(record, "check", progress, plan.device_key) as st:
                snap = self.probe.snapshot()
                target = self._target_device(snap, profile)
                free = target.free_bytes
                st.message = f"needs {fmt_bytes(plan.needed_bytes)}, {fmt_bytes(free)} free on {target.key}"
                if free is not None and plan.needed_bytes > free:
                    if not force:
                        err = self._not_fit_error(plan, free_override=free)
                        st.fail(str(err))
                        raise err
                    st.warn(st.message + " (forced)")
            self._check_cancel()
            # (4) switch mode
            with self._step(record, "switch", progress, plan.device_key) as st:
                self._mode = mode
                self._active = None
                st.message = f"mode: {prev_mode.value if prev_mode else '—'} → {mode.value}"
            # (5) prepare the new model, (6) verify it answers
            prepare_started = True
            with self._step(record, "prepare", progress, plan.device_key) as st:
                st.message = self._prepare(mode, cached, profile, plan, progress)
            self._check_cancel()
            with self._step(record, "verify", progress, plan.device_key) as st:
                st.message = self._verify(mode, cached, profile)
        except BaseException as exc:
            with self._step(record, "rollback", None, plan.device_key) as st:
                st.message = self._cleanup_after_failure(mode, cached) if prepare_started else "nothing new was loaded"
                cancelled = self._cancel.is_set() or isinstance(exc, OperationCancelledError)
                # after a timeout the worker still runs and holds the backend: restoring would wait on it
                timed_out = isinstance(exc, OperationTimeoutError)
                still_loaded = self._loaded_quick()
                if not cancelled and not timed_out and previous and not still_loaded:
                    restored = self._restore(previous, prev_mode, record, progress)
                    st.message += f"; restored {restored}" if restored else "; the previous model was not restored"
                    still_loaded = self._loaded_quick()
                if still_loaded:
                    self._mode = prev_mode
                else:
                    self._mode, self._active = None, None
                st.warn(st.message)
            if isinstance(exc, MemctlError):
                raise
            if not isinstance(exc, Exception):
                raise
            failed = record.steps[-2].name if len(record.steps) >= 2 else "apply"
            raise ModelLoadError(f"{cached.model_id}: step {failed!r} failed: {exc}",
                                 "see the details; clear memory or try a smaller profile",
                                 details=repr(exc)) from exc
        self._active = (cached.model_id, profile)
        return record

    def _not_fit_error(self, plan: Plan, free_override: int | None = None) -> InsufficientMemoryError:
        free = free_override if free_override is not None else plan.free_bytes_after_unload
        return InsufficientMemoryError(
            f"{plan.model_id} needs {fmt_bytes(plan.needed_bytes)} on {plan.device_key} "
            f"({plan.profile.precision.value}, context {plan.profile.context_tokens}, batch {plan.profile.batch}), "
            f"but only {fmt_bytes(free)} would be free",
            (plan.suggestion + "; " if plan.suggestion else "")
            + "or clear memory, pick a lighter model, or force it at your own risk",
            needed_bytes=plan.needed_bytes,
            free_bytes=free,
        )

    def _unload_everything(self, progress: ProgressCallback | None) -> tuple[str, bool]:
        """Unload every Transformers model and stop every managed container.

        Returns the step's message and whether a Transformers model was unloaded (its unload
        already cleared the caches, so the next step need not repeat it)."""
        parts: list[str] = []
        unloaded_tf = False
        if self._tf is not None and self._tf.loaded():
            unloaded_tf = True
            reports: list[UnloadReport] = self._await(
                lambda _p: self.transformers.unload_all(), what="unload", deadline_s=self.settings.step_timeout_s,
                progress=progress,
            )
            parts += [f"{r.model_id}: freed {fmt_bytes(r.freed_bytes)}" for r in reports]
        ok, _reason = self.docker_status()
        if ok and self.containers():
            results = self._await(lambda _p: self.vllm.stop_all_managed(), what="stop containers",
                                  deadline_s=self.settings.vllm_stop_timeout_s * 4 + 30, progress=progress)
            failed = [f"{n}: {m}" for n, good, m in results if not good]
            if failed:
                raise ContainerError("could not stop managed containers: " + "; ".join(failed),
                                     "use 🚨 emergency clear, or check Docker")
            parts += [f"stopped {n}" for n, _g, _m in results]
        return "; ".join(parts) or "nothing was loaded", unloaded_tf

    def _clear_caches(self) -> dict[str, Any]:
        if self._tf is not None:
            return dict(self._tf.clear_caches())
        return {"gc_collect": gc.collect() >= 0}

    def _prepare(self, mode: Mode, cached: CachedModel, profile: Profile, plan: Plan,
                 progress: ProgressCallback | None) -> str:
        if mode is Mode.TRANSFORMERS:
            tf = self.transformers

            def late(lm: LoadedModel) -> None:
                tf.unload(lm.model_id)

            lm: LoadedModel = self._await(
                lambda p: tf.load(cached, profile, progress=p, cancel=self._cancel.is_set),
                what=f"loading {cached.model_id}", deadline_s=self.settings.operation_timeout_s,
                progress=progress, on_late_result=late,
            )
            return f"loaded on {lm.device}, {fmt_bytes(lm.footprint_bytes)}"
        snap = self.probe.snapshot()
        gpus = [g for g in snap.gpus if not profile.gpu_ids or g.index in profile.gpu_ids]
        vb = self.vllm

        def late_c(info: ContainerInfo) -> None:
            vb.stop(info.name)

        info: ContainerInfo = self._await(
            lambda p: vb.start(cached, profile, plan.needed_bytes, gpus, progress=p, cancel=self._cancel.is_set),
            what=f"starting vLLM for {cached.model_id}",
            deadline_s=self.settings.vllm_ready_timeout_s + 60, progress=progress, on_late_result=late_c,
        )
        return f"container {info.name} ready on 127.0.0.1:{info.port}"

    def _verify(self, mode: Mode, cached: CachedModel, profile: Profile) -> str:
        if mode is Mode.TRANSFORMERS:
            text = self._await(
                lambda _p: self.transformers.generate(
                    cached.model_id, "def hello():", max_new_tokens=self.settings.transformers_verify_tokens),
                what="verify (generate)", deadline_s=self.settings.step_timeout_s, progress=None,
            )
            return f"the model answered ({len(text)} characters of text)"
        from backends.vllm_docker import container_name_for

        name = container_name_for(cached.model_id)
        if not self.vllm.verify(name):
            raise ContainerError(f"{name} does not list {cached.model_id} at /v1/models",
                                 "check the container logs")
        return "/v1/models lists the model"

    def _cleanup_after_failure(self, mode: Mode, cached: CachedModel) -> str:
        parts = []
        if self._tf is not None and self._tf.is_loaded(cached.model_id):
            tf = self._tf
            try:
                rep = self._await(lambda _p: tf.unload(cached.model_id), what=f"unloading {cached.model_id}",
                                  deadline_s=self.settings.step_timeout_s, progress=None, cancellable=False)
                parts.append(f"unloaded {cached.model_id} (freed {fmt_bytes(rep.freed_bytes)})")
            except MemctlError as exc:
                parts.append(f"could not unload {cached.model_id}: {exc.message}")
        if mode is Mode.VLLM:
            try:
                from backends.vllm_docker import container_name_for

                name = container_name_for(cached.model_id)
                if any(c.name == name for c in self.containers()):
                    self.vllm.stop(name)
                    parts.append(f"removed {name}")
            except MemctlError as exc:
                parts.append(f"could not remove the container: {exc}")
        self._clear_caches()
        self._active = None
        return "; ".join(parts) or "nothing was left loaded"

    def _restore(self, previous: list[tuple[str, Profile | None]], prev_mode: Mode | None,
                 record: OperationRecord, progress: ProgressCallback | None) -> str | None:
        """Bring the previous model back when the setting asks and it fits. Never raises."""
        if not self.settings.restore_previous_on_failure or not previous:
            return None
        model_id, prof = previous[0]
        if prof is None:
            return None
        try:
            cached = self.resolve(model_id)
            plan = self.plan(prof.mode, cached, prof)
            if not plan.fits or plan.blockers:
                return None
            self._emit(progress, ProgressEvent("restore", f"restoring {model_id}"))
            self._prepare(prof.mode, cached, prof, plan, progress)
            self._mode = prev_mode
            self._active = (cached.model_id, prof)
            return model_id
        except BaseException as exc:  # noqa: BLE001 - restoring is best effort, reported in the log
            record.steps.append(StepRecord("restore", Outcome.WARNING, 0.0, f"could not restore {model_id}: {exc}"))
            return None

    # ================================================================== unload / stop / clear
    def unload(self, model: str) -> UnloadReport:
        """Unload one Transformers model and measure what came back. Raises ModelNotFoundError if not loaded."""
        with self._operation("unload", model, {"model": model}) as record:
            if self._tf is None or not self._tf.is_loaded(model):
                from .errors import ModelNotFoundError

                raise ModelNotFoundError(f"{model} is not loaded", "see the list of loaded models")
            t0 = time.perf_counter()
            report: UnloadReport = self._await(lambda _p: self.transformers.unload(model), what="unload",
                                               deadline_s=self.settings.step_timeout_s, progress=None)
            record.steps.append(StepRecord("unload", report.verdict, time.perf_counter() - t0, report.message,
                                           None, None))
            if self._active and self._active[0] == model:
                self._active = None
            return report

    def stop_container(self, name: str) -> None:
        """Stop and remove one managed container (never one without our label)."""
        with self._operation("stop_container", name, {"name": name}) as record:
            t0 = time.perf_counter()
            self._await(lambda _p: self.vllm.stop(name), what=f"stopping {name}",
                        deadline_s=self.settings.vllm_stop_timeout_s + 30, progress=None)
            record.steps.append(StepRecord("stop", Outcome.SUCCESS, time.perf_counter() - t0, f"stopped {name}"))
            if self._active and self._mode is Mode.VLLM:
                self._active = None

    def clear_memory(self) -> ClearReport:
        """gc, empty_cache, ipc_collect, malloc_trim; before/after used bytes per device."""
        with self._operation("clear_memory", "clear caches", {}) as record:
            before = self._used_by_device()
            t0 = time.perf_counter()
            actions = self._clear_caches()
            after = self._used_by_device()
            report = ClearReport(before=before, after=after, actions=actions)
            freed = {k: v for k, v in report.freed.items() if v}
            record.steps.append(StepRecord(
                "clear", Outcome.SUCCESS, time.perf_counter() - t0,
                ", ".join(f"{k}: {fmt_bytes(v)}" for k, v in freed.items()) or "no change in used memory",
            ))
            return report

    def emergency_clear(self) -> EmergencyReport:
        """Unload every model, stop every managed container, clear caches, go idle.

        Works while another operation runs: that one is told to stop at its next checkpoint.
        Every step is attempted even when an earlier one fails; each outcome is reported.
        """
        with self._state_lock:
            if self._emergency_running:
                raise OperationBusyError("an emergency clear is already running", "wait for it to finish")
            self._emergency_running = True
            self._cancel.set()  # the running operation's flag (stays set for its abandoned workers)
        try:
            return self._emergency_clear()
        finally:
            with self._state_lock:
                self._emergency_running = False

    def _emergency_clear(self) -> EmergencyReport:
        running = self.current_operation()
        steps: list[StepRecord] = []
        record = OperationRecord(op_id=uuid.uuid4().hex[:12], kind="emergency_clear",
                                 params={"cancelled": running["kind"] if running else None},
                                 started_at=time.time())
        try:
            record.memory_before = self._used_by_device()
        except Exception:  # noqa: BLE001
            pass

        def attempt(name: str, fn: Callable[[], str], deadline_s: float) -> None:
            t0 = time.perf_counter()
            try:
                msg = _run_with_deadline(fn, deadline_s, name)
                steps.append(StepRecord(name, Outcome.SUCCESS, time.perf_counter() - t0, msg))
            except BaseException as exc:  # noqa: BLE001 - the next step must run anyway
                steps.append(StepRecord(name, Outcome.ERROR, time.perf_counter() - t0, str(exc)))

        def unload_all() -> str:
            if self._tf is None:
                return "no Transformers model loaded"
            # Only what is loaded now: if this step outlives its deadline, its thread must not unload a
            # model that a later operation loads.
            reports = [self._tf.unload(lm.model_id) for lm in self._tf.loaded()]
            return "; ".join(f"{r.model_id}: freed {fmt_bytes(r.freed_bytes)}" for r in reports) or "none loaded"

        def stop_all() -> str:
            ok, reason = self.docker_status(refresh=True)
            if not ok:
                raise DockerUnavailableError(f"Docker is not available: {reason}",
                                             "check the Docker service by hand")
            results = self.vllm.stop_all_managed()
            failed = [f"{n}: {m}" for n, good, m in results if not good]
            if failed:
                raise ContainerError("; ".join(failed), "check Docker by hand")
            return "; ".join(f"stopped {n}" for n, _g, _m in results) or "no managed containers"

        def wait_running() -> str:
            if running is None:
                return "nothing was running"
            end = time.monotonic() + 30
            while self._running is not None and time.monotonic() < end:
                time.sleep(0.05)
            if self._running is not None:
                raise MemctlError(f"{running['kind']} is still finishing", "its result is discarded when it returns")
            return f"{running['kind']} stopped"

        attempt("cancel", wait_running, 35)
        attempt("unload_transformers", unload_all, self.settings.step_timeout_s)
        docker_ok, docker_reason = self.docker_status(refresh=True)
        if docker_ok or self.probe.snapshot().has_gpu:
            attempt("stop_containers", stop_all, self.settings.vllm_stop_timeout_s * 4 + 30)
        else:
            steps.append(StepRecord("stop_containers", Outcome.SUCCESS, 0.0,
                                    f"no GPU and Docker unavailable ({docker_reason}): no vLLM container can run"))
        attempt("clear", lambda: ", ".join(k for k, v in self._clear_caches().items() if v), self.settings.step_timeout_s)
        self._mode = None
        self._active = None
        record.steps = steps
        record.ended_at = time.time()
        try:
            record.memory_after = self._used_by_device()
        except Exception:  # noqa: BLE001
            pass
        errors = [s for s in steps if s.outcome is Outcome.ERROR]
        record.outcome = Outcome.WARNING if errors else Outcome.SUCCESS
        record.error = "; ".join(f"{s.name}: {s.message}" for s in errors) or None
        self._write_log(record)
        return EmergencyReport(steps=steps, outcome=record.outcome,
                               cancelled_operation=running["kind"] if running else None)

    # ================================================================== status for the CLI
    def status(self) -> dict:
        """Devices, the recommendation, and why there is no GPU / vLLM, as JSON-ready data."""
        snap = self.devices()
        rec = self.recommend(snapshot=snap)
        vllm_ok, vllm_reason = self.vllm_status(snap)
        return {
            "devices": [dict(to_jsonable(d), key=d.key, level=self.level(d).value) for d in snap.devices],
            "nvml": {"status": snap.nvml_status.value, "hint": snap.nvml_hint, "driver_version": snap.driver_version},
            "gpu_available": snap.has_gpu,
            "no_gpu_reason": None if snap.has_gpu else snap.nvml_hint,
            "vllm": {"available": vllm_ok, "reason": vllm_reason},
            "recommendation": to_jsonable(rec),
        }


class _StepTimer:
    """Times one apply step, records memory before/after on the target device, reports progress."""

    def __init__(self, ctl: MemoryController, record: OperationRecord, name: str,
                 progress: ProgressCallback | None, device_key: str | None):
        self.ctl, self.record, self.name, self.progress, self.device_key = ctl, record, name, progress, device_key
        self.message = ""
        self.outcome = Outcome.SUCCESS
        self._failed = False

    def _used(self) -> int | None:
        if self.device_key is None:
            return None
        snap = self.ctl.probe.snapshot()
        dev = snap.device(self.device_key)
        return dev.used_bytes if dev else None

    def warn(self, message: str) -> None:
        self.outcome = Outcome.WARNING
        self.message = message

    def fail(self, message: str) -> None:
        self.outcome = Outcome.ERROR
        self.message = message
        self._failed = True

    def __enter__(self) -> _StepTimer:
        self.t0 = time.perf_counter()
        self.before = self._used()
        self.ctl._emit(self.progress, ProgressEvent(self.name, f"{self.name}…", 0.0))
        if self.ctl.step_hook is not None:
            try:
                self.ctl.step_hook(self.name)
            except BaseException as exc:
                self.__exit__(type(exc), exc, None)
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not self._failed:
            self.outcome = Outcome.ERROR
            self.message = str(exc)
        after = self._used()
        dur = time.perf_counter() - self.t0
        self.record.steps.append(StepRecord(self.name, self.outcome, dur, self.message, self.before, after))
        self.ctl._emit(self.progress, ProgressEvent(self.name, self.message or self.name, 1.0, dur))


def _run_with_deadline(fn: Callable[[], Any], deadline_s: float, what: str) -> Any:
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=runner, name=f"memctl-emergency-{what}", daemon=True)
    t.start()
    t.join(deadline_s)
    if t.is_alive():
        raise MemctlError(f"{what} did not finish within {deadline_s:.0f} s", "it goes on in the background")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _with_freed(snap: SystemSnapshot, unloading: Sequence[LoadedModel]) -> SystemSnapshot:
    """``snap`` as it will look once ``unloading`` is gone: their footprints count as free."""
    gpus = []
    for g in snap.gpus:
        extra = sum(lm.footprint_bytes or 0 for lm in unloading if _same_device(lm, g))
        gpus.append(g if not extra or g.free_bytes is None else dataclasses.replace(
            g, free_bytes=g.free_bytes + extra, used_bytes=max(0, (g.used_bytes or 0) - extra)))
    host = snap.host
    extra = sum(lm.footprint_bytes or 0 for lm in unloading if _same_device(lm, host))
    if extra and host.free_bytes is not None:
        host = dataclasses.replace(host, free_bytes=host.free_bytes + extra)
    return dataclasses.replace(snap, gpus=tuple(gpus), host=host)


def _bits(p: Precision) -> int:
    return {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4, "fp4": 4}[p.value]


def _same_device(lm: LoadedModel, target: DeviceSnapshot) -> bool:
    if target.kind is DeviceKind.HOST:
        return lm.device == "cpu"
    return str(target.index) in lm.device.replace("cuda:", "").split(",")


def _container_as_loaded(c: ContainerInfo, snap: SystemSnapshot) -> LoadedModel:
    """A managed container as a loaded model; its footprint is what vLLM claims on its GPUs."""
    prof = None
    if c.profile:
        try:
            prof = Profile(
                mode=Mode(c.profile.get("mode", "vllm")),
                precision=Precision(c.profile["precision"]),
                context_tokens=int(c.profile["context_tokens"]),
                batch=int(c.profile["batch"]),
                double_quant=bool(c.profile.get("double_quant", False)),
                device=c.profile.get("device", "cuda"),
                gpu_ids=tuple(c.profile["gpu_ids"]) if c.profile.get("gpu_ids") else None,
            )
        except (KeyError, ValueError, TypeError):
            prof = None
    ids = list(prof.gpu_ids) if prof and prof.gpu_ids else [g.index for g in snap.gpus]
    totals = [g.total_bytes for g in snap.gpus if g.index in ids and g.total_bytes]
    footprint = int(c.gpu_memory_utilization * sum(totals)) if c.gpu_memory_utilization and totals else None
    return LoadedModel(
        model_id=c.model_id or c.name,
        backend="vllm",
        device="cuda:" + ",".join(str(i) for i in ids) if ids else "cuda",
        footprint_bytes=footprint,
        profile=prof,
        loaded_at=c.started_at or 0.0,
        name=c.name,
        state=c.state,
        port=c.port,
        health=c.health,
    )


# ---------------------------------------------------------------------------- the process-wide instance
_shared: MemoryController | None = None
_shared_lock = threading.Lock()


def shared_controller() -> MemoryController:
    """The one controller of this process, created from the environment on first use.

    The dashboard keeps it here rather than only in ``st.cache_resource``: Streamlit's "Clear cache"
    would otherwise build a second controller and lose track of models the first one loaded.
    Raises SettingsError on invalid settings (nothing is kept then).
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MemoryController()
        return _shared


def reset_shared_controller() -> None:
    """Forget the process-wide controller (tests and benchmarks that change the environment)."""
    global _shared
    with _shared_lock:
        _shared = None
