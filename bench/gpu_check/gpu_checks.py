"""The GPU rows of issue 14, measured with NVML (device used memory; per-process where NVML shows it).

Nothing else may run on the GPU meanwhile: device-level readings are the ground truth. ``used0`` is the
device's used memory before this process touched CUDA, so "peak" below is everything this process
held (CUDA context included) at the top of a forward pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from memory_controller.units import GIB, MIB

from . import adapter as A
from .common import (
    QUANTISED,
    bnb_available,
    cli_rows,
    guarded,
    reclaim_tolerance,
    recommendation_rows,
    server_rows,
)
from .measure import Ballast, Nvml, PeakSampler
from .models import ArchShape
from .table import Row, Verdict, b, covers_peak, not_run, pct, verdict, within

PRECISIONS = ("fp16", "bf16", "int8", "nf4")
CONTEXT = 8192  # the chosen context of the per-precision rows (an IDE prompt of moderate size)
WEIGHTS_REL = 0.02
PEAK_MAX_OVER = 0.15
NO_LOAD_GROWTH_BYTES = 32 * MIB  # "nothing loaded": device memory moved less than this


@dataclass
class Gpu:
    nv: Nvml
    index: int
    used0: int  # device used before this process touched CUDA
    floor: int = 0  # device used with this process holding only its CUDA context (after the warm-up)

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"


def _torch():
    import torch

    return torch


def _cleanup(ctl: Any) -> None:
    try:
        for mid in A.loaded_ids(ctl):
            A.unload(ctl, mid)
    except Exception:  # noqa: BLE001 - fall back to the big hammer
        A.emergency_clear(ctl)


def context_rows(g: Gpu, settings: Any, have_bnb: bool) -> list[Row]:
    """Start CUDA with the kernels the loads use (matmul, attention, bitsandbytes), then measure what it costs."""
    torch = _torch()
    for dt in (torch.float16, torch.bfloat16):
        a = torch.randn(256, 256, device=g.device, dtype=dt)
        (a @ a).sum().item()
        q = torch.randn(1, 4, 128, 64, device=g.device, dtype=dt)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
    bnb_note = ""
    if have_bnb:
        try:
            import bitsandbytes.functional as F

            x = torch.randn(64, 64, device=g.device, dtype=torch.float16)
            F.int8_vectorwise_quant(x)
            F.quantize_4bit(x, quant_type="nf4")
            bnb_note = ", bitsandbytes"
        except Exception as exc:  # noqa: BLE001 - API drift: the loads will load its kernels themselves
            bnb_note = f"; bitsandbytes warm-up failed: {type(exc).__name__}"
    torch.cuda.synchronize(g.index)
    a = q = x = None  # noqa: F841 - drop the warm-up tensors before emptying the cache
    torch.cuda.empty_cache()
    g.floor = g.nv.settle()
    context = g.floor - g.used0
    reserve = A.cuda_context_reserve_bytes(settings)
    return [Row("CUDA context: the estimator's reserve covers this process's", f"reserve {b(reserve)} >= context",
                f"context {b(context)} (CUDA, cuBLAS, attention kernels{bnb_note})",
                verdict(reserve >= context))]


def probe_rows(ctl: Any, g: Gpu) -> list[Row]:
    torch = _torch()
    x = torch.empty(256 * MIB, dtype=torch.uint8, device=g.device)
    x.fill_(1)
    torch.cuda.synchronize(g.index)
    snap = A.devices(ctl)
    free, total = torch.cuda.mem_get_info(g.index)
    reserved = torch.cuda.memory_reserved(g.index)
    dev = snap.device(f"gpu:{g.index}")
    rows: list[Row] = []
    if dev is None or dev.free_bytes is None:
        x = None
        return [Row("probe: free/used/total vs torch.cuda.mem_get_info", "±1%", "the probe shows no such GPU",
                    Verdict.FAIL)]
    tol = 0.01 * total
    diffs = (dev.free_bytes - free, dev.used_bytes - (total - free), dev.total_bytes - total)
    rows.append(Row("probe: free/used/total vs torch.cuda.mem_get_info", f"each within {b(tol)} (1% of total)",
                    f"free {b(dev.free_bytes)} vs {b(free)}, used {b(dev.used_bytes)} vs {b(total - free)}, "
                    f"total {b(dev.total_bytes)} vs {b(total)}", verdict(all(abs(d) <= tol for d in diffs))))
    me = os.getpid()
    nvml_pids = g.nv.processes()
    check = "probe: this process among the holders, with its bytes"
    if not nvml_pids or not any(os.path.exists(f"/proc/{pid}") for pid in nvml_pids):
        rows.append(not_run(check, f"pid {me} >= {b(reserved)}",
                            "NVML lists no process of this PID namespace (a container?)"))
    else:
        mine = A.holders_of(ctl, me, f"gpu:{g.index}")
        rows.append(Row(check, f"pid {me} listed with >= {b(reserved)} (torch reserved)",
                        "not listed" if mine is None else f"{b(mine)}", verdict(mine is not None and mine >= reserved)))
    x = None
    torch.cuda.empty_cache()
    return rows


def precision_rows(ctl: Any, g: Gpu, shape: ArchShape, precision: str) -> list[Row]:
    torch = _torch()
    mid, name = shape.model_id, shape.name
    prof = A.profile(precision, CONTEXT, "cuda", g.index)
    est = A.estimate(ctl, mid, prof)
    p = A.plan(ctl, mid, prof)
    if not p.fits or p.blockers:
        return [Row(f"{name} {precision}: plan", "fits", f"fits={p.fits} {'; '.join(p.blockers)}", Verdict.FAIL)]
    before = g.nv.settle()
    t0 = time.monotonic()
    A.apply(ctl, p)
    load_s = time.monotonic() - t0
    after = g.nv.settle()
    took = after - before
    rows = [Row(f"{name} {precision}: weights estimate vs NVML-measured load", f"{b(est.weights_bytes)} ±2%",
                f"{b(took)} ({pct(took, est.weights_bytes)}); torch allocated "
                f"{b(torch.cuda.memory_allocated(g.index))}, reserved {b(torch.cuda.memory_reserved(g.index))}; "
                f"load {load_s:.1f} s",
                verdict(within(took, est.weights_bytes, rel=WEIGHTS_REL)))]
    prompt = A.prompt_of_tokens(A.model_path(ctl, mid), CONTEXT - 1)
    with PeakSampler(g.nv.used) as sampler:
        A.forward(ctl, mid, prompt)
    peak = sampler.peak - g.used0
    rows.append(Row(f"{name} {precision}: whole estimate vs peak of a forward pass, ctx {CONTEXT}",
                    "peak <= estimate <= peak +15%",
                    f"estimate {b(est.total_bytes)} ({pct(est.total_bytes, peak)} of peak {b(peak)}); "
                    f"KV {b(est.kv_cache_bytes)}, activations {b(est.activation_bytes)}, "
                    f"context {b(est.cuda_context_bytes)}; {sampler.samples} samples",
                    verdict(covers_peak(est.total_bytes, peak, max_over=PEAK_MAX_OVER))))
    t0 = time.monotonic()
    u = A.unload(ctl, mid)
    unload_s = time.monotonic() - t0
    now = g.nv.used()  # no waiting of our own: the controller's wait is what is checked
    held = now - before
    tol = reclaim_tolerance(est.weights_bytes)
    report_ok = abs(u.still_held_bytes - max(0, held)) <= tol
    rows.append(Row(f"{name} {precision}: unload gives the memory back (NVML)",
                    f"held <= {b(tol)} when unload returns; report within {b(tol)} of NVML",
                    f"held {b(held)} after {unload_s:.1f} s; report: {b(u.freed_bytes)} freed, "
                    f"{b(u.still_held_bytes)} held ({u.verdict}, by {u.measure})",
                    verdict(held <= tol and report_ok and mid not in A.loaded_ids(ctl))))
    return rows


def max_context_rows(ctl: Any, g: Gpu, shape: ArchShape) -> list[Row]:
    """A ballast leaves the memory for half the model's maximum context free; the controller's largest
    context must then run, and one 1,024 tokens beyond it must be refused before anything loads."""
    mid, cap = shape.model_id, shape.max_position_embeddings
    prof = A.profile("bf16", CONTEXT, "cuda", g.index)
    target_free = A.estimate(ctl, mid, prof.with_(context_tokens=cap // 2)).total_bytes
    rows: list[Row] = []
    with Ballast(target_free, g.index):
        free_now = g.nv.memory()[2]
        ctx = A.max_context(ctl, mid, prof)
        rows.append(Row(f"largest context that fits {b(free_now)} free ({shape.name} bf16)",
                        f"0 < ctx < the model's {cap}", f"ctx {ctx}", verdict(0 < ctx < cap)))
        if not 0 < ctx < cap:
            return rows
        big = prof.with_(context_tokens=min(ctx + 1024, cap))
        p = A.plan(ctl, mid, big)
        before = g.nv.settle()
        refused, detail = False, "it was applied"
        try:
            A.apply(ctl, p)
        except Exception as exc:  # noqa: BLE001 - the refusal is the outcome we want; anything else is shown
            refused, detail = A.is_refusal(exc), f"{type(exc).__name__}: {str(exc)[:100]}"
        grew = g.nv.settle() - before
        loaded = A.loaded_ids(ctl)
        _cleanup(ctl)
        rows.append(Row(f"plan refuses ctx {big.context_tokens} before loading", "fits=False, refused, nothing loaded",
                        f"fits={p.fits}; {detail}; loaded {loaded or 'nothing'}; device memory {b(grew)}",
                        verdict(not p.fits and refused and not loaded and abs(grew) < NO_LOAD_GROWTH_BYTES)))
        p = A.plan(ctl, mid, prof.with_(context_tokens=ctx))
        if not p.fits:
            rows.append(Row(f"forward pass at the largest context ({ctx})", "the plan fits", "the plan does not fit",
                            Verdict.FAIL))
            return rows
        A.apply(ctl, p)
        prompt = A.prompt_of_tokens(A.model_path(ctl, mid), ctx - 1)
        ok, detail = True, "ran"
        try:
            with PeakSampler(g.nv.used) as sampler:
                A.forward(ctl, mid, prompt)
            detail = f"ran; device peak {b(sampler.peak)} of {b(g.nv.memory()[0])}"
        except Exception as exc:  # noqa: BLE001 - an OOM here is the failure this row exists to catch
            ok, detail = False, f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(Row(f"forward pass at the largest context ({ctx} tokens)", "no out-of-memory", detail, verdict(ok)))
        _cleanup(ctl)
    return rows


def recommendation_gpu_rows(ctl: Any, g: Gpu, shape: ArchShape) -> list[Row]:
    rows: list[Row] = []
    for leave in (7 * GIB, 5 * GIB, 3 * GIB):
        with Ballast(leave, g.index):
            free = g.nv.memory()[2]
            rows.extend(recommendation_rows(ctl, "GPU", free, shape.model_id, "cuda", g.index)[:1])
    with Ballast(5 * GIB, g.index):  # fp16 weights of the ~3.6 B model do not fit 5 GiB: int8 must be chosen
        free = g.nv.memory()[2]
        rows.extend(recommendation_rows(ctl, "GPU", free, shape.model_id, "cuda", g.index)[1:])
    return rows


def clear_rows(ctl: Any, g: Gpu, shape: ArchShape) -> list[Row]:
    """Clear with a model loaded gives back the cache (the model stays); emergency clear leaves nothing of
    ours but the CUDA context, and never touches another process's memory (a ballast of 512 MiB)."""
    mid = shape.model_id
    prof = A.profile("bf16", CONTEXT, "cuda", g.index)
    est = A.estimate(ctl, mid, prof)
    tol = reclaim_tolerance(est.weights_bytes)
    rows: list[Row] = []
    with Ballast(max(0, g.nv.memory()[2] - 512 * MIB), g.index) as other:
        start = g.nv.settle()
        A.apply(ctl, A.plan(ctl, mid, prof))
        loaded = g.nv.settle()
        A.forward(ctl, mid, A.prompt_of_tokens(A.model_path(ctl, mid), CONTEXT - 1))
        cached = g.nv.settle() - loaded
        A.clear(ctl)
        above = g.nv.settle() - loaded
        rows.append(Row(f"clear with {shape.name} loaded: the cache goes, the model stays",
                        f"within {b(tol)} of the loaded state", f"{b(cached)} cached by a forward pass; "
                        f"{b(above)} above the loaded state after clear; loaded {A.loaded_ids(ctl)}",
                        verdict(above <= tol and mid in A.loaded_ids(ctl))))
        em = A.emergency_clear(ctl)
        held = g.nv.settle() - start
        procs = g.nv.processes()
        mine = procs.get(os.getpid())
        ours = "" if not procs else f"; NVML: this process {b(mine)} (context {b(g.floor - g.used0)})"
        other_ok = other.alive() and (not procs or other.pid in procs or not any(
            os.path.exists(f"/proc/{pid}") for pid in procs))
        rows.append(Row("emergency clear: nothing of ours left, the other holder untouched",
                        f"held <= {b(tol)} beyond our CUDA context; ballast pid {other.pid} alive and listed",
                        f"held {b(held)}; outcome {em.outcome} ({', '.join(em.steps)}); "
                        f"loaded {A.loaded_ids(ctl) or 'nothing'}{ours}; ballast {'alive' if other.alive() else 'GONE'}; "
                        f"report: {em.verdict or '—'}",
                        verdict(held <= tol and not A.loaded_ids(ctl) and other_ok)))
    return rows


