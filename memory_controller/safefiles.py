"""Files memctl (or a library it calls) opens from a model cache, checked before anything opens them.

A hostile or broken cache entry must not hang the server or leak files from elsewhere: a weights file
that is a FIFO blocks every ``open()`` for ever, a ``config.json`` linked to ``/etc/passwd`` or a snapshot
linked to ``/etc`` makes memctl read what is not a model, a 100 GB "tokenizer" exhausts memory. Every
file of a model folder must therefore be

* a regular file (not a FIFO, socket or device),
* inside the model's own folder in the cache (symlinks are followed: the Hugging Face cache links
  ``snapshots/<rev>/x`` to ``blobs/<hash>`` in the same repo folder; a local folder may also link into
  the Hugging Face cache, as older ``--local-dir`` downloads did),
* of a bounded size (small limits for configs, tokenizers and templates; a large one for weights).

:func:`check_model_dir` checks a whole model folder (a few stats, nothing opened) and raises
:class:`~memory_controller.estimate.files.CorruptModelFileError` (code ``model.bad_file``) naming the file,
what is wrong and what to do; :func:`open_checked` opens one file without ever blocking. The catalog,
the estimator, planning and the backends use them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from .errors import CorruptDataError, ModelLoadError
from .units import GIB, MIB

SMALL_FILE_MAX_BYTES = 64 * MIB  # configs, generation configs, chat templates, token maps
TOKENIZER_MAX_BYTES = 512 * MIB  # tokenizer.json / tokenizer.model / vocabularies
WEIGHTS_MAX_BYTES = 2048 * GIB  # one weights shard (real ones are at most a few dozen GB)
MAX_ENTRIES = 20_000  # files walked in one model folder
MAX_DEPTH = 4  # sub-folders walked below the model folder

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx",
                    ".onnx_data", ".npz", ".tflite", ".ot")
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "tekken.json", "spiece.model", "sentencepiece.bpe.model",
                    "vocab.json", "vocab.txt", "merges.txt", "qwen.tiktoken", "tokenizer.tiktoken")

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a dangling link"}


class BadModelFileError(CorruptDataError, ModelLoadError):
    """A file of a model folder is not a bounded regular file inside the model's cache folder."""

    code = "model.bad_file"


def limit_for(name: str) -> int:
    """The size limit of a model file by its name."""
    low = name.lower()
    if low.endswith(_WEIGHT_SUFFIXES) and not low.endswith(".index.json"):
        return WEIGHTS_MAX_BYTES
    if low in _TOKENIZER_NAMES or low.endswith((".tiktoken", ".model")):
        return TOKENIZER_MAX_BYTES
    if low.endswith((".json", ".jinja", ".txt", ".py", ".yaml", ".yml", ".md", ".model")):
        return SMALL_FILE_MAX_BYTES
    return WEIGHTS_MAX_BYTES  # unknown files (images, licences): memctl does not read them, only bound them


