"""Checks made before any weight is read: quantisation support, placement arguments, the model's files
(tokenizer, chat template), and the blockers a claim reports. Heavy imports stay inside functions."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from memory_controller.backend import Capabilities, Message, msg
from memory_controller.errors import CorruptDataError, ModelLoadError, QuantizationUnavailableError
from memory_controller.estimate.files import read_regular_file
from memory_controller.safejson import loads_bounded
from memory_controller.types import Precision, Profile, SystemSnapshot
from memory_controller.units import MIB

DEVICE_MAP_RE = re.compile(r"^(auto|cpu|balanced|balanced_low_0|sequential|cuda|cuda:\d+)$")
_MAX_MEMORY_VALUE_RE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
BNB_HINT = "install bitsandbytes (`pip install bitsandbytes`), or choose fp16/bf16"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json", "spiece.model",
                   "vocab.txt", "sentencepiece.bpe.model")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_quiet_installed = False


def quiet_bitsandbytes() -> None:
    """Silence two known-harmless bitsandbytes messages (one per layer per token for 8-bit on CPU)."""
    global _quiet_installed
    if _quiet_installed:
        return
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropMessages(("MatMul8bitLt: inputs will be cast",)))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages(("Failed to load CPU gemm_4bit",)))
    _quiet_installed = True


def cuda_available() -> bool:
    """True when torch sees a CUDA device (imports torch the first time: ~3 s)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no CUDA" here
        return False


def bitsandbytes_installed() -> bool:
    """Whether ``import bitsandbytes`` can find the package, without importing it."""
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False


def _probe_bnb(precision: Precision, device: str) -> str | None:
    import torch

    try:
        import bitsandbytes.functional as F

        x = torch.randn(64, 64, dtype=torch.float16 if device == "cuda" else torch.bfloat16, device=device)
        if precision is Precision.INT8:
            F.int8_vectorwise_quant(x.to(torch.float16))
        else:
            F.quantize_4bit(x, quant_type=precision.value)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "unavailable here"
        return f"{type(exc).__name__}: {exc}"


_quant_probe: dict[tuple[str, str], str | None] = {}


def check_quantization(precision: Precision, device: str) -> None:
    """Raise :class:`QuantizationUnavailableError` when ``precision`` cannot run on ``device``.

    Checks that bitsandbytes imports and meets Transformers' minimum version, that CUDA exists when
    asked for, and quantises a small tensor on the device once (cached). No-op for fp32/fp16/bf16.
    """
    precision = Precision(precision)
    if not precision.is_quantized:
        return
    if device not in ("cpu", "cuda"):
        raise QuantizationUnavailableError(f"unknown device {device!r} for {precision.value}", "use cpu or cuda",
                                           code="quant.unknown_device", args={"device": device})
    quiet_bitsandbytes()
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
        raise QuantizationUnavailableError(
            f"{precision.value} needs bitsandbytes, which is missing or cannot be imported ({exc})", BNB_HINT,
            code="quant.bitsandbytes_missing", args={"precision": precision.value},
        ) from None
    from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION, is_bitsandbytes_available

    version = getattr(bnb, "__version__", "?")
    if not is_bitsandbytes_available():
        raise QuantizationUnavailableError(
            f"bitsandbytes {version} is older than the {BITSANDBYTES_MIN_VERSION} Transformers needs",
            f"upgrade it: pip install 'bitsandbytes>={BITSANDBYTES_MIN_VERSION}'",
            code="quant.bitsandbytes_old", args={"version": version, "minimum": BITSANDBYTES_MIN_VERSION},
        )
    if device == "cuda" and not cuda_available():
        raise QuantizationUnavailableError(
            f"{precision.value} on cuda was asked for, but torch sees no CUDA device",
            "choose device cpu (bitsandbytes quantises on CPU too) or check the NVIDIA driver",
            code="quant.no_cuda", args={"precision": precision.value},
        )
    key = ("int8" if precision is Precision.INT8 else "4bit", device)
    if key not in _quant_probe:
        _quant_probe[key] = _probe_bnb(precision, device)
    problem = _quant_probe[key]
    if problem is not None:
        raise QuantizationUnavailableError(
            f"bitsandbytes {version} cannot quantise to {precision.value} on {device}: {problem}",
            "choose fp16/bf16, or a device bitsandbytes supports",
            code="quant.unavailable", args={"precision": precision.value, "device": device, "problem": problem},
        )


