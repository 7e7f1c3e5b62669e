"""What the CPU and GPU rows share: the guide's table, the lowering rule, the estimate/CLI rows."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memory_controller.units import GIB, MIB

from . import adapter as A
from .table import Row, Verdict, b, not_run, verdict

# The user's guide (seeds/memory-control-guide.ru.md), "Рекомендации системы": free memory -> band.
GUIDE_BANDS = (  # (min free GiB, band, mode, precision, context, batch)
    (8.0, "vllm_full", "vllm", "fp16", 2048, 4),
    (6.0, "vllm_limited", "vllm", "fp16", 1024, 2),
    (4.0, "transformers_fp16", "transformers", "fp16", 1024, 1),
    (0.0, "transformers_int8", "transformers", "int8", 512, 1),
)
QUANTISED = ("int8", "nf4")
RECLAIM_MIN_BYTES = 64 * MIB  # issue 14: unload gives back memory within max(64 MiB, 2 % of the model)
RECLAIM_FRACTION = 0.02


def reclaim_tolerance(model_bytes: int) -> int:
    return max(RECLAIM_MIN_BYTES, int(RECLAIM_FRACTION * model_bytes))


@dataclass(frozen=True)
class Expected:
    band: str
    mode: str
    precision: str
    context: int
    batch: int


def guide_band(free_bytes: int, vllm_available: bool, on_cpu: bool, cpu_half: str = "bf16") -> Expected:
    """The guide's row for ``free_bytes``; a vLLM row falls back to the first Transformers row when vLLM
    cannot run, and fp16 becomes ``cpu_half`` on the CPU (both as memctl's README documents)."""
    row = next(r for r in GUIDE_BANDS if free_bytes >= r[0] * GIB)
    if row[2] == "vllm" and not vllm_available:
        row = next(r for r in GUIDE_BANDS if r[2] == "transformers")
    precision = cpu_half if on_cpu and row[3] == "fp16" else row[3]
    return Expected(row[1], row[2], precision, row[4], row[5])


def lowered(ctl: Any, model_id: str, start: Expected, free_bytes: int, device: str,
            gpu_index: int | None) -> tuple[str, int] | None:
    """The model-aware lowering as issue 14 states it, with the README's context rule: keep the band's
    precision while some context of at least min(256, band context) fits, else step down to int8, then
    nf4 (4-bit with double quantisation, as memctl loads it); the context is then the largest that fits,
    up to the model's maximum (the band's context is a floor for an IDE, not a ceiling)."""
    bits = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4}
    ladder = [start.precision] + [p for p in QUANTISED if bits[p] < bits[start.precision]]
    model_max = A.model_max_context(ctl, model_id)
    for precision in ladder:
        prof = A.profile(precision, start.context, device, gpu_index, double_quant=precision == "nf4")
        ctx = A.max_context(ctl, model_id, prof, free_bytes)
        if ctx >= min(256, start.context):
            return precision, min(ctx, model_max) if model_max else ctx
    return None


def recommendation_rows(ctl: Any, label: str, free_bytes: int, model_id: str, device: str,
                        gpu_index: int | None) -> list[Row]:
    """Band row (no model) and lowering row (``model_id``) for the memory free now."""
    rows: list[Row] = []
    rec = A.recommend(ctl)
    exp = guide_band(free_bytes, bool(rec.preferred_available), device == "cpu")
    got = (rec.band, rec.profile.mode, rec.profile.precision.value, rec.profile.context_tokens,
           rec.profile.batch)
    want = (exp.band, exp.mode, exp.precision, exp.context, exp.batch)
    rows.append(Row(f"recommendation, {b(free_bytes)} free ({label})", "{} {} {} ctx {} batch {}".format(*want),
                    "{} {} {} ctx {} batch {}".format(*got), verdict(got == want)))
    rec_m = A.recommend(ctl, model_id)
    start = guide_band(free_bytes, bool(rec_m.preferred_available), device == "cpu")
    if start.mode != "transformers":
        start = Expected(start.band, "transformers", start.precision, start.context, start.batch)
    want_m = lowered(ctl, model_id, start, free_bytes, device, gpu_index)
    got_m = (rec_m.profile.precision.value, rec_m.profile.context_tokens)
    est = A.estimate(ctl, model_id, rec_m.profile).total_bytes
    ok = want_m is not None and got_m == want_m and est <= free_bytes
    rows.append(Row(
        f"model-aware lowering, {model_id.split('/')[-1]} ({label})",
        "none fits" if want_m is None else f"{want_m[0]} ctx {want_m[1]}, estimate <= {b(free_bytes)}",
        f"{got_m[0]} ctx {got_m[1]}, estimate {b(est)}" + (f" ({'; '.join(str(n) for n in rec_m.notes)})" if rec_m.notes else ""),
        verdict(ok)))
    return rows


