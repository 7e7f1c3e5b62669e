"""Bench: ``apply`` of a bf16 model on the CPU versus the plain path, like for like (issue 20).

Run: ``.venv/bin/python bench/bench_apply.py [--rounds N]`` (about 1 minute on 2 cores).

The model is the ~0.48 B-parameter bf16 Llama layout of ``tests.model_factory.BENCH_05B`` (the size the
issue measured), written offline as a *sparse* safetensors file (zeros: made in a second, no 1 GB of
random weights to generate on a shared 2-core machine) plus a tokenizer. Zeros cost the same as real
weights here: every page is read and every matmul runs in full.

In one process, alternating (plain, apply, plain, apply ...) after one warm-up of each:

* plain = ``AutoModelForCausalLM.from_pretrained`` (bf16) + a read of every weight page + a 1-token
  greedy ``generate``, tokenizer loaded; its generate runs on a fresh worker thread, as apply's verify
  does (the yardstick), and also on the main thread (shown: under load a main-thread generate was
  measured several times slower, an OpenMP effect, which would flatter apply);
* apply = ``MemoryController.apply("transformers", model, bf16 on cpu)``: unload, clear, check, switch,
  prepare (load + touch), verify (a 1-token generation through the streaming path); then an unload
  (not counted).

Prints the medians, the per-step medians, apply / plain and apply − plain against the goals
(≤ +0.2 s, then ≤ +0.1 s). Figures also go to ``bench/results/apply.txt``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from memory_controller.controller import MemoryController  # noqa: E402
from memory_controller.settings import load_settings  # noqa: E402
from memory_controller.types import Precision, Profile  # noqa: E402
from tests import model_factory as mf  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "apply.txt"
GOALS_S = (0.2, 0.1)
_lines: list[str] = []


def out(line: str = "") -> None:
    print(line, flush=True)
    _lines.append(line)


def build(hub: Path) -> str:
    with tempfile.TemporaryDirectory(dir=hub.parent) as tmp:
        mf.write_sparse_llama(Path(tmp), mf.BENCH_05B)
        mf.train_tokenizer().save_pretrained(tmp)
        mf.add_to_hf_cache(Path(tmp), hub, f"{mf.TEST_ORG}/half-b-llama")
    return f"{mf.TEST_ORG}/half-b-llama"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.transformers.memory import touch_weights

    work = Path(tempfile.mkdtemp(prefix="memctl-bench-apply-"))
    try:
        hub = work / "hub"
        hub.mkdir()
        mid = build(hub)
        settings = load_settings(hf_cache_dir=hub, local_model_dirs=[])
        ctl = MemoryController(settings)
        snap = ctl.resolve(mid).path
        profile = Profile("transformers", Precision.BF16, 2048, 1, device="cpu")

        def plain(on_thread: bool = True) -> float:
            t = time.perf_counter()
            m = AutoModelForCausalLM.from_pretrained(snap, dtype=torch.bfloat16, local_files_only=True)
            m.eval()
            touch_weights(m)
            tok = AutoTokenizer.from_pretrained(snap)
            ids = torch.tensor([tok("def hello():")["input_ids"]])

            def generate(model=m) -> None:
                with torch.inference_mode():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                   do_sample=False, pad_token_id=tok.pad_token_id)

            if on_thread:
                worker = threading.Thread(target=generate)
                worker.start()
                worker.join()
            else:
                generate()
            dt = time.perf_counter() - t
            del m, generate
            gc.collect()  # not counted: the plain path's own clean-up
            return dt

        def apply() -> tuple[float, dict[str, float]]:
            t = time.perf_counter()
            rec = ctl.apply("transformers", mid, profile)
            dt = time.perf_counter() - t
            t = time.perf_counter()
            ctl.unload(mid)
            return dt, {**{s.name: s.duration_s for s in rec.steps}, "(unload after, not counted)": time.perf_counter() - t}

        plain()
        plain(on_thread=False)
        apply()  # warm-up: imports, the first full garbage collection, one-time set-up
        rows: list[tuple[float, float, dict[str, float]]] = []
        main_thread: list[float] = []
        for _ in range(args.rounds):
            p = plain()
            a, steps = apply()
            main_thread.append(plain(on_thread=False))
            rows.append((p, a, steps))
        med_p = statistics.median(r[0] for r in rows)
        med_a = statistics.median(r[1] for r in rows)
        ratio = statistics.median(r[1] / r[0] for r in rows)
        delta = statistics.median(r[1] - r[0] for r in rows)
        out(f"apply vs plain, {mid} (BENCH_05B layout, ~0.48 B params, bf16, sparse file), CPU, "
            f"{args.rounds} alternating rounds after a warm-up, medians")
        out(f"  plain (from_pretrained + touch + 1-token generate on a worker thread)  {med_p:.3f} s")
        out(f"  plain, generate on the main thread (not the yardstick)               {statistics.median(main_thread):.3f} s")
        out(f"  apply (unload, clear, check, switch, prepare, verify) {med_a:.3f} s")
        for name in rows[0][2]:
            out(f"    {name:<13} {statistics.median(r[2].get(name, 0.0) for r in rows):.3f} s")
        out(f"  ratio apply / plain (median of pairs) {ratio:.2f}x")
        out(f"  apply − plain (median of pairs)       {delta:+.3f} s   goal ≤ +{GOALS_S[0]} s, then ≤ +{GOALS_S[1]} s: "
            + ("both met" if delta <= GOALS_S[1] else "first met" if delta <= GOALS_S[0] else "NOT met"))
        out("  samples (plain, apply): " + ", ".join(f"({p:.3f}, {a:.3f})" for p, a, _ in rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(_lines) + "\n")


if __name__ == "__main__":
    main()