# --------------------------------------------------------------------------- placement arguments


def resolve_device_map(profile: Profile, device_map: str | None) -> str:
    if device_map is not None:
        if not isinstance(device_map, str) or not DEVICE_MAP_RE.match(device_map):
            raise ModelLoadError(f"device_map {device_map!r} is not supported",
                                 "use auto, cpu, cuda:N, balanced, balanced_low_0 or sequential")
        wants_cuda = device_map.startswith("cuda") or (profile.device == "cuda" and device_map != "cpu")
    else:
        wants_cuda = profile.device == "cuda"
        if not wants_cuda:
            device_map = "cpu"
        elif profile.gpu_ids and len(profile.gpu_ids) == 1:
            device_map = f"cuda:{profile.gpu_ids[0]}"
        else:
            device_map = "auto"
    if device_map == "cuda":
        device_map = "cuda:0"
    if wants_cuda and not cuda_available():
        raise ModelLoadError(
            f"the profile asks for CUDA (device_map {device_map}), but torch sees no CUDA device",
            "choose device cpu, or check the NVIDIA driver and the torch build",
        )
    return device_map


def check_max_memory(max_memory: dict | None) -> dict | None:
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict) or not max_memory:
        raise ModelLoadError(f"max_memory {max_memory!r} must be a non-empty dict", 'e.g. {0: "10GiB", "cpu": "20GiB"}')
    for k, v in max_memory.items():
        key_ok = (isinstance(k, int) and not isinstance(k, bool) and k >= 0) or k in ("cpu", "disk", "mps")
        val_ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
            isinstance(v, str) and _MAX_MEMORY_VALUE_RE.match(v))
        if not (key_ok and val_ok):
            raise ModelLoadError(f"max_memory entry {k!r}: {v!r} is invalid",
                                 'keys are GPU indices or "cpu"/"disk", values bytes or sizes like "10GiB"')
    return dict(max_memory)


def check_offload(offload_folder: str | None) -> str | None:
    if offload_folder is None:
        return None
    p = Path(offload_folder).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"offload folder {p} cannot be created ({exc})",
                             "choose a writable folder with room for the offloaded weights") from None
    if not os.access(p, os.W_OK):
        raise ModelLoadError(f"offload folder {p} is not writable", "choose a writable folder")
    return str(p)


def claim_blockers(backend_id: str, caps: Capabilities, profile: Profile, key: str,
                   snapshot: SystemSnapshot) -> tuple[Message, ...]:
    """What forbids a start, found without loading: precision/device the backend cannot serve, a GPU that
    is not there, bitsandbytes missing, or (once torch is imported) unable to quantise here."""
    blockers: list[Message] = []
    precision = Precision(profile.precision)
    if precision not in caps.precisions:
        blockers.append(msg("backend.precision_unsupported", f"{backend_id} cannot serve {precision.value}",
                            backend=backend_id, precision=precision.value))
    if profile.device not in caps.devices:
        blockers.append(msg("backend.device_unsupported", f"{backend_id} runs on cpu or cuda, not {profile.device}",
                            backend=backend_id, device=profile.device))
    elif profile.device == "cuda" and snapshot.device(key) is None:
        blockers.append(msg("backend.no_gpu", f"the profile asks for {key}, but there is no such GPU",
                            backend=backend_id, device=key))
    if precision.is_quantized and not blockers:
        if not bitsandbytes_installed():
            blockers.append(msg("quant.bitsandbytes_missing", f"{precision.value} needs bitsandbytes, which "
                                f"is not installed; {BNB_HINT}", precision=precision.value))
        elif "torch" in sys.modules:  # the deep check (a test quantisation) only once torch is loaded anyway:
            try:  # a plan drawn on the dashboard's first paint must not import torch (start() checks it all)
                check_quantization(precision, profile.device)
            except QuantizationUnavailableError as exc:
                blockers.append(Message(exc.code, exc.args_, str(exc)))
    return tuple(blockers)