def _shown(path: Any) -> str:
    text = str(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return text.encode("unicode_escape").decode("ascii")
    return text


def _inside(real: str, roots: Iterable[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def roots_of(model_path: str | os.PathLike[str], source: str | None = None,
             hf_cache_dir: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """Where a model's files may live (real paths): the repo folder ``models--org--name`` of a Hugging Face
    snapshot, else the model folder itself and the Hugging Face cache."""
    p = Path(model_path)
    roots: list[str] = []
    if source == "hf_cache" or (p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--")):
        roots.append(os.path.realpath(p.parent.parent))
    else:
        roots.append(os.path.realpath(p))
        if hf_cache_dir is not None:
            roots.append(os.path.realpath(hf_cache_dir))
    return tuple(roots)


def _fix_hint(model_path: Path, roots: tuple[str, ...]) -> str:
    return (f"this model's files in {_shown(roots[0])} are not what a download makes: delete that folder and "
            f"download the model again (memctl opens only regular files inside the model's own cache folder)")


def check_file(path: str | os.PathLike[str], roots: tuple[str, ...], *, max_bytes: int | None = None,
               what: str | None = None) -> os.stat_result:
    """The stat of ``path`` once it is checked: a regular file, inside ``roots``, at most ``max_bytes``
    (default: by name). Raises BadModelFileError naming the file and the problem; nothing is opened."""
    p = Path(path)
    label = what or p.name
    limit = limit_for(p.name) if max_bytes is None else max_bytes
    real = os.path.realpath(p)
    if not _inside(real, roots):
        raise BadModelFileError(f"{_shown(label)} in {_shown(p.parent)} links outside the model's cache folder "
                                f"(to {_shown(real)[:200]})", _fix_hint(p.parent, roots),
                                args={"file": str(p), "target": real})
    try:
        st = os.stat(real)
    except OSError as exc:
        raise BadModelFileError(f"{_shown(label)} in {_shown(p.parent)} cannot be read ({exc.strerror or exc})",
                                _fix_hint(p.parent, roots), args={"file": str(p)}) from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise BadModelFileError(f"{_shown(label)} in {_shown(p.parent)} is {kind}, not a regular file",
                                _fix_hint(p.parent, roots), args={"file": str(p), "kind": kind})
    if st.st_size > limit:
        raise BadModelFileError(f"{_shown(label)} in {_shown(p.parent)} is {st.st_size} bytes, over the "
                                f"{limit}-byte limit for such a file", _fix_hint(p.parent, roots),
                                args={"file": str(p), "size": st.st_size, "limit": limit})
    return st


def check_model_dir(model_path: str | os.PathLike[str], roots: tuple[str, ...] | None = None) -> None:
    """Every file in a model folder (and its sub-folders, a few levels down) checked with :func:`check_file`;
    the folder itself must lie inside ``roots`` (a snapshot linked to ``/etc`` is refused). Raises
    BadModelFileError for the first problem; a few stats per file, nothing is opened."""
    p = Path(model_path)
    roots = roots or roots_of(p)
    real_dir = os.path.realpath(p)
    if not _inside(real_dir, roots):
        raise BadModelFileError(f"the model folder {_shown(p)} links outside the model's cache folder "
                                f"(to {_shown(real_dir)[:200]})", _fix_hint(p, roots),
                                args={"file": str(p), "target": real_dir})
    seen = 0
    stack: list[tuple[Path, int]] = [(p, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise BadModelFileError(f"the model folder {_shown(folder)} cannot be listed ({exc.strerror or exc})",
                                    _fix_hint(p, roots), args={"file": str(folder)}) from None
        for e in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                raise BadModelFileError(f"the model folder {_shown(p)} holds more than {MAX_ENTRIES} files",
                                        _fix_hint(p, roots), args={"file": str(p)})
            child = Path(e.path)
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                real = os.path.realpath(child)
                if not _inside(real, roots):
                    raise BadModelFileError(f"{_shown(e.name)} in {_shown(folder)} links outside the model's cache "
                                            f"folder (to {_shown(real)[:200]})", _fix_hint(p, roots),
                                            args={"file": str(child), "target": real})
                if depth < MAX_DEPTH and not e.is_symlink():
                    stack.append((child, depth + 1))
                continue
            check_file(child, roots)


def open_checked(path: str | os.PathLike[str], roots: tuple[str, ...] | None = None, *,
                 max_bytes: int | None = None) -> IO[bytes]:
    """``open(path, "rb")`` that never blocks (a FIFO swapped in after the check is refused by ``fstat``):
    checked with :func:`check_file` first when ``roots`` is given, then opened non-blocking and checked
    again on the open file."""
    p = Path(path)
    limit = limit_for(p.name) if max_bytes is None else max_bytes
    if roots is not None:
        check_file(p, roots, max_bytes=limit)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadModelFileError(f"{_shown(p.name)} in {_shown(p.parent)} cannot be opened ({exc.strerror or exc})",
                                "download the model again") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise BadModelFileError(f"{_shown(p.name)} in {_shown(p.parent)} is {kind}, not a regular file",
                                    "delete the model and download it again", args={"file": str(p), "kind": kind})
        if st.st_size > limit:
            raise BadModelFileError(f"{_shown(p.name)} in {_shown(p.parent)} is {st.st_size} bytes, over the "
                                    f"{limit}-byte limit for such a file", "delete the model and download it again",
                                    args={"file": str(p), "size": st.st_size, "limit": limit})
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_checked(path: str | os.PathLike[str], roots: tuple[str, ...] | None = None, *,
                 max_bytes: int | None = None) -> bytes:
    """The whole of a checked file (see :func:`open_checked`), at most its limit."""
    limit = limit_for(Path(path).name) if max_bytes is None else max_bytes
    with open_checked(path, roots, max_bytes=limit) as fh:
        return fh.read(limit + 1)


def check_state_dir(path: str | os.PathLike[str]) -> Path:
    """memctl's state dir (owner lock, ``server.json`` with the owner's token, the operation log), created
    (mode 0700) when missing. Raises SettingsError naming the path when it is a file, not writable (a read-only
    file system, no permission) or writable by every user (another user could plant ``server.json`` and
    receive the owner's token, or rewrite the history)."""
    import errno

    from .errors import SettingsError

    p = Path(path).expanduser()
    fix = "set MEMCTL_STATE_DIR (state_dir) to a folder of your own, or fix this one"
    try:
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise SettingsError(f"the state dir {_shown(p)} is a file, not a folder", fix,
                            code="state_dir.not_a_folder", args={"path": str(p)}) from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            why = "a path above it is a file, not a folder"
        elif exc.errno == errno.EROFS:
            why = "it is on a read-only file system"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            why = "memctl may not create it (permission denied)"
        else:
            why = exc.strerror or str(exc)
        raise SettingsError(f"the state dir {_shown(p)} cannot be created: {why}", fix,
                            code="state_dir.unusable", args={"path": str(p)}) from None
    st = os.stat(p)
    if not stat.S_ISDIR(st.st_mode):
        raise SettingsError(f"the state dir {_shown(p)} is not a folder", fix, code="state_dir.not_a_folder",
                            args={"path": str(p)})
    if st.st_mode & stat.S_IWOTH:
        raise SettingsError(f"the state dir {_shown(p)} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}): "
                            "another user could plant the server file and receive memctl's owner token",
                            f"run `chmod 700 {_shown(p)}`, or {fix}", code="state_dir.world_writable",
                            args={"path": str(p)})
    if not os.access(p, os.W_OK | os.X_OK):
        raise SettingsError(f"the state dir {_shown(p)} is not writable"
                            + (" (a read-only file system)" if _read_only_fs(p) else " (permission denied)"), fix,
                            code="state_dir.unusable", args={"path": str(p)})
    if _read_only_fs(p):
        raise SettingsError(f"the state dir {_shown(p)} is on a read-only file system", fix,
                            code="state_dir.unusable", args={"path": str(p)})
    return p


def _read_only_fs(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False
