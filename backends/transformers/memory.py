"""Host and GPU memory accounting for in-process models, and the allocator knobs that give memory back.

One accounting (issue 12.3): a bf16 load memory-maps its weight file, and those pages are page cache,
not memory the plan may promise twice nor memory an unload gives back. So a deployment's ``"host"``
bytes are the *private* (anonymous) bytes its tensors hold; what it occupies of its mapped weight
files is counted apart: ``mapped_bytes``, the resident pages of those mappings (``mincore``), shown
beside the private bytes everywhere (issue 20.2). A release on the host is measured on ``RssAnon`` and,
for the mapped part, on the mappings' resident pages before and after.

torch is imported lazily (only once a model is loaded).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from memory_controller.units import MIB

log = logging.getLogger(__name__)

PAGE_BYTES = 4096
MALLOC_MMAP_THRESHOLD_BYTES = 1 * MIB
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


# --------------------------------------------------------------------------- process and host


def _proc_status_bytes(*keys: str) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in out:
                    out[name] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return out


def process_private_bytes() -> int:
    """Private (anonymous) resident memory of this process in bytes: ``RssAnon`` of /proc/self/status."""
    return _proc_status_bytes("RssAnon")["RssAnon"]


def process_resident_bytes() -> tuple[int, int]:
    """(private ``RssAnon``, file-backed ``RssFile``) resident bytes of this process."""
    d = _proc_status_bytes("RssAnon", "RssFile")
    return d["RssAnon"], d["RssFile"]


def host_available_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, or None when unreadable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_free_bytes() -> int | None:
    """Bytes this process may still allocate: the least of MemAvailable, the cgroup v2 headroom
    (``memory.max - memory.current``) and the soft RLIMIT_DATA / RLIMIT_AS headroom. None if unknown."""
    candidates: list[int] = []
    avail = host_available_bytes()
    if avail is not None:
        candidates.append(avail)
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            rel = next((ln.split(":", 2)[2].strip() for ln in fh if ln.startswith("0::")), None)
        if rel is not None:
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            limit = (base / "memory.max").read_text().strip()
            if limit != "max":
                candidates.append(max(0, int(limit) - int((base / "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    try:
        import resource

        vm = _proc_status_bytes("VmData", "VmSize")
        for res, used in ((resource.RLIMIT_DATA, vm["VmData"]), (resource.RLIMIT_AS, vm["VmSize"])):
            soft = resource.getrlimit(res)[0]
            if soft != resource.RLIM_INFINITY:
                candidates.append(max(0, soft - used))
    except (ImportError, OSError, ValueError):
        pass
    return min(candidates) if candidates else None


# --------------------------------------------------------------------------- glibc malloc

_malloc_tuned = False


@functools.cache
def _glibc() -> Any | None:
    """libc.so.6 on glibc Linux, else None; once per process (``platform.libc_ver`` reads the interpreter's
    binary: tens of milliseconds a call)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool | None:
    """Serve allocations of 1 MiB and more with their own mmap (glibc ``M_MMAP_THRESHOLD``), once.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after big frees, so the weights of the
    *next* model land in the heap and arenas, where freed pages often stay resident after an unload
    (measured: 50-70 MiB held per fp32 load/unload cycle of a 250 MB model; 2-10 MiB with this).
    Called before the first load. Returns whether mallopt succeeded, None when not glibc.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    libc = _glibc()
    if libc is None:
        return None
    try:
        _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES))
    except AttributeError:
        return None
    return _malloc_tuned


def malloc_trim() -> bool | None:
    """``malloc_trim(0)`` on glibc: hand freed heap pages back to the OS. None when not glibc."""
    libc = _glibc()
    if libc is None:
        return None
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return None


def collect_garbage(*, freeze: bool = False) -> int:
    """``gc.collect()``; with ``freeze`` (no model loaded), the survivors are then moved out of the
    collector's sight (``gc.freeze()``).

    A process that imported torch and transformers tracks ~380 k objects, and a full collection walks
    them all: ~0.18-0.25 s on this 2-core machine, three times per apply + unload (issue 20: most of
    apply's overhead over a plain load). Frozen, they are skipped by every later collection (ours and
    Python's own), which then walks only what was made since: a model, a generation's objects. They are
    still freed by reference counting; only a cycle among them that dies later waits for a full sweep
    (:func:`sweep_frozen`, run by the user's "clear memory").
    """
    found = gc.collect()
    if freeze:
        gc.freeze()
    return found


def sweep_frozen() -> int:
    """Give frozen objects back to the collector and collect everything (the user's full clear)."""
    gc.unfreeze()
    return gc.collect()


def clear_caches(*, freeze: bool = False) -> dict[str, Any]:
    """gc.collect() (see :func:`collect_garbage`); torch.cuda.empty_cache() and ipc_collect() when CUDA is
    up; malloc_trim(0) on glibc.

    Returns what ran: ``{"gc_collect": objects found, "cuda_empty_cache": bool, "cuda_ipc_collect": bool,
    "malloc_trim": bool | None}``. Never imports torch (nothing to clear when it is not imported).
    """
    actions: dict[str, Any] = {"gc_collect": collect_garbage(freeze=freeze)}
    torch = sys.modules.get("torch")
    try:
        cuda_up = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    except Exception:  # noqa: BLE001 - a broken CUDA install: nothing to clear
        cuda_up = False
    if cuda_up:
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    actions["cuda_empty_cache"] = cuda_up
    actions["cuda_ipc_collect"] = cuda_up
    actions["malloc_trim"] = malloc_trim()
    return actions


# --------------------------------------------------------------------------- tensors of a model


def unique_tensors(model: Any) -> Iterator[Any]:
    """Parameters, buffers and bitsandbytes quantisation state of ``model``, each storage once."""
    import torch

    seen: set[tuple[int, int]] = set()

    def visit(t: Any) -> Iterator[Any]:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.data_ptr(), t.nbytes)
            if key[0] and key not in seen:
                seen.add(key)
                yield t

    for _name, p in model.named_parameters(remove_duplicate=False):
        yield from visit(p)
        qs = getattr(p, "quant_state", None)  # bitsandbytes 4-bit
        if qs is not None:
            for attr in ("absmax", "code", "offset"):
                yield from visit(getattr(qs, attr, None))
            st2 = getattr(qs, "state2", None)
            if st2 is not None:
                for attr in ("absmax", "code"):
                    yield from visit(getattr(st2, attr, None))
        yield from visit(getattr(p, "SCB", None))  # bitsandbytes 8-bit row scales
    for _name, b in model.named_buffers(remove_duplicate=False):
        yield from visit(b)


def model_footprint_bytes(model: Any) -> int:
    """Bytes a loaded model really holds: parameters + buffers + quantisation state, shared storage once."""
    return sum(t.nbytes for t in unique_tensors(model))


def touch_weights(model: Any, on_fraction: Callable[[float], None] | None = None,
                  tensors: list[Any] | None = None) -> int:
    """Read one byte per 4 KiB page of every CPU weight so memory-mapped files are really resident.

    A bf16 load memory-maps the weight file and reads nothing until a weight is used (FACTS.md);
    "ready" must mean resident. Returns the number of bytes covered. GPU tensors are already copied.
    """
    import torch

    pool = tensors if tensors is not None else unique_tensors(model)
    cpu = [t for t in pool if t.device.type == "cpu" and t.numel() > 0]
    total = sum(t.nbytes for t in cpu) or 1
    done = 0
    next_mark = 0.25
    with torch.inference_mode():
        for t in cpu:
            flat = t.detach().reshape(-1) if t.is_contiguous() else t.detach().contiguous().reshape(-1)
            flat.view(torch.uint8)[::PAGE_BYTES].sum()
            done += t.nbytes
            if on_fraction is not None and done / total >= next_mark:
                on_fraction(done / total)
                next_mark += 0.25
    return done


def mapped_ranges(files: list[Path]) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``files`` (/proc/self/maps)."""
    wanted = set()
    for f in files:
        try:
            wanted.add(os.path.realpath(f))
        except OSError:
            pass
    ranges: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() in wanted:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def mapped_resident_bytes(files: list[Path]) -> int:
    """Resident bytes of this process's mappings of ``files``: what a memory-mapped model occupies of
    its weight files; 0 when none is mapped.

    ``mincore(2)`` over the mapped ranges (/proc/self/maps): ~1 ms for a 1 GB file. Reading
    /proc/self/smaps instead makes the kernel count every mapping of the process (torch's libraries
    too): measured 60 ms a call on the loaded 2-core machine, three calls per apply + unload. smaps is
    the fallback when mincore is not available.
    """
    ranges = mapped_ranges(files)
    if not ranges:
        return 0
    libc = _glibc()
    if libc is not None:
        page = os.sysconf("SC_PAGE_SIZE")
        resident = 0
        try:
            for lo, hi in ranges:
                n = (hi - lo + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                resident += n - bytes(vec).count(0)  # the low bit of each byte: resident
            return resident * page
        except (OSError, AttributeError, ValueError):
            pass
    return _smaps_rss(files)


def _smaps_rss(files: list[Path]) -> int:
    """The ``Rss`` of the /proc/self/smaps entries that map ``files`` (slow: see mapped_resident_bytes)."""
    wanted = set()
    for f in files:
        try:
            wanted.add(os.path.realpath(f))
        except OSError:
            pass
    if not wanted:
        return 0
    total = 0
    inside = False
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                head = line[:1]
                if head.isdigit() or ("a" <= head <= "f"):  # a mapping's header: "lo-hi perms off dev inode path"
                    parts = line.split(maxsplit=5)
                    inside = len(parts) == 6 and "-" in parts[0] and parts[5].strip() in wanted
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return 0
    return total


def bytes_by_device(tensors: list[Any], weight_files: list[Path]) -> tuple[dict[str, int], int]:
    """({device key: bytes}, mapped bytes) of a loaded model's tensors.

    GPU tensors count on ``gpu:N``; CPU tensors count on ``host`` unless they live in a memory-mapped
    weight file (page cache, not private memory): those are the mapped bytes, on no device.
    """
    ranges = mapped_ranges(weight_files)
    out: dict[str, int] = {}
    mapped = 0
    for t in tensors:
        dev = t.device
        if dev.type == "cuda":
            key = f"gpu:{dev.index or 0}"
        elif dev.type == "cpu":
            ptr = t.data_ptr()
            if any(lo <= ptr < hi for lo, hi in ranges):
                mapped += t.nbytes
                continue
            key = "host"
        else:
            continue
        out[key] = out.get(key, 0) + t.nbytes
    return out, mapped


def copy_out_of_mapped(model: Any, weight_files: list[Path]) -> int:
    """Copy every CPU parameter and buffer of ``model`` that lives in a memory-mapped weight file into
    private memory; returns the bytes copied (shared storage once).

    For a bitsandbytes (int8/nf4) load: its embeddings, norms and ``lm_head`` stay views into the mapped
    16-bit file, and one view keeps the *whole* file mapped (and, after quantising read it, resident):
    measured on a 0.1 B model, 187 MiB of file pages for 47 MiB of such tensors. Copied out, the mapping
    goes with the last view (the caller then runs ``malloc_trim``), and the process holds what the
    estimate counts. Tied weights stay tied: one Parameter object is replaced in place.
    """
    import torch

    ranges = mapped_ranges(weight_files)
    if not ranges:
        return 0
    copies: dict[tuple[int, int, tuple[int, ...]], Any] = {}

    def private(t: Any) -> Any | None:
        if t is None or t.device.type != "cpu" or not any(lo <= t.data_ptr() < hi for lo, hi in ranges):
            return None
        key = (t.data_ptr(), t.nbytes, tuple(t.shape))
        if key not in copies:
            copies[key] = t.detach().clone()
        return copies[key]

    with torch.no_grad():
        for module in model.modules():
            for _name, p in list(module._parameters.items()):
                c = private(p)
                if c is not None:
                    p.data = c  # the same Parameter object: ties and hooks keep pointing at it
            for name, b in list(module._buffers.items()):
                c = private(b)
                if c is not None:
                    module._buffers[name] = c
    return sum(c.nbytes for c in copies.values())


def device_summary(model: Any, tensors: list[Any]) -> tuple[str, tuple[int, ...]]:
    """("cpu", "cuda:0", "cuda:0,1", "cuda:0+cpu", "cpu+disk"..., GPU indices) of a loaded model."""
    dm = getattr(model, "hf_device_map", None)
    places: set[str] = set()
    if isinstance(dm, dict) and dm:
        for v in dm.values():
            places.add(f"cuda:{v}" if isinstance(v, int) else str(v))
    else:
        places.update(str(t.device) for t in tensors)
    gpus = sorted({int(p.split(":")[1]) if ":" in p else 0 for p in places if p.startswith("cuda")})
    parts = [f"cuda:{','.join(str(g) for g in gpus)}"] if gpus else []
    if "cpu" in places or not gpus:
        parts.append("cpu")
    if "disk" in places:
        parts.append("disk")
    return "+".join(parts), tuple(gpus)


def drop_tensors(model: Any) -> None:
    """Empty every module's parameters, buffers and tensor attributes (one level into state objects).

    Run on unload and after a failed load, so memory comes back even when something outside the
    backend (a UI session, a traceback) still references the model object.
    """
    import torch

    try:
        if any(hasattr(m, "_hf_hook") for m in model.modules()):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(model, recurse=True)
    except Exception:  # noqa: BLE001 - best effort, the tensors are dropped below anyway
        log.debug("could not remove accelerate hooks", exc_info=True)
    for module in list(model.modules()):
        module._parameters.clear()
        module._buffers.clear()
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):
                setattr(module, key, None)
            elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module) and not isinstance(value, type):
                for k2, v2 in list(vars(value).items()):
                    if isinstance(v2, torch.Tensor):
                        try:
                            setattr(value, k2, None)
                        except (AttributeError, TypeError):
                            pass


# --------------------------------------------------------------------------- GPU


def gpu_used_sum(gpus: tuple[int, ...], nvml_used: Callable[[int], int | None] | None) -> int | None:
    """Used bytes on ``gpus`` (NVML first, torch's mem_get_info as a fallback), None when unknown."""
    total = 0
    for i in gpus:
        used = nvml_used(i) if nvml_used is not None else None
        if used is None:
            torch = sys.modules.get("torch")
            try:
                free, tot = torch.cuda.mem_get_info(i)  # type: ignore[union-attr]
                used = int(tot - free)
            except Exception:  # noqa: BLE001 - unknown
                return None
        total += used
    return total


def gpu_used_all(nvml_used: Callable[[int], int | None] | None) -> dict[int, int | None]:
    """Used bytes of every visible GPU before a load (the model's GPUs are known only after it)."""
    torch = sys.modules.get("torch")
    try:
        count = torch.cuda.device_count() if torch is not None and torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        count = 0
    return {i: gpu_used_sum((i,), nvml_used) for i in range(count)}
