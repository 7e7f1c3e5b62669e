"""Ground truth for the check, read apart from memctl: NVML directly, /proc for the host, a peak sampler,
and a ballast process that holds GPU memory so that a chosen amount is free.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


# --------------------------------------------------------------------------- NVML
class Nvml:
    """A thin reader of one GPU through ``pynvml`` (nvidia-ml-py). ``open()`` returns None without a GPU."""

    def __init__(self, nv: Any, index: int):
        self.nv = nv
        self.index = index
        self.handle = nv.nvmlDeviceGetHandleByIndex(index)

    @classmethod
    def open(cls, index: int = 0) -> tuple[Nvml | None, str]:
        """(reader, why not). Never raises."""
        try:
            import pynvml as nv
        except ImportError as exc:
            return None, f"nvidia-ml-py is not installed ({exc})"
        try:
            nv.nvmlInit()
            if nv.nvmlDeviceGetCount() <= index:
                return None, "NVML reports no GPU"
            return cls(nv, index), ""
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound etc.: no GPU here
            return None, f"NVML is unavailable ({type(exc).__name__}: {exc})"

    def memory(self) -> tuple[int, int, int]:
        """(total, used, free) bytes."""
        m = self.nv.nvmlDeviceGetMemoryInfo(self.handle)
        return int(m.total), int(m.used), int(m.free)

    def used(self) -> int:
        return self.memory()[1]

    def name(self) -> str:
        n = self.nv.nvmlDeviceGetName(self.handle)
        return n.decode() if isinstance(n, bytes) else str(n)

    def driver(self) -> str:
        v = self.nv.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)

    def processes(self) -> dict[int, int | None]:
        """pid -> used bytes of every compute process on this GPU (empty when hidden, e.g. a PID namespace)."""
        try:
            procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:  # noqa: BLE001
            return {}
        return {int(p.pid): (None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in procs}

    def settle(self, wait_s: float = 0.5) -> int:
        """Used bytes once two readings 50 ms apart agree (or ``wait_s`` passed)."""
        end = time.monotonic() + wait_s
        last = self.used()
        while time.monotonic() < end:
            time.sleep(0.05)
            now = self.used()
            if now == last:
                return now
            last = now
        return last


class PeakSampler:
    """Polls ``read()`` on a thread as fast as it answers; ``peak`` is the largest reading."""

    def __init__(self, read: Callable[[], int], interval_s: float = 0.002):
        self.read, self.interval_s = read, interval_s
        self.peak = read()
        self.samples = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-check-peak", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self.samples += 1
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.read())


# --------------------------------------------------------------------------- host
def _status_kib(*keys: str) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            k, _, rest = line.partition(":")
            if k in out:
                out[k] = int(rest.split()[0]) * 1024
    return out


def mapped_resident_bytes(prefix: str) -> int:
    """Resident bytes of this process's mappings of files under ``prefix`` (/proc/self/smaps ``Rss``)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = len(head) == 6 and head[5].strip().startswith(prefix)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def process_resident_bytes() -> int:
    """RssAnon of this process plus the resident pages of the model files it maps (``MEMCTL_HF_CACHE_DIR``,
    the check's own cache): private memory plus weights memory-mapped from their files. Other file pages
    (shared libraries' code) are left out: on a busy machine the kernel drops and rereads them, which
    moved RssFile by 3-5 MiB between two readings, 2 % of a small model."""
    d = _status_kib("RssAnon")
    hub = os.environ.get("MEMCTL_HF_CACHE_DIR")
    return d["RssAnon"] + (mapped_resident_bytes(os.path.realpath(hub) + os.sep) if hub else 0)


def malloc_trim() -> None:
    """glibc ``malloc_trim(0)``: hand freed heap pages back (no-op elsewhere). The check trims before a
    load, so that pages freed by an earlier row are not reused and counted as nothing by the next one;
    never after a load (what the backend leaves there is what a user's process holds)."""
    import ctypes
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def meminfo_available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemAvailable missing from /proc/meminfo")


def meminfo_total_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal missing from /proc/meminfo")


# --------------------------------------------------------------------------- ballast
_BALLAST = (
    "import sys, torch\n"
    "free, _ = torch.cuda.mem_get_info(int(sys.argv[2]))\n"
    "n = max(0, free - int(sys.argv[1]))\n"
    "x = torch.empty(n, dtype=torch.uint8, device=f'cuda:{sys.argv[2]}')\n"
    "x.fill_(1); torch.cuda.synchronize()\n"
    "print(n, flush=True)\n"
    "sys.stdin.read()\n"
)


@dataclass
class Ballast:
    """A child process holding GPU memory so that about ``leave_free_bytes`` stay free; another holder
    that memctl must see and must never touch. Use as a context manager."""

    leave_free_bytes: int
    index: int = 0
    proc: subprocess.Popen | None = None
    held_bytes: int = 0

    def __enter__(self) -> Ballast:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BALLAST, str(self.leave_free_bytes), str(self.index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.__exit__()
            raise RuntimeError(f"the ballast process failed to start: {err.strip()[-500:]}")
        self.held_bytes = int(line)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
