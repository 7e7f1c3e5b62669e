"""Model files read as untrusted data: bounded reads of regular files, JSON with limits, and
validated safetensors headers (known dtype, whole non-negative dimensions, offsets that match the
shape and lie inside the file). A file that fails a check raises :class:`CorruptModelFileError`:
never a ``RecursionError``, never negative parameters.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory_controller.errors import CorruptDataError, ModelLoadError
from memory_controller.safejson import MAX_BYTES, loads_bounded
from memory_controller.units import MIB

# safetensors dtype -> bits per element
SAFETENSORS_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})
_MAX_HEADER_BYTES = 100 * MIB  # the safetensors format caps the header at 100 MB too
_MAX_RANK = 16  # dimensions of one tensor
_MAX_DIM = 1 << 48  # one dimension; a real one is far smaller
REDOWNLOAD_HINT = "the file is corrupt: delete this model from the cache and download it again"


def printable(text: object) -> str:
    """``text`` for a one-line message: control characters escaped, so a name from disk cannot forge lines."""
    t = str(text)
    if any(ord(c) < 32 or ord(c) == 127 for c in t):
        return t.encode("unicode_escape").decode("ascii")
    return t


class CorruptModelFileError(CorruptDataError, ModelLoadError):
    """A model file (config, index, safetensors header) is malformed: corrupt data that stops a load."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it (validated: known dtype, dims >= 0)."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        return (self.numel * SAFETENSORS_BITS[self.dtype] + 7) // 8

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of a regular file (never blocks on a FIFO or reads a device).

    Raises OSError when unreadable, ValueError when not a regular file or over the limit.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"{st.st_size} bytes is over the {max_bytes}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(max_bytes + 1)
    finally:
        os.close(fd)


def read_json_file(path: Path, *, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """A JSON object from disk, bounded; raises ModelLoadError / CorruptModelFileError naming the file."""
    try:
        raw = read_regular_file(path, max_bytes)
    except OSError as exc:
        raise ModelLoadError(
            f"{path} is unreadable ({exc.strerror or exc})",
            "the download is incomplete or corrupt: download the model again",
        ) from None
    except ValueError as exc:
        raise CorruptModelFileError(f"{path} is unreadable ({exc})", REDOWNLOAD_HINT) from None
    try:
        return loads_bounded(raw, what=str(path), max_bytes=max_bytes, expect=dict)
    except CorruptDataError as exc:
        raise CorruptModelFileError(exc.message, "the download is incomplete or corrupt: download the model again",
                                    details=exc.details) from None


def _whole(value: Any, *, low: int, high: int) -> int | None:
    """``value`` when it is an int (not a bool) within [low, high], else None."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def _tensor(path: Path, name: str, info: Any) -> tuple[TensorInfo, int]:
    """One validated header entry and where its data ends; raises CorruptModelFileError."""

    def bad(why: str) -> CorruptModelFileError:
        return CorruptModelFileError(f"weights file {path.name} in {path.parent}: tensor {name[:200]!r} {why}",
                                     REDOWNLOAD_HINT)

    if not isinstance(info, dict):
        raise bad("is not described by a JSON object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        raise bad(f"has unknown dtype {str(dtype)[:40]!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK:
        raise bad(f"has an invalid shape (a list of at most {_MAX_RANK} whole numbers expected)")
    dims = [_whole(d, low=0, high=_MAX_DIM) for d in shape]
    if any(d is None for d in dims):
        raise bad(f"has a negative, fractional or absurd dimension in its shape {str(shape)[:80]}")
    offsets = info.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise bad("has invalid data offsets (two whole numbers expected)")
    start, end = (_whole(x, low=0, high=1 << 62) for x in offsets)
    if start is None or end is None or end < start:
        raise bad(f"has invalid data offsets {str(offsets)[:80]}")
    t = TensorInfo(name, dtype, tuple(d for d in dims if d is not None))
    if end - start != t.stored_bytes:
        raise bad("offsets do not match its shape")
    return t, end


def read_safetensors_header(path: Path) -> tuple[TensorInfo, ...]:
    """Tensors described by one safetensors file's header; reads the header bytes only.

    Raises :class:`ModelLoadError` when the file is shorter than its header says (truncated
    download) and :class:`CorruptModelFileError` when the header is malformed.
    """
    from memory_controller.safefiles import open_checked

    try:
        with open_checked(path) as fh:  # never blocks on a FIFO; a regular file of bounded size
            size = os.fstat(fh.fileno()).st_size
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            raw = fh.read(header_len)
    except (OSError, ValueError) as exc:
        raise CorruptModelFileError(
            f"weights file {path.name} in {path.parent} is truncated or corrupt ({exc})",
            "the download is incomplete: delete this model from the cache and download it again",
            code="model.corrupt_file", args={"file": path.name},
        ) from None
    try:
        header = loads_bounded(raw, what=f"safetensors header of {path.name} in {path.parent}",
                               max_bytes=_MAX_HEADER_BYTES, expect=dict)
    except CorruptDataError as exc:
        raise CorruptModelFileError(f"weights file is corrupt: {exc.message}", REDOWNLOAD_HINT,
                                    code="model.corrupt_file", args={"file": path.name}) from None
    data_bytes = size - 8 - header_len
    tensors = []
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        t, end = _tensor(path, name, info)
        data_end = max(data_end, end)
        tensors.append(t)
    if data_end > data_bytes:
        raise ModelLoadError(
            f"weights file {path.name} in {path.parent} is truncated: the header needs "
            f"{8 + header_len + data_end} bytes, the file has {size}",
            "the download is incomplete: delete this model from the cache and download it again",
            code="model.truncated", args={"file": path.name, "need_bytes": 8 + header_len + data_end,
                                          "have_bytes": size},
        )
    return tuple(tensors)


