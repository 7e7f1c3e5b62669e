"""Catalog of models the user can load: the Hugging Face cache plus local model directories.

The HF cache layout (``models--org--name/{refs,snapshots,blobs}``) is read folder by folder:
``huggingface_hub.scan_cache_dir()`` gives up on the whole cache for one bad entry (a snapshot that
is a symlink loop) and stats every file of every revision, which is slow with thousands of models.
Corrupt entries come back as one warning each beside the list, never as an exception; a missing cache
is an empty list with a warning. Configs are read with size and depth limits. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import safefiles
from .errors import CorruptDataError, InvalidModelIdError, MemctlError, ModelLoadError, ModelNotFoundError
from .estimate.files import printable as _shown
from .estimate.files import read_regular_file
from .safejson import loads_bounded
from .types import CachedModel, CatalogResult

if TYPE_CHECKING:
    from .backend import Backend
    from .settings import Settings

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HF_ID_RE = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_ID_HINT = (
    "use a Hugging Face id such as Qwen/Qwen2.5-Coder-1.5B-Instruct (letters, digits, '.', '_', '-'), "
    "or an absolute path inside a folder listed in local_model_dirs (MEMCTL_LOCAL_MODEL_DIRS)"
)


def _load_settings_lazily() -> Settings:
    from .settings import load_settings

    return load_settings()


def _local_dirs(settings: Settings) -> list[Path]:
    return [Path(os.path.abspath(d.expanduser())) for d in settings.local_model_dirs]


def validate_model_id(model_id: str, settings: Settings | None = None) -> str:
    """Check a model id and return it normalised.

    Accepts a Hugging Face id (``org/name`` or ``name``; ``[A-Za-z0-9._-]``, no ``..`` nor ``--``)
    or an absolute path inside one of ``settings.local_model_dirs`` (``settings`` is loaded when
    not given). Raises :class:`InvalidModelIdError` for empty ids, control characters, ``..``
    path segments, relative paths and absolute paths outside the configured local dirs.
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise InvalidModelIdError("the model id is empty", _ID_HINT)
    mid = model_id.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in mid):
        raise InvalidModelIdError(f"model id {mid!r} contains control characters", _ID_HINT)
    if mid.startswith(("/", "~")):
        path = Path(mid).expanduser()
        if ".." in path.parts:
            raise InvalidModelIdError(f"model path {mid!r} contains '..'", "give the model folder's full path")
        settings = settings if settings is not None else _load_settings_lazily()
        dirs = _local_dirs(settings)
        lexical = Path(os.path.normpath(path))
        resolved = path.resolve()
        inside = any(lexical.is_relative_to(d) or resolved.is_relative_to(d.resolve()) for d in dirs)
        if not inside:
            where = ", ".join(str(d) for d in dirs) or "none configured"
            raise InvalidModelIdError(
                f"model path {mid} is outside the configured local model dirs ({where})",
                "add its parent folder to local_model_dirs (MEMCTL_LOCAL_MODEL_DIRS) or move the model there",
            )
        return str(lexical)
    if ".." in mid or "\\" in mid:
        raise InvalidModelIdError(f"model id {mid!r} contains a path trick ('..' or '\\')", _ID_HINT)
    if "--" in mid or mid.endswith(".") or not _HF_ID_RE.match(mid):
        raise InvalidModelIdError(f"model id {mid!r} is not a valid Hugging Face id", _ID_HINT)
    return mid


# --------------------------------------------------------------------------- entries

_CONFIG_MAX_BYTES = 4 * 1024 * 1024
_REF_MAX_BYTES = 256
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# (path, mtime_ns, size, inode) -> architecture: a rescan of an unchanged cache reads no config
_arch_cache: dict[tuple[str, int, int, int], str | None] = {}
_arch_lock = threading.Lock()


class _CorruptEntry(Exception):
    """One cache entry cannot be listed; the message says why (becomes one warning)."""


def _architecture(config_path: Path) -> str | None:
    """``architectures[0]`` (or ``model_type``) of a config, read with limits and cached by file signature.

    Raises ValueError/OSError/CorruptDataError when unreadable or malformed.
    """
    st = os.stat(config_path)
    key = (str(config_path), st.st_mtime_ns, st.st_size, st.st_ino)
    with _arch_lock:
        if key in _arch_cache:
            return _arch_cache[key]
    cfg = loads_bounded(read_regular_file(config_path, _CONFIG_MAX_BYTES), what="config.json",
                        max_bytes=_CONFIG_MAX_BYTES, expect=dict)
    archs, mt = cfg.get("architectures"), cfg.get("model_type")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else (
        mt if isinstance(mt, str) else None)
    arch = None if arch is None else _shown(arch[:200])  # shown in tables: no control characters
    with _arch_lock:
        if len(_arch_cache) > 100_000:
            _arch_cache.clear()
        _arch_cache[key] = arch
    return arch


