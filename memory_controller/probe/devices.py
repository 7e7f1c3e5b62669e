"""Device memory probe: the only module that talks to NVML (``pynvml``) and ``psutil``.

Every NVML call goes through :meth:`DeviceProbe._call`, which turns ``NVMLError`` into ``None``
plus a remembered reason, so the probe never raises: a missing library, an unloaded driver,
no devices, a lost GPU or a ``NotSupported`` field each become an explicit status with a hint.

The NVML module is passed in (tests hand in a fake with the real names) or imported by name
(``settings.nvml_module``, default ``pynvml``).
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import psutil

from memory_controller.types import (
    DeviceKind,
    DeviceSnapshot,
    DeviceStatus,
    NvmlStatus,
    ProcessMemory,
    SystemSnapshot,
)

_HINTS = {
    NvmlStatus.LIBRARY_NOT_FOUND: (
        "NVIDIA driver library (libnvidia-ml) not found: no NVIDIA GPU driver on this machine. "
        "memctl shows host memory; models run on the CPU with a backend that can (GPU-only backends cannot)."
    ),
    NvmlStatus.DRIVER_NOT_LOADED: (
        "NVIDIA driver is installed but not loaded: check `nvidia-smi`; reload the driver or reboot."
    ),
    NvmlStatus.NO_PERMISSION: (
        "No permission to query the GPU: run memctl as a user with access to /dev/nvidia*."
    ),
    NvmlStatus.NO_DEVICES: "NVML works but reports no GPUs: check `nvidia-smi` and CUDA_VISIBLE_DEVICES.",
}

HOST_TOP_PROCESSES = 5
_HOST_PROCESS_TTL_S = 5.0


def _err_name(exc: BaseException) -> str:
    return type(exc).__name__


class DeviceProbe:
    """Takes :class:`SystemSnapshot` values. Thread-safe; never raises from :meth:`snapshot`.

    Args:
        nvml: an NVML module (``pynvml`` or a fake with the same names). ``None``: import
            ``nvml_module_name`` lazily on first use.
        host_memory_budget_bytes: cap on host memory counted as free (``None``: the OS's figure).
        clock: wall-clock source (seconds), for tests.
    """

    def __init__(
        self,
        nvml: ModuleType | Any | None = None,
        *,
        nvml_module_name: str = "pynvml",
        host_memory_budget_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nvml = nvml
        self._nvml_module_name = nvml_module_name
        self._budget = host_memory_budget_bytes
        self._clock = clock
        self._lock = threading.RLock()
        self._initialised = False
        self._init_status: NvmlStatus | None = None
        self._init_hint: str | None = None
        self._driver_version: str | None = None
        self._host_procs: tuple[float, tuple[ProcessMemory, ...]] = (-1e9, ())

    # ------------------------------------------------------------------ NVML lifecycle
    def _ensure_init(self) -> bool:
        """Start NVML once; remember why it failed. True when NVML is usable."""
        if self._initialised:
            return self._init_status is NvmlStatus.OK
        self._initialised = True
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module(self._nvml_module_name)
            except ImportError as exc:
                self._init_status = NvmlStatus.LIBRARY_NOT_FOUND
                self._init_hint = (
                    f"Python module {self._nvml_module_name!r} is not installed ({exc}); "
                    "install nvidia-ml-py. " + _HINTS[NvmlStatus.LIBRARY_NOT_FOUND]
                )
                return False
        nv = self._nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            self._init_status = self._status_for_init_error(exc)
            self._init_hint = _HINTS.get(self._init_status) or f"NVML failed to start: {exc}"
            return False
        except OSError as exc:  # a broken library file
            self._init_status = NvmlStatus.LIBRARY_NOT_FOUND
            self._init_hint = f"NVML library could not be loaded ({exc}). " + _HINTS[NvmlStatus.LIBRARY_NOT_FOUND]
            return False
        self._init_status = NvmlStatus.OK
        version = self._call(nv.nvmlSystemGetDriverVersion)
        self._driver_version = version.decode() if isinstance(version, bytes) else version
        return True

    def _status_for_init_error(self, exc: BaseException) -> NvmlStatus:
        name = _err_name(exc)
        if name == "NVMLError_LibraryNotFound":
            return NvmlStatus.LIBRARY_NOT_FOUND
        if name == "NVMLError_DriverNotLoaded":
            return NvmlStatus.DRIVER_NOT_LOADED
        if name == "NVMLError_NoPermission":
            return NvmlStatus.NO_PERMISSION
        return NvmlStatus.ERROR

    def reset(self) -> None:
        """Forget the remembered NVML state so the next snapshot tries again (e.g. after a driver reload)."""
        with self._lock:
            if self._init_status is NvmlStatus.OK and self._nvml is not None:
                self._call(self._nvml.nvmlShutdown)
            self._initialised = False
            self._init_status = None
            self._init_hint = None

    def close(self) -> None:
        self.reset()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call an NVML function; any NVMLError becomes ``None`` (the caller decides what it means)."""
        try:
            return fn(*args)
        except self._nvml.NVMLError:  # type: ignore[union-attr]
            return None

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> SystemSnapshot:
        """Read every GPU and the host. Never raises."""
        with self._lock:
            now = self._clock()
            host = self._host_snapshot(now)
            if not self._ensure_init():
                return SystemSnapshot(
                    gpus=(),
                    host=host,
                    nvml_status=self._init_status or NvmlStatus.ERROR,
                    nvml_hint=self._init_hint,
                    taken_at=now,
                )
            nv = self._nvml
            try:
                count = nv.nvmlDeviceGetCount()
            except nv.NVMLError as exc:
                return SystemSnapshot(
                    gpus=(),
                    host=host,
                    nvml_status=NvmlStatus.ERROR,
                    nvml_hint=f"NVML could not count GPUs ({exc}): check `nvidia-smi`.",
                    driver_version=self._driver_version,
                    taken_at=now,
                )
            if count == 0:
                return SystemSnapshot(
                    gpus=(),
                    host=host,
                    nvml_status=NvmlStatus.NO_DEVICES,
                    nvml_hint=_HINTS[NvmlStatus.NO_DEVICES],
                    driver_version=self._driver_version,
                    taken_at=now,
                )
            gpus = tuple(self._gpu_snapshot(i, now) for i in range(count))
            return SystemSnapshot(
                gpus=gpus,
                host=host,
                nvml_status=NvmlStatus.OK,
                driver_version=self._driver_version,
                taken_at=now,
            )

    def gpu_used_bytes(self, index: int) -> int | None:
        """NVML used memory of one GPU (bytes), or ``None`` when unknown."""
        with self._lock:
            if not self._ensure_init():
                return None
            nv = self._nvml
            handle = self._call(nv.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                return None
            mem = self._call(nv.nvmlDeviceGetMemoryInfo, handle)
            return None if mem is None else int(mem.used)

    def _gpu_snapshot(self, index: int, now: float) -> DeviceSnapshot:
        nv = self._nvml
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
        except nv.NVMLError as exc:
            lost = _err_name(exc) in ("NVMLError_GpuIsLost", "NVMLError_Unknown", "NVMLError_ResetRequired")
            return DeviceSnapshot(
                kind=DeviceKind.GPU,
                index=index,
                name=f"GPU {index}",
                uuid=None,
                total_bytes=None,
                used_bytes=None,
                free_bytes=None,
                utilization_pct=None,
                status=DeviceStatus.LOST,
                hint=(
                    f"GPU {index} cannot be read ({exc})"
                    + (": it fell off the bus or needs a reset; reboot and check `nvidia-smi`." if lost else ".")
                ),
                taken_at=now,
            )
        missing: list[str] = []
        name = self._call(nv.nvmlDeviceGetName, handle)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        uuid = self._call(nv.nvmlDeviceGetUUID, handle)
        if isinstance(uuid, bytes):
            uuid = uuid.decode(errors="replace")
        util = self._call(nv.nvmlDeviceGetUtilizationRates, handle)
        if util is None:
            missing.append("utilisation")
        procs = self._gpu_processes(handle)
        if procs is None:
            missing.append("processes")
        status = DeviceStatus.PARTIAL if missing else DeviceStatus.OK
        return DeviceSnapshot(
            kind=DeviceKind.GPU,
            index=index,
            name=name or f"GPU {index}",
            uuid=uuid,
            total_bytes=int(mem.total),
            used_bytes=int(mem.used),
            free_bytes=int(mem.free),
            utilization_pct=None if util is None else float(util.gpu),
            processes=procs or (),
            status=status,
            hint=(f"this GPU or driver does not report {', '.join(missing)}" if missing else None),
            taken_at=now,
        )

    def _gpu_processes(self, handle: Any) -> tuple[ProcessMemory, ...] | None:
        nv = self._nvml
        raw = self._call(nv.nvmlDeviceGetComputeRunningProcesses, handle)
        if raw is None:
            return None
        graphics_fn = getattr(nv, "nvmlDeviceGetGraphicsRunningProcesses", None)
        graphics = (self._call(graphics_fn, handle) if graphics_fn else None) or []
        seen: dict[int, ProcessMemory] = {}
        for p in [*raw, *graphics]:
            pid = int(p.pid)
            used = getattr(p, "usedGpuMemory", None)
            if pid in seen:
                continue
            seen[pid] = ProcessMemory(pid=pid, name=_process_name(pid), used_bytes=None if used is None else int(used))
        return tuple(sorted(seen.values(), key=lambda pm: -(pm.used_bytes or 0)))

    def _host_snapshot(self, now: float) -> DeviceSnapshot:
        vm = psutil.virtual_memory()
        free = int(vm.available)
        if self._budget is not None:
            free = min(free, self._budget)
        return DeviceSnapshot(
            kind=DeviceKind.HOST,
            index=None,
            name="Host RAM",
            uuid=None,
            total_bytes=int(vm.total),
            used_bytes=int(vm.total - vm.available),
            free_bytes=free,
            # For the host, "utilisation" is the share of RAM in use (a GPU row's is NVML compute load).
            utilization_pct=float(vm.percent),
            processes=self._host_processes(now),
            status=DeviceStatus.OK,
            hint=(
                f"free memory capped by host_memory_budget_bytes={self._budget}" if self._budget is not None else None
            ),
            taken_at=now,
        )

    def _host_processes(self, now: float) -> tuple[ProcessMemory, ...]:
        """Top processes by resident memory, plus our own; cached a few seconds (walking /proc is slow)."""
        cached_at, cached = self._host_procs
        if now - cached_at < _HOST_PROCESS_TTL_S:
            return cached
        rows: list[ProcessMemory] = []
        for proc in psutil.process_iter(["pid", "name", "memory_info"]):
            info = proc.info
            mem = info.get("memory_info")
            if mem is None:
                continue
            rows.append(ProcessMemory(pid=info["pid"], name=info.get("name"), used_bytes=int(mem.rss)))
        rows.sort(key=lambda r: -(r.used_bytes or 0))
        top = rows[:HOST_TOP_PROCESSES]
        me = os.getpid()
        if all(r.pid != me for r in top):
            top += [r for r in rows if r.pid == me]
        result = tuple(top)
        self._host_procs = (now, result)
        return result


def _process_name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None
