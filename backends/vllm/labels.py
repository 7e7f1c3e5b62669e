"""Container labels: written by memctl at start, read back (as untrusted input) to rediscover.

Any container may carry ``memctl.managed=true``; its other labels may be anything. Reading never
raises: every value is parsed with limits (JSON through :func:`memory_controller.safejson.loads_bounded`,
numbers finite and in range), and what is wrong lands in :attr:`LabelInfo.problems`. Text shown
to people (model id, served name) has control characters escaped; raw values stay in ``raw``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from memory_controller import units
from memory_controller.errors import CorruptDataError
from memory_controller.safejson import loads_bounded
from memory_controller.types import MAX_BATCH, MAX_CONTEXT_TOKENS, Precision, Profile, to_jsonable

MANAGED_LABEL = "memctl.managed"
MODEL_LABEL = "memctl.model"
PROFILE_LABEL = "memctl.profile"
SERVED_NAME_LABEL = "memctl.served_name"
PORT_LABEL = "memctl.port"
GPU_UTIL_LABEL = "memctl.gpu_util"
CLAIM_LABEL = "memctl.claim"  # JSON {"gpu:0": bytes, ...}
TOOL_PARSER_LABEL = "memctl.tool_parser"

LABEL_MAX_BYTES = 64 * 1024
LABEL_MAX_DEPTH = 8
TEXT_MAX_CHARS = 300
RAW_MAX_CHARS = 4096  # raw label values kept for diagnosis (Deployment.detail) are cut to this

_MAX_CLAIM_BYTES = 1 << 50  # 1 PiB per device: anything above is nonsense


def label_text(value: str, max_chars: int = TEXT_MAX_CHARS) -> str:
    """``value`` safe to print on one line (memory_controller.units.escape_text): control and format
    characters (newline, ESC, bidi overrides...) become escapes; past ``max_chars`` it is cut with an ellipsis."""
    return units.escape_text(value, limit=max_chars + 1)


def is_managed(labels: Any) -> bool:
    return isinstance(labels, dict) and labels.get(MANAGED_LABEL) == "true"


def write_labels(*, model_id: str, served_name: str, profile: Profile, port: int, gpu_util: float,
                 claim_bytes: dict[str, int], tool_parser: str | None) -> dict[str, str]:
    """The labels a started container carries (everything needed to find and account for it again)."""
    labels = {
        MANAGED_LABEL: "true",
        MODEL_LABEL: model_id,
        SERVED_NAME_LABEL: served_name,
        PROFILE_LABEL: json.dumps(to_jsonable(profile), sort_keys=True),
        PORT_LABEL: str(port),
        GPU_UTIL_LABEL: f"{gpu_util:.2f}",
        CLAIM_LABEL: json.dumps(dict(claim_bytes), sort_keys=True),
    }
    if tool_parser:
        labels[TOOL_PARSER_LABEL] = tool_parser
    return labels


@dataclass(frozen=True)
class LabelInfo:
    """What memctl's labels say, validated. ``problems`` empty = readable."""

    model_id: str | None  # escaped for display
    served_name: str | None  # escaped for display
    port: int | None
    profile: Profile | None
    gpu_util: float | None
    claim_bytes: dict[str, int] = field(default_factory=dict)
    tool_parser: str | None = None
    problems: tuple[str, ...] = ()
    raw: dict[str, str] = field(default_factory=dict)  # memctl.* labels as Docker gave them (cut to size)

    @property
    def readable(self) -> bool:
        return not self.problems

    @property
    def raw_served_name(self) -> str | None:
        """The served name as written (used to match /v1/models), only when it is plain text."""
        v = self.raw.get(SERVED_NAME_LABEL) or self.raw.get(MODEL_LABEL)
        return v if v is not None and len(v) <= TEXT_MAX_CHARS and label_text(v) == v else None