def _describe_dir(
    model_id: str, path: Path, revision: str | None, size_bytes: int, top_files: set[str], source: str,
    warnings: list[str],
) -> CachedModel:
    has_config = "config.json" in top_files
    architecture = None
    if has_config:
        try:
            if source == "hf_cache":  # a config linked out of the repo folder (to /etc/passwd, say) is not read
                safefiles.check_file(path / "config.json", safefiles.roots_of(path, source))
            architecture = _architecture(path / "config.json")
        except (OSError, ValueError, CorruptDataError) as exc:
            why = exc.message if isinstance(exc, CorruptDataError) else (
                getattr(exc, "strerror", None) or str(exc))
            warnings.append(f"{model_id}: config.json is unreadable ({why}); download the model again")
            has_config = False
    return CachedModel(model_id=model_id, revision=revision, size_on_disk_bytes=size_bytes,
                       has_safetensors=any(f.endswith(".safetensors") for f in top_files), has_config=has_config,
                       architecture=architecture, path=str(path), source=source)


def _read_ref(path: Path) -> str | None:
    try:
        text = read_regular_file(path, _REF_MAX_BYTES).decode("ascii", "replace").strip()
    except (OSError, ValueError):
        return None
    return text if _COMMIT_RE.match(text) else None


def _snapshot_files(snapshot: str) -> set[str]:
    """Names of the snapshot's top-level entries that are no real folder (a symlink counts as a file:
    no stat per entry); raises OSError when the snapshot is no readable folder."""
    with os.scandir(snapshot) as it:
        return {e.name for e in it if not e.is_dir(follow_symlinks=False)}


