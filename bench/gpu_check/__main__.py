"""``python -m bench.gpu_check`` (run by ``scripts/gpu-check.sh``): build the models, run the rows, print the table.

Exit 0 when no row fell short (also on a machine without a GPU, after the CPU-side rows), 1 when one
did, 2 when the check could not start (e.g. the models could not be built).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

GPU_ONLY_ROWS = (
    ("probe vs torch.cuda.mem_get_info; this process among holders", "±1%"),
    ("weights estimate vs NVML-measured load (fp16, bf16, int8, nf4)", "±2%"),
    ("whole estimate vs peak during a forward pass", "peak <= estimate <= peak +15%"),
    ("largest context that fits: forward pass without OOM", "no OOM"),
    ("unload: NVML back within the controller's wait", "max(64 MiB, 2%)"),
    ("clear / emergency clear: nothing of ours left (NVML)", "context only"),
)


def _isolate(workdir: Path) -> Path:
    """Point memctl and huggingface_hub at the check's own cache and state; drop the user's MEMCTL_* settings."""
    for key in [k for k in os.environ if k.startswith("MEMCTL_")]:
        del os.environ[key]
    hub = workdir / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    (workdir / "config.toml").write_text("# the GPU check's empty user settings\n")
    os.environ.update({
        "HF_HOME": str(workdir), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false", "MEMCTL_HF_CACHE_DIR": str(hub), "MEMCTL_STATE_DIR": str(workdir / "state"),
        "MEMCTL_CONFIG_FILE": str(workdir / "config.toml"), "MEMCTL_LANGUAGE": "en",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
    })
    return hub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu-check", description="memctl's GPU acceptance check")
    ap.add_argument("--small", action="store_true", help="small model shapes on a GPU too (a quick run)")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (models, operation log)")
    args = ap.parse_args(argv)

    import torch

    from .measure import Nvml
    from .models import LLAMA_3B, LLAMA_SMALL, QWEN2_1_5B, QWEN2_SMALL, build_in_child
    from .table import Row, not_run, render
    from .table import exit_code as table_exit_code

    nv, why = Nvml.open(0)
    cuda = False
    if nv is not None:
        try:
            cuda = bool(torch.cuda.is_available())
        except Exception as exc:  # noqa: BLE001 - a broken CUDA install: no GPU for this check
            why = f"torch cannot use CUDA ({exc})"
        if not cuda and not why:
            why = f"NVML sees a GPU but torch {torch.__version__} has no CUDA (a CPU build?)"
    gpu = nv is not None and cuda
    head = [f"memctl GPU check — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"python {platform.python_version()}, torch {torch.__version__}, host {platform.node()}"]
    if gpu:
        head.append(f"GPU 0: {nv.name()}, driver {nv.driver()}, {nv.memory()[0] / 2**30:.1f} GiB")
    else:
        head.append(f"No NVIDIA GPU: {why}. The GPU rows are not run; the CPU-side checks follow.")
    print("\n".join(head), flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="memctl-gpu-check-"))
    rows: list[Row] = []
    try:
        hub = _isolate(workdir)
        shapes = [QWEN2_1_5B, LLAMA_3B] if gpu and not args.small else [QWEN2_SMALL, LLAMA_SMALL]
        t0 = time.monotonic()
        try:
            build_in_child(shapes, hub, "cuda" if gpu else "cpu")
        except Exception as exc:  # noqa: BLE001 - nothing can be checked without the models
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"built {', '.join(s.model_id for s in shapes)} in {time.monotonic() - t0:.0f} s", flush=True)
        from . import adapter as A

        settings = A.make_settings()
        if gpu:
            from . import gpu_checks

            rows = gpu_checks.run(settings, nv, shapes)
        else:
            from . import cpu_checks

            rows = cpu_checks.run(settings)
            rows += [not_run(check, expected, "no GPU") for check, expected in GPU_ONLY_ROWS]
        table = render(rows)
        print(table)
        if args.out:
            args.out.write_text("\n".join(head) + "\n" + table + "\n")
        if args.json:
            args.json.write_text(json.dumps({"gpu": gpu, "head": head, "rows": [
                {"check": r.check, "expected": r.expected, "measured": r.measured, "verdict": r.verdict.value,
                 "reason": r.reason} for r in rows]}, indent=2))
        return table_exit_code(rows)
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
