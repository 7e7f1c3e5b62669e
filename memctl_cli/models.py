"""``memctl models`` and ``memctl estimate``: the catalog and the memory estimator on the command line.

Neither command imports torch: the catalog reads the HF cache listing, the estimator reads configs and
safetensors headers only. Errors are project errors (``cli.main`` prints message + hint, exit 1);
bad arguments exit 2: by argparse (a non-finite ``--free-gib``, a batch over the limit) or here
(a context over the model's own maximum, as the dashboard's blocker says).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memctl_cli.output import print_error, table
from memory_controller.errors import MemctlError
from memory_controller.types import MAX_BATCH, MAX_CONTEXT_TOKENS, Precision, Profile, to_jsonable
from memory_controller.units import GIB, fmt_bytes

MAX_FREE_GIB = 1_048_576.0  # 1 PiB: more is a typo

if TYPE_CHECKING:
    from memory_controller.settings import Settings


def _whole_number(high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} must be at least 1")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value:,} is over the limit of {high:,}")
        return value

    return parse


_positive_int = _whole_number(MAX_CONTEXT_TOKENS)


def _non_negative_float(text: str) -> float:
    """GiB of free memory: a finite number from 0 to MAX_FREE_GIB (``inf``, ``nan``, ``1e400`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a finite number of GiB")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must not be negative")
    if value > MAX_FREE_GIB:
        raise argparse.ArgumentTypeError(f"{value:g} GiB is more memory than any machine has (limit {MAX_FREE_GIB:g})")
    return value


def _precision(text: str) -> str:
    """A precision in any case (the dashboard shows "BF16"); argparse's choices check the value."""
    return text.strip().lower()


def _usage_error(args: argparse.Namespace, error: MemctlError) -> int:
    """A bad argument found after parsing (needs the model): same output as cli.main's errors, exit 2."""
    print_error(error, bool(getattr(args, "json", False)))
    return 2


def band_label(name: str, bands: Sequence[Any], language: str = "en") -> str:
    """The guide's heading of the table row ``name`` ("With 4-6 GB free"), as the dashboard's card
    writes it; the name itself when ``bands`` has no such row."""
    from memory_controller.i18n import Translator

    ordered = sorted(bands, key=lambda b: b.min_free_bytes, reverse=True)
    i = next((k for k, b in enumerate(ordered) if b.name == name), None)
    if i is None:
        return name

    def gb(n_bytes: int) -> str:
        value = n_bytes / GIB
        return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"

    t = Translator(language)
    low = ordered[i].min_free_bytes
    if i == 0:
        return t("rec.heading_top", low=gb(low))
    if low == 0:
        return t("rec.heading_bottom", high=gb(ordered[i - 1].min_free_bytes))
    return t("rec.heading_mid", low=gb(low), high=gb(ordered[i - 1].min_free_bytes))


def recommendation_lines(rec: dict[str, Any], bands: Sequence[Any] = ()) -> list[str]:
    """``memctl status``'s recommendation in words: what to run, then why — the guide's table row by its
    label ("With 4-6 GB free"), never by its internal name (which reads like a precision)."""
    p = rec["profile"]
    mode = {"transformers": "Transformers (in-process)", "vllm": "vLLM (Docker)"}.get(p["mode"], p["mode"])
    band = rec["band"]
    label = band_label(band, bands)
    reason = str(rec.get("reason", ""))
    row = f"the guide's row “{label}”" if label != band else "the guide's table"
    why = reason.replace(f"→ {band}", f"→ {row}") if f"→ {band}" in reason else f"{reason} → {row}"
    model = rec.get("model")
    return [
        f"Recommended{f' for {model}' if model else ''}: {mode}, precision {p['precision']}, "
        f"context {p['context_tokens']:,} tokens, batch {p['batch']}, on {p['device']}",
        f"  why: {why}",
    ] + [f"  note: {n.get('text') or n.get('code')}" for n in rec.get("notes") or () if isinstance(n, dict)]


def _default_device(settings: Settings) -> str:
    """cuda when the probe sees a GPU, else cpu (so a CPU-only machine gets no CUDA reserve)."""
    from memory_controller.probe import DeviceProbe

    snap = DeviceProbe(nvml_module_name=settings.nvml_module).snapshot()
    return "cuda" if snap.has_gpu else "cpu"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models`` and ``estimate`` to the ``memctl`` parser; each sets ``func(args, settings) -> int``."""
    p = subparsers.add_parser("models", help="models in the Hugging Face cache and the local model dirs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("estimate", help="memory a model needs under a profile (weights, KV cache, ...)")
    p.add_argument("model", help="Hugging Face id (org/name) or an absolute path inside a local model dir")
    p.add_argument("--dtype", type=_precision, choices=[x.value for x in Precision], default=Precision.BF16.value,
                   help="fp32/fp16/bf16, or bitsandbytes int8/nf4/fp4, any case (default bf16)")
    p.add_argument("--context", type=_positive_int, default=2048,
                   help="context tokens (default 2048; at most the model's own maximum)")
    p.add_argument("--batch", type=_whole_number(MAX_BATCH), default=1,
                   help=f"sequences served at once (default 1, at most {MAX_BATCH})")
    p.add_argument("--double-quant", action="store_true", help="4-bit double quantisation")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="cuda adds the CUDA context reserve (default: cuda when a GPU is found, else cpu)")
    p.add_argument("--free-gib", type=_non_negative_float, default=None,
                   help="also print the largest context that fits in this much free memory (GiB)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_estimate)


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    """List the catalog (the owner's when one runs); warnings (corrupt entries, missing cache) go beside
    the list. Exit 0."""
    from server.connect import controller_for

    ctl = controller_for(settings)
    try:
        result = ctl.models()
    finally:
        ctl.close()
    if args.json:
        print(json.dumps(to_jsonable(result), ensure_ascii=False, indent=2))
        return 0
    print(f"Hugging Face cache: {result.cache_dir}")
    if not result.models:
        print("No models found.")
    else:
        rows = [("ID", "REVISION", "SIZE", "WEIGHTS", "CONFIG", "ARCHITECTURE")]
        for m in result.models:
            rows.append((
                m.model_id,
                (m.revision or "local")[:10],
                fmt_bytes(m.size_on_disk_bytes),
                "safetensors" if m.has_safetensors else "other/none",
                "yes" if m.has_config else "NO",
                m.architecture or "?",
            ))
        print(table(rows))
    for w in result.warnings:
        print(f"warning: {w}")
    warned = {w.split(":", 1)[0] for w in result.warnings}  # the catalog already said what is wrong with these
    for m in result.models:  # a model listed but unusable says why and what to do, once
        problem = None if m.model_id in warned else model_problem(m)
        if problem:
            print(f"warning: {m.model_id}: {problem}")
    return 0


def model_problem(model: Any) -> str | None:
    """What is wrong with a cached model's files (truncated, corrupt, no weights) and the fix; None if fine."""
    from memory_controller.estimate import read_model_spec

    try:
        read_model_spec(model.path)
    except MemctlError as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - any other failure shows when the model is planned
        return None
    return None


def cmd_estimate(args: argparse.Namespace, settings: Settings) -> int:
    """Print the estimate's breakdown (and the max context for ``--free-gib``). Raises project errors."""
    from memory_controller import estimate as est
    from memory_controller.catalog import resolve_model

    model = resolve_model(args.model, settings)
    max_positions = est.read_model_spec(model.path).max_position_embeddings
    if max_positions and args.context > max_positions:
        return _usage_error(args, MemctlError(
            f"context {args.context:,} tokens exceeds the model's maximum of {max_positions:,} "
            f"(max_position_embeddings of {model.model_id})",
            f"choose --context {max_positions} or less", code="context_over_model_maximum",
            args={"context": args.context, "max_positions": max_positions}))
    profile = Profile(
        mode="transformers",
        precision=Precision(args.dtype),
        context_tokens=args.context,
        batch=args.batch,
        double_quant=args.double_quant,
        device=args.device or _default_device(settings),
    )
    e = est.estimate(model, profile, settings)
    max_ctx = None
    if args.free_gib is not None:
        max_ctx = est.max_context_that_fits(model, int(args.free_gib * GIB), profile, settings)
    if args.json:
        data = to_jsonable(e)
        data["summary"] = est.describe(e)
        if max_ctx is not None:
            data["free_bytes"] = int(args.free_gib * GIB)
            data["max_context_that_fits"] = max_ctx
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return 0
    dq = " + double quant" if args.double_quant and profile.precision.is_4bit else ""
    print(f"{model.model_id} — {profile.precision.value}{dq}, context {profile.context_tokens}, "
          f"batch {profile.batch}, on {profile.device}")
    print(f"  parameters      {e.parameters:,}")
    for label, value in (("weights", e.weights_bytes), ("KV cache", e.kv_cache_bytes),
                         ("activations", e.activation_bytes), ("CUDA context", e.cuda_context_bytes),
                         ("total", e.total_bytes)):
        print(f"  {label:<15} {fmt_bytes(value):>12}  ({value:,} B)")
    print(f"  source          {e.source}")
    for note in e.notes:
        print(f"  note: {note}")
    if max_ctx is not None:
        if max_ctx == 0:
            print(f"  in {args.free_gib:g} GiB free: does not fit even with a one-token context")
        else:
            print(f"  in {args.free_gib:g} GiB free: up to {max_ctx:,} tokens of context")
    return 0