# --------------------------------------------------------------------------- the model's files


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / n).is_file() for n in TOKENIZER_FILES)


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    extra = folder / "additional_chat_templates"
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return True
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return False
    try:
        data = loads_bounded(read_regular_file(cfg, 64 * MIB), what=f"{cfg}", max_bytes=64 * MIB, expect=dict)
    except (CorruptDataError, OSError, ValueError):
        return False
    tpl = data.get("chat_template")
    return bool(tpl) and isinstance(tpl, (str, list))


# (file, mtime, size, inode) -> the problem found in it (None: fine); a re-check of unchanged files is free
_content_cache: dict[tuple, Message | None] = {}


def _signature(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)


def _cached(path: Path, check: Callable[[Path], Message | None]) -> Message | None:
    key = _signature(path)
    if key is None:
        return None
    key = (*key, check.__name__)
    if key not in _content_cache:
        if len(_content_cache) > 10_000:
            _content_cache.clear()
        _content_cache[key] = check(path)
    return _content_cache[key]


def _json_problem(path: Path, model_id: str, code: str, what: str) -> Message | None:
    try:
        data = loads_bounded(read_regular_file(path, 512 * MIB), what=path.name, max_bytes=512 * MIB, expect=dict)
    except (CorruptDataError, OSError, ValueError) as exc:
        why = exc.message if isinstance(exc, CorruptDataError) else str(exc)
        return msg(code, f"{model_id}: its {what} ({path.name}) is malformed ({why[:200]}); download the model "
                   "again", model=model_id, file=path.name)
    if path.name == "tokenizer.json" and not isinstance(data.get("model"), dict):
        return msg(code, f"{model_id}: its tokenizer (tokenizer.json) has no tokenizer model in it; download the "
                   "model again", model=model_id, file=path.name)
    return None


def _tokenizer_json(path: Path) -> Message | None:
    return _json_problem(path, path.parent.name, "model.bad_tokenizer", "tokenizer")


def _tokenizer_config(path: Path) -> Message | None:
    return _json_problem(path, path.parent.name, "model.bad_tokenizer", "tokenizer configuration")


def _generation_config(path: Path) -> Message | None:
    return _json_problem(path, path.parent.name, "model.bad_generation_config", "generation configuration")


def _config_architecture(path: Path) -> Message | None:
    """An architecture this Transformers does not know (memctl never runs code named in ``auto_map``)."""
    try:
        cfg = loads_bounded(read_regular_file(path, 64 * MIB), what="config.json", max_bytes=64 * MIB, expect=dict)
    except (CorruptDataError, OSError, ValueError):
        return None  # the estimator names a malformed config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES:
        return None
    code_note = " (its auto_map names the model's own code, which memctl never runs)" if cfg.get("auto_map") else ""
    shown = str(model_type)[:60]
    return msg("model.unknown_architecture", f"config.json names model_type {shown!r}, which this Transformers does "
               f"not know{code_note}; update transformers or pick another model", model_type=shown)