def cli_rows(ctl: Any, model_id: str, prof: Any, device_key: str, free_now: Callable[[], int]) -> list[Row]:
    """``memctl status --json`` sees the device's free memory; ``memctl estimate --json`` = the controller's."""
    rows: list[Row] = []
    # Free memory is read every 50 ms while the CLI runs (seconds): other processes on a shared machine
    # move the host figure by 100-450 MiB within a second, and the CLI's own process counts while it reads.
    samples: list[int] = [free_now()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(free_now())

    sampler = threading.Thread(target=sample, name="gpu-check-free", daemon=True)
    sampler.start()
    try:
        rc, data, err = A.cli("status")
    finally:
        stop.set()
        sampler.join(5)
    samples.append(free_now())
    dev = next((d for d in (data or {}).get("devices", []) if d.get("key") == device_key), None)
    if rc != 0 or dev is None or dev.get("free_bytes") is None:
        rows.append(Row(f"memctl status: free on {device_key}", "exit 0, the device listed",
                        f"exit {rc}: {err.strip()[-200:]}", Verdict.FAIL))
    else:
        total = dev.get("total_bytes") or 1
        lo, hi = min(samples), max(samples)
        diff = max(0, lo - dev["free_bytes"], dev["free_bytes"] - hi)
        rows.append(Row(f"memctl status: free on {device_key}",
                        f"{b(lo)}..{b(hi)} while it ran, ±1% of total",
                        f"{b(dev['free_bytes'])} (outside by {b(diff)}; {len(samples)} samples)",
                        verdict(diff <= 0.01 * total)))
    est = A.estimate(ctl, model_id, prof)
    args = ["estimate", model_id, "--dtype", prof.precision.value, "--context", str(prof.context_tokens),
            "--device", prof.device]
    rc, data, err = A.cli(*args)
    got = None if not data else (data.get("weights_bytes"), data.get("total_bytes"))
    rows.append(Row(f"memctl estimate = controller ({prof.precision.value}, ctx {prof.context_tokens})",
                    f"weights {b(est.weights_bytes)}, total {b(est.total_bytes)}",
                    f"exit {rc}: " + ("no JSON " + err.strip()[-200:] if got is None
                                     else f"weights {b(got[0])}, total {b(got[1])}"),
                    verdict(rc == 0 and got == (est.weights_bytes, est.total_bytes))))
    return rows


def guarded(rows: list[Row], check: str, fn: Callable[[], list[Row]], cleanup: Callable[[], None]) -> None:
    """Run one section; an unexpected error becomes a FAIL row (the table still prints), then ``cleanup``."""
    try:
        rows.extend(fn())
    except Exception as exc:  # noqa: BLE001 - reported in the table, with the last frame
        where = traceback.extract_tb(exc.__traceback__)[-1]
        rows.append(Row(check, "runs", f"{type(exc).__name__}: {str(exc)[:300]} "
                                        f"({where.filename.rsplit('/', 1)[-1]}:{where.lineno})", Verdict.FAIL))
    finally:
        try:
            cleanup()
        except Exception:  # noqa: BLE001 - the next section reports what is left
            pass


def bnb_available() -> tuple[bool, str]:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken native library
        return False, f"bitsandbytes not installed ({type(exc).__name__})"
    return True, ""


def server_rows(ctl: Any, settings: Any, model_id: str, prof: Any) -> list[Row]:
    """A streamed chat through the memctl server, with ``model_id`` running under ``prof``. Random weights
    often pick token ids the check's small tokenizer renders as no text: the generated tokens (the usage
    chunk) are what is checked, the text is shown."""
    check, expected = f"streamed chat through the memctl server ({prof.device})", "tokens streamed, usage, then [DONE]"
    if not A.has_server():
        return [not_run(check, expected, "no server/openai_api in this checkout (the serving issue has not landed)")]
    for mod in ("fastapi", "uvicorn", "httpx"):
        try:
            __import__(mod)
        except ImportError:
            return [not_run(check, expected, f"{mod} not installed")]
    A.apply(ctl, A.plan(ctl, model_id, prof))
    chat = A.serve_chat(ctl, settings, model_id)
    return [Row(check, expected, f"{chat.events} events, {chat.completion_tokens} completion tokens, "
                                 f"done={chat.done}, text {chat.text[:40]!r}",
                verdict(chat.events > 0 and bool(chat.completion_tokens) and chat.done))]
