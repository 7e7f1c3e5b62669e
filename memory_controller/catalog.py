"""Catalog of models the user can load: the Hugging Face cache plus local model directories.

The HF cache is read through ``huggingface_hub.scan_cache_dir()`` (its layout is not ours to
re-implement). Corrupt entries come back as warnings beside the list, never as an exception, and a
missing cache is an empty list with a warning. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidModelIdError, ModelLoadError, ModelNotFoundError
from .types import CachedModel, CatalogResult

if TYPE_CHECKING:
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


def _architecture(config_path: Path) -> str | None:
    """``architectures[0]`` (or ``model_type``) of a config; raises ValueError/OSError when unreadable."""
    with open(config_path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    if not isinstance(cfg, dict):
        raise ValueError("not a JSON object")
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    mt = cfg.get("model_type")
    return mt if isinstance(mt, str) else None


def _describe_dir(
    model_id: str, path: Path, revision: str | None, size_bytes: int, top_files: set[str], source: str,
    warnings: list[str],
) -> CachedModel:
    has_config = "config.json" in top_files
    architecture = None
    if has_config:
        try:
            architecture = _architecture(path / "config.json")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            warnings.append(f"{model_id}: config.json is unreadable ({exc}); download the model again")
            has_config = False
    return CachedModel(
        model_id=model_id,
        revision=revision,
        size_on_disk_bytes=size_bytes,
        has_safetensors=any(f.endswith(".safetensors") for f in top_files),
        has_config=has_config,
        architecture=architecture,
        path=str(path),
        source=source,
    )


def _scan_hf(cache_dir: Path) -> tuple[list[CachedModel], list[str]]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    models: list[CachedModel] = []
    warnings: list[str] = []
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return [], [f"the Hugging Face cache {cache_dir} does not exist yet: no cached models there"]
    except (ValueError, OSError) as exc:
        return [], [f"cannot read the Hugging Face cache {cache_dir}: {exc}"]
    warnings.extend(f"corrupt cache entry skipped: {w}" for w in info.warnings)
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revs = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        rev = revs[0]
        top = {f.file_name for f in rev.files if f.file_path.parent == rev.snapshot_path}
        models.append(
            _describe_dir(repo.repo_id, rev.snapshot_path, rev.commit_hash, rev.size_on_disk, top, "hf_cache", warnings)
        )
    return models, warnings


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _looks_like_model(path: Path) -> bool:
    try:
        return any(e.name == "config.json" or e.name.endswith(_WEIGHT_SUFFIXES) for e in os.scandir(path))
    except OSError:
        return False


def _local_entry(path: Path, warnings: list[str]) -> CachedModel:
    top = {e.name for e in os.scandir(path) if e.is_file()}
    return _describe_dir(str(path), path, None, _dir_size(path), top, "local_dir", warnings)


def _scan_local(dirs: list[Path]) -> tuple[list[CachedModel], list[str]]:
    models: list[CachedModel] = []
    warnings: list[str] = []
    for d in dirs:
        if not d.is_dir():
            warnings.append(f"local model dir {d} does not exist or is not a folder")
            continue
        try:
            if _looks_like_model(d):
                models.append(_local_entry(d, warnings))
                continue
            for child in sorted(d.iterdir()):
                if child.is_dir() and _looks_like_model(child):
                    models.append(_local_entry(child, warnings))
        except OSError as exc:
            warnings.append(f"cannot read local model dir {d}: {exc}")
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
    models, warnings = _scan_hf(cache_dir)
    for m in models:
        if m.model_id == mid:
            return m
    folder = "models--" + mid.replace("/", "--")
    for w in warnings:
        if folder in w:
            raise ModelLoadError(f"{mid} is in the Hugging Face cache but corrupt: {w}",
                                 f"delete {cache_dir / folder} and download the model again")
    for d in _local_dirs(settings):
        candidate = d / mid
        if candidate.is_dir() and _looks_like_model(candidate):
            return _local_entry(candidate, [])
    close = [m.model_id for m in models if m.model_id.lower() == mid.lower()]
    dirs = ", ".join(str(d) for d in _local_dirs(settings)) or "none configured"
    offline = " (offline: HF_HUB_OFFLINE is set)" if _offline() else ""
    hint = (
        f"did you mean {close[0]}? Model ids are case-sensitive"
        if close
        else f"memctl never downloads{offline}: fetch it where there is internet (`hf download {mid}`), "
        "or point MEMCTL_HF_CACHE_DIR at the cache that holds it; `memctl models` lists what is cached"
    )
    raise ModelNotFoundError(
        f"model {mid} is not in the Hugging Face cache at {cache_dir} (looked for {folder}) "
        f"nor in the local model dirs ({dirs})",
        hint,
    )
