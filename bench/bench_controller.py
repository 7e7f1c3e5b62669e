"""A Transformers → Transformers switch through the controller vs unload(A) + load(B) alone.

Goal (issue): switch ≤ unload(A) + load(B) + 0.5 s, measured in the same run. Two ~0.5 B bf16
models are built offline into a temporary HF cache (deleted afterwards). Each round:
  1. the controller switches A → B (timed: the whole apply, six steps incl. a 4-token verify),
  2. the controller switches back B → A (not timed),
  3. the backend alone: unload(A), then load(B) (each timed), then unload(B), load(A) for the next round.
Medians of 3 rounds. Run: .venv/bin/python bench/bench_controller.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from memory_controller import MemoryController  # noqa: E402
from memory_controller.settings import load_settings  # noqa: E402
from memory_controller.types import Precision, Profile  # noqa: E402
from tests import model_factory as mf  # noqa: E402

ROUNDS = 3
PROFILE = Profile(mode="transformers", precision=Precision.BF16, context_tokens=512, batch=1, device="cpu")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="memctl-bench-ctl."))
    try:
        hub = work / "hub"
        hub.mkdir()
        t0 = time.perf_counter()
        mf.build_into_cache(hub, "bench-a", mf.BENCH_05B, seed=1)
        mf.build_into_cache(hub, "bench-b", mf.BENCH_05B, seed=2)
        build_s = time.perf_counter() - t0
        a, b = f"{mf.TEST_ORG}/bench-a", f"{mf.TEST_ORG}/bench-b"
        settings = load_settings(hf_cache_dir=hub, state_dir=work / "state", local_model_dirs=[],
                                 docker_host="unix:///nonexistent/docker.sock")
        ctl = MemoryController(settings)
        ca, cb = ctl.resolve(a), ctl.resolve(b)
        tf = ctl.backend("transformers")  # the same backend the controller drives (public registry)
        ctl.apply("transformers", a, PROFILE)  # warm-up: imports, first-load overhead

        switch_s, unload_s, load_s, steps = [], [], [], []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            rec = ctl.apply("transformers", b, PROFILE)
            switch_s.append(time.perf_counter() - t)
            steps.append({s.name: s.duration_s for s in rec.steps})
            ctl.apply("transformers", a, PROFILE)
            # the same work by hand, straight on the backend
            t = time.perf_counter()
            tf.stop(a)
            unload_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            tf.start(cb, PROFILE, None)
            load_s.append(time.perf_counter() - t)
            tf.stop(b)
            tf.start(ca, PROFILE, None)  # what runs is read back from the backend: nothing to tell
        ctl.emergency_clear()

        med = statistics.median
        sw, ul, ld = med(switch_s), med(unload_s), med(load_s)
        overhead = sw - (ul + ld)
        lines = [
            "# bench_controller: Transformers → Transformers switch (two ~0.5 B bf16 models, CPU)",
            f"models built in {build_s:.1f} s; {ROUNDS} rounds, medians",
            f"switch A→B through apply():           {sw:.3f} s",
            f"unload(A) alone:                      {ul:.3f} s",
            f"load(B) alone (weights touched):      {ld:.3f} s",
            f"switch − (unload + load):             {overhead:+.3f} s (goal ≤ +0.5 s)",
            f"switch / (unload + load):             {sw / (ul + ld):.3f}",
            "apply steps (median s): " + ", ".join(
                f"{k} {med([s.get(k, 0.0) for s in steps]):.3f}" for k in steps[0]),
            f"goal met: {overhead <= 0.5}",
        ]
        out = "\n".join(lines)
        print(out)
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / "controller.txt").write_text(out + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