def _blobs_bytes(repo_dir: str) -> int:
    """Bytes of the repo's blobs: one stat per blob (every revision's files live there once)."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(os.path.join(repo_dir, "blobs")) as it:
        for e in it:
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _regular_files_bytes(folder: str) -> int:
    """Bytes of the regular files under ``folder`` (symlinks, such as a snapshot's links into ``blobs/``,
    are not followed nor counted): a copied cache or a ``local_dir`` download keeps real files in its
    snapshot, and those are on disk too (issue 20.7: such a model showed 0 B)."""
    total = 0
    stack = [folder]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError), os.scandir(current) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
    return total


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _repo_signature(repo_dir: str, snapshot: str) -> tuple:
    """What changes when a download adds or replaces anything the listing shows (folder mtimes change
    when entries come and go; the config's own signature catches an edit in place)."""
    paths = ("snapshots", "blobs", os.path.join("refs", "main"))
    return (*(_stat_key(os.path.join(repo_dir, p)) for p in paths), _stat_key(snapshot),
            _stat_key(os.path.join(snapshot, "config.json")))


# repo folder -> (signature, entry, warnings): an unchanged folder costs five stats on a rescan
_repo_cache: dict[str, tuple[tuple, CachedModel, tuple[str, ...]]] = {}


def _scan_repo(repo_dir: Path, warnings: list[str]) -> CachedModel:
    """The newest usable snapshot of one ``models--org--name`` folder; raises _CorruptEntry."""
    repo = str(repo_dir)
    with _arch_lock:
        hit = _repo_cache.get(repo)
    if hit is not None and _repo_signature(repo, hit[1].path) == hit[0]:
        warnings.extend(hit[2])
        return hit[1]
    own: list[str] = []
    model = _scan_repo_uncached(repo, own)
    with _arch_lock:
        if len(_repo_cache) > 100_000:
            _repo_cache.clear()
        _repo_cache[repo] = (_repo_signature(repo, model.path), model, tuple(own))
    warnings.extend(own)
    return model


def _scan_repo_uncached(repo: str, warnings: list[str]) -> CachedModel:
    name = os.path.basename(repo)
    repo_id = name.removeprefix("models--").replace("--", "/")
    if not _HF_ID_RE.match(repo_id) or ".." in repo_id:
        raise _CorruptEntry("the folder name is not a valid model id")
    snapshots = os.path.join(repo, "snapshots")
    try:
        with os.scandir(snapshots) as it:
            names = [e.name for e in it]
    except OSError as exc:
        raise _CorruptEntry(f"snapshots folder is missing or unreadable ({exc.strerror or exc})") from None
    main = _read_ref(Path(repo, "refs", "main"))

    def order(snap_name: str) -> tuple[bool, float]:
        if snap_name == main:
            return (True, 0.0)
        key = _stat_key(os.path.join(snapshots, snap_name))
        return (False, key[0] if key else 0.0)

    problems = []
    for snap_name in sorted(names, key=order, reverse=True):
        snap = os.path.join(snapshots, snap_name)
        try:
            top = _snapshot_files(snap)
        except OSError as exc:
            problems.append(f"snapshot {_shown(snap_name[:40])} is not a readable folder ({exc.strerror or exc})")
            continue
        if problems:
            warnings.append(f"{repo_id}: {'; '.join(problems)}; using snapshot {_shown(snap_name[:40])}")
        on_disk = _blobs_bytes(repo) + sum(_regular_files_bytes(os.path.join(snapshots, n)) for n in names)
        return _describe_dir(repo_id, Path(snap), snap_name, on_disk, top, "hf_cache", warnings)
    raise _CorruptEntry("; ".join(problems) or "no snapshots")


def _scan_hf(cache_dir: Path) -> tuple[list[CachedModel], list[str]]:
    """Every model folder of the HF cache; one corrupt folder is one warning, never the whole list.

    Reads the cache layout (``models--org--name/{refs,snapshots,blobs}``) directly: per folder a
    listing, a stat per blob and the config's architecture (cached by file signature).
    """
    models: list[CachedModel] = []
    warnings: list[str] = []
    try:
        with os.scandir(cache_dir) as it:
            repos = sorted(e.name for e in it if e.name.startswith("models--"))
    except FileNotFoundError:
        return [], [f"the Hugging Face cache {cache_dir} does not exist yet: no cached models there"]
    except OSError as exc:
        return [], [f"cannot read the Hugging Face cache {cache_dir}: {exc.strerror or exc}"]
    for name in repos:
        try:
            models.append(_scan_repo(cache_dir / name, warnings))
        except _CorruptEntry as exc:
            warnings.append(f"corrupt cache entry skipped: {_shown(cache_dir / name)}: {_shown(exc)}")
        except OSError as exc:
            warnings.append(f"corrupt cache entry skipped: {_shown(cache_dir / name)}: {exc.strerror or exc}")
    return models, warnings


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):  # does not follow folder symlinks: no loops
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _looks_like_model(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return any(e.name == "config.json" or e.name.endswith(_WEIGHT_SUFFIXES) for e in it)
    except OSError:
        return False


def _local_entry(path: Path, warnings: list[str]) -> CachedModel:
    with os.scandir(path) as it:
        top = {e.name for e in it if not e.is_dir()}
    return _describe_dir(str(path), path, None, _dir_size(path), top, "local_dir", warnings)


def _scan_local(dirs: list[Path]) -> tuple[list[CachedModel], list[str]]:
    models: list[CachedModel] = []
    warnings: list[str] = []
    for d in dirs:
        try:
            if not d.is_dir():
                warnings.append(f"local model dir {d} does not exist or is not a folder")
                continue
            if _looks_like_model(d):
                models.append(_local_entry(d, warnings))
                continue
            children = sorted(d.iterdir())
        except OSError as exc:
            warnings.append(f"cannot read local model dir {d}: {exc.strerror or exc}")
            continue
        for child in children:
            try:
                if any(ord(c) < 32 or ord(c) == 127 for c in child.name):
                    warnings.append(f"local model folder {_shown(child)} skipped: its name has control characters")
                    continue
                if child.is_dir() and _looks_like_model(child):
                    models.append(_local_entry(child, warnings))
            except OSError as exc:
                warnings.append(f"cannot read local model folder {_shown(child)}: {exc.strerror or exc}")
    return models, warnings


def scan_models(settings: Settings) -> CatalogResult:
    """Every model in the HF cache (``settings.resolved_hf_cache_dir``) and in ``settings.local_model_dirs``.

    Never raises for cache problems: corrupt entries, unreadable configs and a missing cache come
    back in ``CatalogResult.warnings``. Models are sorted by id.
    """
    cache_dir = settings.resolved_hf_cache_dir
    hf_models, warnings = _scan_hf(cache_dir)
    local_models, local_warnings = _scan_local(_local_dirs(settings))
    models = sorted([*hf_models, *local_models], key=lambda m: (m.source, m.model_id.lower()))
    return CatalogResult(models=tuple(models), warnings=tuple(warnings + local_warnings), cache_dir=str(cache_dir))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(model_id: str, settings: Settings) -> CachedModel:
    """The catalog entry for ``model_id`` (an HF id or an absolute path inside a local model dir).

    Raises :class:`InvalidModelIdError` for a malformed id, :class:`ModelLoadError` when the entry is
    in the cache but corrupt, and :class:`ModelNotFoundError` (saying where we looked) otherwise.
    Never downloads.
    """
    mid = validate_model_id(model_id, settings)
    if mid.startswith("/"):
        path = Path(mid)
        if not path.is_dir() or not _looks_like_model(path):
            raise ModelNotFoundError(
                f"no model folder at {mid} (no config.json or weights there)",
                "check the path; `memctl models` lists what memctl can see",
            )
        return _local_entry(path, [])
    cache_dir = settings.resolved_hf_cache_dir
    folder = "models--" + mid.replace("/", "--")
    repo_dir = cache_dir / folder
    if os.path.lexists(repo_dir):  # only this folder is read, however large the cache
        try:
            return _scan_repo(repo_dir, [])
        except (_CorruptEntry, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ModelLoadError(f"{mid} is in the Hugging Face cache but corrupt: {why}",
                                 f"delete {repo_dir} and download the model again") from None
    for d in _local_dirs(settings):
        candidate = d / mid
        if candidate.is_dir() and _looks_like_model(candidate):
            return _local_entry(candidate, [])
    dirs = ", ".join(str(d) for d in _local_dirs(settings)) or "none configured"
    offline = " (offline: HF_HUB_OFFLINE is set)" if _offline() else ""
    cached = _cached_ids(cache_dir)
    same_but_case = [c for c in cached if c.lower() == mid.lower()]
    by_lower = {c.lower(): c for c in cached}
    close = same_but_case or [by_lower[c] for c in difflib.get_close_matches(mid.lower(), list(by_lower), n=3,
                                                                             cutoff=0.8)]
    fetch = (f"memctl never downloads{offline}: fetch it where there is internet (`hf download {mid}`), "
             "or point MEMCTL_HF_CACHE_DIR at the cache that holds it; `memctl models` lists what is cached")
    if same_but_case:
        hint = f"did you mean {same_but_case[0]}? Model ids are case-sensitive"
    elif close:
        hint = f"did you mean {' or '.join(close)}? (cached, with a similar name) Otherwise: {fetch}"
    else:
        hint = fetch
    raise ModelNotFoundError(
        f"model {mid} is not in the Hugging Face cache at {cache_dir} (looked for {folder}) "
        f"nor in the local model dirs ({dirs})",
        hint,
        code="model_not_found",
        args={"model": mid, "suggestions": close},
    )


def _cached_ids(cache_dir: Path) -> list[str]:
    """Model ids of the cache's folders, from their names alone (one listing, nothing opened)."""
    try:
        with os.scandir(cache_dir) as it:
            names = [e.name for e in it if e.name.startswith("models--")]
    except OSError:
        return []
    ids = (n.removeprefix("models--").replace("--", "/") for n in names)
    return sorted(i for i in ids if _HF_ID_RE.match(i))


CATALOG_TTL_S = 10.0


class Catalog:
    """The catalog service: owns the last scan (kept ``CATALOG_TTL_S`` seconds) and resolves model ids.
    ``backends()`` gives the backends, some of which list models of their own store (``list_models()``,
    ``resolve_model(id)``, e.g. Ollama's): those join the list and resolve when no checkpoint does."""

    def __init__(self, settings: Settings, backends: Callable[[], dict[str, Backend]] = dict) -> None:
        from .cache import TTLCache

        self.settings, self._backends = settings, backends
        self._scan: TTLCache[CatalogResult] = TTLCache(CATALOG_TTL_S)

    def models(self, refresh: bool = False) -> CatalogResult:
        return self._scan.get_or(self._scan_all, refresh=refresh)

    def _scan_all(self) -> CatalogResult:
        result = scan_models(self.settings)
        own: list[CachedModel] = []
        for b in self._backends().values():
            try:
                own.extend(b.list_models())
            except MemctlError:
                continue
        return dataclasses.replace(result, models=result.models + tuple(own)) if own else result

    def resolve(self, model: str | CachedModel) -> CachedModel:
        """``model`` as a catalog entry (a recent scan's entry when it is still there, else read afresh)."""
        if isinstance(model, CachedModel):
            return model
        try:
            mid = validate_model_id(model, self.settings)
            recent = self._scan.get()
            if recent is not None:
                for m in recent.models:
                    if m.model_id == mid and os.path.isdir(m.path):
                        return m
            return resolve_model(mid, self.settings)
        except (InvalidModelIdError, ModelNotFoundError):
            own = self._backend_model(model)  # a model a backend lists itself (not a checkpoint folder)
            if own is None:
                raise
            return own

    def _backend_model(self, model_id: str) -> CachedModel | None:
        if not isinstance(model_id, str) or len(model_id) > 400:
            return None
        for b in self._backends().values():
            found = b.resolve_model(model_id)
            if found is not None:
                return found
        return None
