"""A dashboard rerun with 2,000 cached models vs 10 (issue goal: within 2x).

Each size gets its own temporary HF cache of header-complete sparse models (bench_ui.build_cache) and a
child process running app.py in AppTest: one first run, then reruns (what Streamlit does on every click),
each timed around AppTest.run(). Run: .venv/bin/python bench/bench_many_models.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from bench_ui import _env, build_cache  # noqa: E402

SIZES = (10, 2000)
RERUNS = 7
GOAL_RATIO = 2.0

_CHILD = textwrap.dedent(r"""
    import json, sys, time
    sys.path.insert(0, {root!r})
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file({app!r}, default_timeout=300)
    t0 = time.perf_counter(); at.run(); first = time.perf_counter() - t0
    assert not at.exception, [e.message for e in at.exception]
    reruns = []
    for _ in range({reruns}):
        t0 = time.perf_counter(); at.run(); reruns.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({{"first": first, "reruns": reruns,
                                   "listed": len(at.selectbox(key="f_model").options)}}))
""")


def measure(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="memctl-bench-many-") as tmp:
        hub = Path(tmp) / "hf" / "hub"
        hub.mkdir(parents=True)
        build_cache(hub, n)
        code = _CHILD.format(root=str(ROOT), app=str(ROOT / "app.py"), reruns=RERUNS)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(Path(tmp), hub, ROOT),
                              capture_output=True, text=True, timeout=1200)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"bench child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(line[len("RESULT "):])


def main() -> None:
    res = {n: measure(n) for n in SIZES}
    small, big = (statistics.median(res[n]["reruns"]) for n in SIZES)
    ratio = big / small
    lines = [f"# bench_many_models: dashboard in AppTest, fake NVML (one GPU), {RERUNS} reruns each, medians"]
    for n in SIZES:
        r = res[n]
        lines.append(f"models={n:<5} listed {r['listed']:<5} first run {r['first'] * 1000:7.0f} ms   "
                     f"rerun {statistics.median(r['reruns']) * 1000:7.1f} ms")
    lines.append(f"rerun ratio {SIZES[1]}/{SIZES[0]}: {ratio:.2f} (goal <= {GOAL_RATIO:.0f}): "
                 f"{'met' if ratio <= GOAL_RATIO else 'NOT met'}")
    out = "\n".join(lines)
    print(out)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "many_models.txt").write_text(out + "\n")


if __name__ == "__main__":
    main()
