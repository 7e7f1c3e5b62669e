"""The GPU acceptance check (scripts/gpu-check.sh, bench/gpu_check): its verdict logic, and a whole run on
this machine, which has no GPU (it must say so, run the CPU-side rows, print the table)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench.gpu_check.common import guide_band, reclaim_tolerance
from bench.gpu_check.table import Row, Verdict, covers_peak, exit_code, not_run, render, verdict, within

from memory_controller.units import GIB, MIB

ROOT = Path(__file__).resolve().parents[1]

# Rows the CPU run is known to fail, for a reason outside the check; empty: every CPU row must pass.
# (Fixed: a bitsandbytes load on the CPU kept the whole 16-bit weight file mapped and resident, int8
# +73-123 % and nf4 +93-210 % over the estimate; its verify pass then left nf4's temporaries in the heap,
# +24-42 %. Now 0-2 % off: see tests/test_transformers_memory.py.)
KNOWN_CPU_FINDINGS: set[str] = set()


# --------------------------------------------------------------------------- verdict logic
def test_peak_row_fails_when_the_estimate_falls_short_or_overshoots():
    peak = 10 * GIB
    assert covers_peak(peak, peak)
    assert covers_peak(int(peak * 1.15), peak)
    assert not covers_peak(peak - 1, peak)  # one byte short: an OOM the product promised to prevent
    assert not covers_peak(int(peak * 1.15) + 1, peak)  # too generous: memory wasted
    assert not covers_peak(5 * GIB, 0)  # nothing measured is not a pass


def test_within_uses_the_larger_of_relative_and_absolute_tolerance():
    assert within(102, 100, rel=0.02)
    assert not within(102.01, 100, rel=0.02)
    assert within(97.99, 100, rel=0.02, abs_bytes=3)
    assert not within(96, 100, rel=0.02, abs_bytes=3)


def test_cpu_weights_rows_allow_less_below_the_estimate_than_above_it():
    from bench.gpu_check.cpu_checks import weights_ok

    est = 100 * MIB  # small: the absolute margins apply (2 % = 2 MiB)
    assert weights_ok(est + 4 * MIB, est) and not weights_ok(est + 4 * MIB + 1, est)  # over: runs out of memory
    assert weights_ok(est - 8 * MIB, est) and not weights_ok(est - 8 * MIB - 1, est)
    big = 1 * GIB  # large: 2 % both ways
    assert weights_ok(int(big * 1.02), big) and not weights_ok(int(big * 1.02) + 1, big)
    assert not weights_ok(int(est * 1.24), est)  # the untrimmed nf4 verify pass (+24 %) fails


def test_reclaim_tolerance_is_64_mib_or_two_percent():
    assert reclaim_tolerance(1 * GIB) == 64 * MIB
    assert reclaim_tolerance(10 * GIB) == int(0.2 * GIB)


def test_one_failed_row_makes_the_exit_code_non_zero_and_rows_not_run_do_not():
    ok = Row("a", "1", "1", verdict(True))
    bad = Row("b", "1", "2", verdict(False))
    skipped = not_run("c", "x", "no GPU")
    assert exit_code([ok, skipped]) == 0
    assert exit_code([ok, bad, skipped]) == 1
    text = render([ok, bad, skipped])
    assert text.splitlines()[0].split() == ["check", "expected", "measured", "verdict"]
    assert "not run: no GPU" in text
    assert text.splitlines()[-1] == "1 passed, 1 failed, 1 not run"


def test_guide_bands_at_their_edges():
    assert guide_band(8 * GIB, True, False).band == "vllm_full"
    assert guide_band(8 * GIB - 1, True, False).band == "vllm_limited"
    assert guide_band(6 * GIB - 1, True, False).band == "transformers_fp16"
    low = guide_band(4 * GIB - 1, True, False)
    assert (low.band, low.precision, low.context) == ("transformers_int8", "int8", 512)
    # vLLM unavailable: the first Transformers row; on the CPU fp16 becomes bf16
    assert guide_band(9 * GIB, False, True) == guide_band(5 * GIB, False, True)
    assert guide_band(5 * GIB, False, True).precision == "bf16"


# --------------------------------------------------------------------------- the script
def test_script_stops_with_exit_2_and_says_what_is_missing_on_a_python_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = dict(os.environ, MEMCTL_GPU_PYTHON=str(venv / "bin" / "python"), MEMCTL_GPU_WHEELS=str(tmp_path / "none"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "lacks: torch transformers accelerate safetensors huggingface_hub psutil" in proc.stderr
    assert "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_whole_check_without_a_gpu_runs_the_cpu_rows_and_prints_the_table(tmp_path):
    out_json = tmp_path / "rows.json"
    env = dict(os.environ, MEMCTL_GPU_PYTHON=sys.executable, MEMCTL_GPU_WHEELS=str(tmp_path / "none"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--json", str(out_json)], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "No NVIDIA GPU:" in proc.stdout
    assert "The GPU rows are not run; the CPU-side checks follow." in proc.stdout
    assert "check" in proc.stdout and "verdict" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["gpu"] is False
    rows = data["rows"]
    cpu_rows = [r for r in rows if r["verdict"] != Verdict.NOT_RUN.value]
    not_run_rows = [r for r in rows if r["verdict"] == Verdict.NOT_RUN.value]
    checks = {r["check"] for r in cpu_rows}
    # every CPU-side area of the brief is there
    for expected in ("probe: host total/free vs /proc/meminfo", "memctl status: free on host",
                     "qwen2-small-random bf16: weights estimate vs CPU load",
                     "llama-small-untied-random fp16: unload gives host memory back",
                     "recommendation, 3.000 GiB free (host budget)",
                     "model-aware lowering, llama-small-untied-random (host budget)"):
        assert expected in checks, sorted(checks)
    assert any(c.startswith("plan refuses ctx") for c in checks)
    assert any(c.startswith("largest context that fits") for c in checks)
    # the GPU rows say why they did not run
    gpu_rows = [r for r in not_run_rows if not r["check"].startswith("streamed chat")]
    assert gpu_rows and all(r["reason"] == "no GPU" for r in gpu_rows)
    assert any("forward pass" in r["check"] for r in gpu_rows)
    # the server row runs on the CPU once server/openai_api exists; until then it says why not
    server = [r for r in rows if r["check"].startswith("streamed chat through the memctl server")]
    assert len(server) == 1
    if not (ROOT / "server" / "openai_api").is_dir():
        assert server[0]["reason"] == "no server/openai_api in this checkout (the serving issue has not landed)"
    else:
        assert server[0]["verdict"] == Verdict.PASS.value, server[0]
    # with bitsandbytes installed (CI's venv has it) the quantised rows ran, and pass below
    if importlib.util.find_spec("bitsandbytes") is not None:
        for model in ("qwen2-small-random", "llama-small-untied-random"):
            for p in ("int8", "nf4"):
                assert f"{model} {p}: weights estimate vs CPU load" in checks
    failed = {r["check"] for r in cpu_rows if r["verdict"] == Verdict.FAIL.value}
    assert failed == KNOWN_CPU_FINDINGS & checks, [r for r in cpu_rows if r["verdict"] == Verdict.FAIL.value]
    assert proc.returncode == (1 if failed else 0)