def _template_problem(template: str) -> str | None:
    """Render ``template`` for a one-message chat under the rendering budget; the problem, or None."""
    from jinja2.exceptions import TemplateError

    from .templates import TemplateBudgetExceeded, _bound_environment, template_budget

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    try:
        compiled = _compile_jinja_template(template)
        _bound_environment(template)
        with template_budget(2.0):
            out = compiled.render(messages=[{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  bos_token="", eos_token="", tools=None)
    except TemplateBudgetExceeded as exc:
        return f"it was stopped: {exc} (it loops)"
    except (TemplateError, RecursionError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if not isinstance(out, str):
        return "it renders no text"
    return None


_template_cache: dict[str, str | None] = {}


def model_file_problems(folder: Path, model_id: str) -> tuple[Message, ...]:
    """What in the model's files would make a load or a chat fail, found by reading small files only: a
    malformed tokenizer or generation config, an architecture Transformers does not know, a chat template that
    raises or runs away on a plain one-message chat. Checks that need Transformers run only once it is
    imported (a plan drawn on the dashboard's first paint must not import it). Results cached by file."""
    problems: list[Message] = []
    for name, check in (("tokenizer.json", _tokenizer_json), ("tokenizer_config.json", _tokenizer_config),
                        ("generation_config.json", _generation_config)):
        found = _cached(folder / name, check)
        if found is not None:
            problems.append(Message(found.code, {**found.args, "model": model_id},
                                    found.text.replace(folder.name, model_id, 1)))
    if "transformers" not in sys.modules:
        return tuple(problems)
    found = _cached(folder / "config.json", _config_architecture)
    if found is not None:
        problems.append(Message(found.code, {**found.args, "model": model_id}, f"{model_id}: {found.text}"))
    template = _chat_template_text(folder)
    if template is not None:
        if template not in _template_cache:
            if len(_template_cache) > 1000:
                _template_cache.clear()
            _template_cache[template] = _template_problem(template)
        problem = _template_cache[template]
        if problem is not None:
            problems.append(msg("model.bad_template", f"{model_id}: its chat template fails on a one-message chat "
                                f"({problem}); pick another model or fix its chat template", model=model_id,
                                problem=problem))
    return tuple(problems)


def _chat_template_text(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    try:
        if jinja.is_file():
            return read_regular_file(jinja, 64 * MIB).decode("utf-8", "replace")
        cfg = folder / "tokenizer_config.json"
        if not cfg.is_file():
            return None
        data = loads_bounded(read_regular_file(cfg, 64 * MIB), what=cfg.name, max_bytes=64 * MIB, expect=dict)
    except (CorruptDataError, OSError, ValueError):
        return None
    tpl = data.get("chat_template")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


_MAX_TEMPLATE_BYTES = 4 * MIB
_TOOLS_RE = re.compile(r"\btools\b")


def _small_text(path: Path, max_bytes: int = _MAX_TEMPLATE_BYTES) -> str | None:
    """A regular file's text when it is at most ``max_bytes``, else None (never a FIFO or a device)."""
    try:
        st = os.stat(path, follow_symlinks=True)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def chat_template_texts(folder: Path) -> list[str]:
    """The chat templates a model folder holds (chat_template.jinja / .json, tokenizer_config.json's), as text;
    read as bounded regular files, no tokenizer built (no heavy import)."""
    out: list[str] = []
    jinja = _small_text(folder / "chat_template.jinja")
    if jinja:
        out.append(jinja)
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        raw = _small_text(folder / name, 64 * MIB)
        if not raw:
            continue
        try:
            data = loads_bounded(raw.encode(), what=str(folder / name), max_bytes=64 * MIB, expect=dict)
        except CorruptDataError:
            continue
        tpl = data.get(key)
        if isinstance(tpl, str):
            out.append(tpl)
        elif isinstance(tpl, list):
            out += [t["template"] for t in tpl if isinstance(t, dict) and isinstance(t.get("template"), str)]
    return out


def template_renders_tools(folder: Path) -> bool | None:
    """Whether the model's chat template uses the ``tools`` it is given (a template that never names them drops
    them silently); None when the folder has no chat template."""
    texts = chat_template_texts(folder)
    if not texts:
        return None
    return any(_TOOLS_RE.search(t) for t in texts)