def _int_in(value: Any, lo: int, hi: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if lo <= value <= hi else None


_MODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # a backend id


def parse_profile(text: str) -> Profile:
    """A Profile from the label's JSON; raises CorruptDataError naming what is wrong."""
    data = loads_bounded(text, what=f"label {PROFILE_LABEL}", max_bytes=LABEL_MAX_BYTES,
                         max_depth=LABEL_MAX_DEPTH, expect=dict)

    def bad(why: str) -> CorruptDataError:
        return CorruptDataError(f"label {PROFILE_LABEL}: {why}", "the container's labels are not memctl's")

    mode = data.get("mode", "vllm")
    try:
        precision = Precision(data.get("precision"))
        if not isinstance(mode, str) or not _MODE.match(mode):
            raise ValueError(mode)
    except (ValueError, TypeError):
        raise bad("mode or precision is not one memctl knows") from None
    context = _int_in(data.get("context_tokens"), 1, MAX_CONTEXT_TOKENS)
    batch = _int_in(data.get("batch"), 1, MAX_BATCH)
    if context is None or batch is None:
        raise bad("context_tokens and batch must be whole numbers in range")
    double_quant = data.get("double_quant", False)
    device = data.get("device", "cuda")
    if not isinstance(double_quant, bool) or device not in ("cuda", "cpu"):
        raise bad("double_quant must be true/false and device cuda or cpu")
    gpu_ids_raw = data.get("gpu_ids")
    gpu_ids: tuple[int, ...] | None = None
    if gpu_ids_raw is not None:
        if not isinstance(gpu_ids_raw, list) or len(gpu_ids_raw) > 64:
            raise bad("gpu_ids must be a short list of GPU indexes")
        ids = [_int_in(i, 0, 1023) for i in gpu_ids_raw]
        if any(i is None for i in ids):
            raise bad("gpu_ids must be GPU indexes 0..1023")
        gpu_ids = tuple(i for i in ids if i is not None)
    return Profile(mode=mode, precision=precision, context_tokens=context, batch=batch,
                   double_quant=double_quant, device=device, gpu_ids=gpu_ids)


def _parse_claim(text: str) -> dict[str, int]:
    data = loads_bounded(text, what=f"label {CLAIM_LABEL}", max_bytes=LABEL_MAX_BYTES,
                         max_depth=LABEL_MAX_DEPTH, expect=dict)
    out: dict[str, int] = {}
    for key, value in data.items():
        ok_key = isinstance(key, str) and key.startswith("gpu:") and key[4:].isdigit() and len(key) <= 10
        n = _int_in(value, 0, _MAX_CLAIM_BYTES)
        if not ok_key or n is None or len(out) >= 64:
            raise CorruptDataError(f"label {CLAIM_LABEL}: expected {{\"gpu:N\": bytes}}",
                                   "the container's labels are not memctl's")
        out[key] = n
    return out


def read_labels(labels: Any) -> LabelInfo:
    """Validate a container's labels. Never raises; every malformed value is a problem."""
    if not isinstance(labels, dict):
        return LabelInfo(None, None, None, None, None, problems=("labels are not a mapping",))
    raw = {k[:100]: (v[:RAW_MAX_CHARS] if isinstance(v, str) else repr(v)[:200])
           for k, v in list(labels.items())[:64] if isinstance(k, str) and k.startswith("memctl.")}
    problems: list[str] = []

    def text(key: str) -> str | None:
        v = labels.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            problems.append(f"{key} is not text")
            return None
        return label_text(v)

    model_id = text(MODEL_LABEL)
    served = text(SERVED_NAME_LABEL)
    if model_id is None:
        problems.append(f"{MODEL_LABEL} is missing")

    port: int | None = None
    port_text = labels.get(PORT_LABEL)
    if isinstance(port_text, str) and port_text.isascii() and port_text.isdigit() and len(port_text) <= 5:
        port = _int_in(int(port_text), 1, 65535)
    if port is None:
        problems.append(f"{PORT_LABEL} is not a TCP port 1..65535")

    profile: Profile | None = None
    if isinstance(labels.get(PROFILE_LABEL), str):
        try:
            profile = parse_profile(labels[PROFILE_LABEL])
        except CorruptDataError as exc:
            problems.append(exc.message)
    else:
        problems.append(f"{PROFILE_LABEL} is missing")

    gpu_util: float | None = None
    util_text = labels.get(GPU_UTIL_LABEL)
    if util_text is not None:
        try:
            value = float(util_text) if isinstance(util_text, str) and len(util_text) <= 32 else math.nan
        except ValueError:
            value = math.nan
        if math.isfinite(value) and 0 < value <= 1:
            gpu_util = value
        else:
            problems.append(f"{GPU_UTIL_LABEL} is not a fraction in (0, 1]")

    claim: dict[str, int] = {}
    if isinstance(labels.get(CLAIM_LABEL), str):
        try:
            claim = _parse_claim(labels[CLAIM_LABEL])
        except CorruptDataError as exc:
            problems.append(exc.message)
    elif CLAIM_LABEL in labels:
        problems.append(f"{CLAIM_LABEL} is not text")

    tool_parser = labels.get(TOOL_PARSER_LABEL)
    if tool_parser is not None and not (isinstance(tool_parser, str) and tool_parser.replace("_", "").isalnum()
                                        and len(tool_parser) <= 40):
        problems.append(f"{TOOL_PARSER_LABEL} is not a parser name")
        tool_parser = None
    return LabelInfo(model_id, served, port, profile, gpu_util, claim, tool_parser,
                     tuple(label_text(p, 200) for p in problems), raw)