def run(settings: Any, nv: Nvml, shapes: list[ArchShape]) -> list[Row]:
    small, large = shapes[0], shapes[-1]
    g = Gpu(nv, 0, nv.settle())
    ctl = A.make_controller(settings)
    have_bnb, why = bnb_available()
    rows: list[Row] = []
    guarded(rows, "CUDA warm-up", lambda: context_rows(g, settings, have_bnb), lambda: None)
    guarded(rows, "probe (GPU)", lambda: probe_rows(ctl, g), lambda: None)
    guarded(rows, "memctl CLI", lambda: cli_rows(ctl, small.model_id, A.profile("bf16", CONTEXT, "cuda", 0),
                                                  "gpu:0", lambda: nv.memory()[2]), lambda: None)
    for shape in shapes:
        for precision in PRECISIONS:
            if precision in QUANTISED and not have_bnb:
                for what in ("weights estimate vs NVML-measured load", "whole estimate vs peak of a forward pass",
                             "unload gives the memory back (NVML)"):
                    rows.append(not_run(f"{shape.name} {precision}: {what}", "", why))
                continue
            guarded(rows, f"{shape.name} {precision}", lambda s=shape, p=precision: precision_rows(ctl, g, s, p),
                    lambda: _cleanup(ctl))
    guarded(rows, "largest context", lambda: max_context_rows(ctl, g, small), lambda: _cleanup(ctl))
    guarded(rows, "recommendation (GPU)", lambda: recommendation_gpu_rows(ctl, g, large), lambda: None)
    guarded(rows, "clear / emergency clear", lambda: clear_rows(ctl, g, small), lambda: _cleanup(ctl))
    guarded(rows, "memctl server", lambda: server_rows(ctl, settings, small.model_id,
                                                    A.profile("bf16", CONTEXT, "cuda", g.index)), lambda: _cleanup(ctl))
    return rows
