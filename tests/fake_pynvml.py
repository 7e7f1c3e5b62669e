"""A fake ``pynvml`` with the real function, constant and error names, for a machine with no GPU.

Two ways in:
- in-process: ``FakeNvml(gpus=[FakeGpu(...)]).module()`` returns a module object to pass to
  ``DeviceProbe(nvml=...)``;
- by name (subprocesses, AppTest, the browser test): set ``MEMCTL_NVML_MODULE=tests.fake_pynvml``
  and ``MEMCTL_FAKE_NVML`` to a scenario name (``one_gpu``, ``two_gpus``, ``library_missing``...) or a
  JSON document ``{"gpus": [{"total_gib": 24, "used_gib": 2}], "init_error": null}``; this module's
  own top-level functions then act as that scenario.
"""

from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass, field

GIB = 1024**3

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {
            NVML_ERROR_NOT_SUPPORTED: "Not Supported",
            NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
            NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
            NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
            NVML_ERROR_GPU_IS_LOST: "GPU is lost",
            NVML_ERROR_UNINITIALIZED: "Uninitialized",
        }.get(self.value, f"NVML Error with code {self.value}")


def _sub(name: str, code: int) -> type[NVMLError]:
    def __init__(self, *args):  # the real subclasses take no argument
        NVMLError.__init__(self, code)

    return type(name, (NVMLError,), {"__init__": __init__})


NVMLError_Uninitialized = _sub("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_NotSupported = _sub("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _sub("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_DriverNotLoaded = _sub("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _sub("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _sub("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _sub("NVMLError_Unknown", NVML_ERROR_UNKNOWN)

_ERRORS = {
    "LibraryNotFound": NVMLError_LibraryNotFound,
    "DriverNotLoaded": NVMLError_DriverNotLoaded,
    "NoPermission": NVMLError_NoPermission,
    "Unknown": NVMLError_Unknown,
}


@dataclass
class FakeProcess:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 - the real attribute name


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 4090"
    total_bytes: int = 24 * GIB
    used_bytes: int = 2 * GIB
    utilization_pct: int = 7
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    processes: list[FakeProcess] = field(default_factory=list)
    lost: bool = False
    processes_not_supported: bool = False
    utilization_not_supported: bool = False


class _Memory:
    def __init__(self, total: int, used: int):
        self.total = total
        self.used = used
        self.free = total - used


class _Util:
    def __init__(self, gpu: int):
        self.gpu = gpu
        self.memory = 0


class FakeNvml:
    """A scenario. ``calls`` counts calls per function name (to check NVML is started once)."""

    def __init__(self, gpus: list[FakeGpu] | None = None, init_error: str | None = None,
                 driver_version: str = "580.95.05"):
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.init_error = init_error
        self.driver_version = driver_version
        self.initialised = False
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _gpu(self, handle: int) -> FakeGpu:
        if not self.initialised:
            raise NVMLError_Uninitialized()
        gpu = self.gpus[handle]
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        return gpu

    # the real names
    def nvmlInit(self) -> None:  # noqa: N802
        self._count("nvmlInit")
        if self.init_error:
            raise _ERRORS[self.init_error]()
        self.initialised = True

    def nvmlShutdown(self) -> None:  # noqa: N802
        self._count("nvmlShutdown")
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._count("nvmlDeviceGetCount")
        if not self.initialised:
            raise NVMLError_Uninitialized()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        if not self.initialised:
            raise NVMLError_Uninitialized()
        if index >= len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[index].lost:
            raise NVMLError_GpuIsLost()
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: int) -> str:  # noqa: N802
        return self._gpu(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: int, version=None) -> _Memory:  # noqa: N802
        gpu = self._gpu(handle)
        return _Memory(gpu.total_bytes, gpu.used_bytes)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Util:  # noqa: N802
        gpu = self._gpu(handle)
        if gpu.utilization_not_supported:
            raise NVMLError_NotSupported()
        return _Util(gpu.utilization_pct)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[FakeProcess]:  # noqa: N802
        gpu = self._gpu(handle)
        if gpu.processes_not_supported:
            raise NVMLError_NotSupported()
        return list(gpu.processes)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[FakeProcess]:  # noqa: N802
        self._gpu(handle)
        return []

    def module(self) -> types.ModuleType:
        """A module object exposing this scenario under pynvml's names."""
        mod = types.ModuleType("fake_pynvml_scenario")
        for name, value in globals().items():
            if name.startswith(("NVML_", "NVMLError")):
                setattr(mod, name, value)
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(mod, name, getattr(self, name))
        mod.scenario = self
        return mod


# ----------------------------------------------------------------------------- scenarios


def scenario(name: str) -> FakeNvml:
    """Named scenarios used across the tests."""
    if name == "one_gpu":
        return FakeNvml([FakeGpu(processes=[FakeProcess(pid=os.getpid(), usedGpuMemory=1 * GIB)])])
    if name == "two_gpus":
        return FakeNvml([
            FakeGpu(name="NVIDIA RTX A6000", total_bytes=48 * GIB, used_bytes=40 * GIB, uuid="GPU-a"),
            FakeGpu(name="NVIDIA GeForce RTX 3060", total_bytes=12 * GIB, used_bytes=1 * GIB, uuid="GPU-b"),
        ])
    if name == "library_missing":
        return FakeNvml(init_error="LibraryNotFound")
    if name == "driver_not_loaded":
        return FakeNvml(init_error="DriverNotLoaded")
    if name == "no_devices":
        return FakeNvml([])
    if name == "one_gpu_lost":
        return FakeNvml([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b", lost=True)])
    if name == "processes_not_supported":
        return FakeNvml([FakeGpu(processes_not_supported=True)])
    if name.startswith("free_gib="):  # e.g. free_gib=5.5 on a 24 GiB card
        free = float(name.split("=", 1)[1])
        total = 24 * GIB
        return FakeNvml([FakeGpu(total_bytes=total, used_bytes=total - int(free * GIB))])
    if name.startswith("free_bytes="):
        free_b = int(name.split("=", 1)[1])
        total = 24 * GIB
        return FakeNvml([FakeGpu(total_bytes=total, used_bytes=total - free_b)])
    raise ValueError(f"unknown fake NVML scenario {name!r}")


def from_spec(spec: str) -> FakeNvml:
    spec = spec.strip()
    if not spec.startswith("{"):
        return scenario(spec)
    data = json.loads(spec)
    gpus = [
        FakeGpu(
            name=g.get("name", "NVIDIA GeForce RTX 4090"),
            total_bytes=int(g.get("total_gib", 24) * GIB),
            used_bytes=int(g.get("used_gib", 2) * GIB),
            utilization_pct=int(g.get("utilization_pct", 7)),
            uuid=g.get("uuid", f"GPU-{i}"),
            lost=bool(g.get("lost", False)),
        )
        for i, g in enumerate(data.get("gpus", []))
    ]
    return FakeNvml(gpus, init_error=data.get("init_error"))


# Module-level functions: this module itself acts as the scenario named by MEMCTL_FAKE_NVML.
_ACTIVE = from_spec(os.environ.get("MEMCTL_FAKE_NVML", "one_gpu"))
_this = sys.modules[__name__]
for _name in dir(_ACTIVE):
    if _name.startswith("nvml"):
        setattr(_this, _name, getattr(_ACTIVE, _name))
