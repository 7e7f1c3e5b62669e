"""`memctl estimate` with hostile or careless arguments: a clear message and exit 2, never a traceback
nor a KV cache of billions of GiB; any case for --dtype; "did you mean" for a typo in the model id."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memctl_cli import models as cli_models
from tests import model_factory as mf
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID

ROOT = Path(__file__).resolve().parent.parent


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="memctl")
    cli_models.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _memctl(args: list[str], hub: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **mf.hf_env(hub), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "memctl_cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN", "Infinity", "1e400", "-1", "1e7", "lots"])
def test_free_gib_that_is_not_a_finite_amount_exits_2_with_a_message(value, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(["estimate", TINY_ID, f"--free-gib={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--free-gib" in err and "Traceback" not in err


def test_free_gib_inf_from_the_real_command_exits_2_without_a_traceback(hf_cache):
    proc = _memctl(["estimate", TINY_ID, "--free-gib", "inf"], hf_cache)
    assert proc.returncode == 2 and "finite" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("given", "expected"), [("BF16", "bf16"), ("Bf16", "bf16"), ("NF4", "nf4"),
                                                 ("fp32", "fp32"), (" INT8 ", "int8")])
def test_dtype_is_accepted_in_any_case(given, expected):
    assert _parse(["estimate", TINY_ID, "--dtype", given]).dtype == expected


@pytest.mark.parametrize("argv", [
    ["--dtype", "BF17"], ["--context", str(10**12)], ["--batch", str(10**5)], ["--batch", "257"],
    ["--context", "1e3"],
])
def test_out_of_range_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(["estimate", TINY_ID, *argv])
    assert info.value.code == 2 and argv[0] in capsys.readouterr().err


def test_a_context_over_the_models_maximum_exits_2_like_the_dashboards_blocker(hf_settings, capsys):
    args = _parse(["estimate", TINY_UNTIED_ID, "--context", "4096", "--device", "cpu"])
    assert args.func(args, hf_settings) == 2
    captured = capsys.readouterr()
    assert "exceeds the model's maximum of 2,048" in captured.err and "--context 2048" in captured.err
    assert "KV cache" not in captured.out
    args = _parse(["estimate", TINY_UNTIED_ID, "--context", "2049", "--device", "cpu", "--json"])
    assert args.func(args, hf_settings) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["code"] == "context_over_model_maximum" and data["args"]["max_positions"] == 2048
    args = _parse(["estimate", TINY_UNTIED_ID, "--context", "2048", "--device", "cpu"])
    assert args.func(args, hf_settings) == 0  # the maximum itself is fine


def test_the_huge_context_and_batch_of_the_report_exit_2_from_the_real_command(hf_cache):
    proc = _memctl(["estimate", TINY_ID, "--context", str(10**12), "--batch", str(10**5)], hf_cache)
    assert proc.returncode == 2 and "GiB" not in proc.stdout and "Traceback" not in proc.stderr
    proc = _memctl(["estimate", TINY_ID, "--context", "100000", "--device", "cpu"], hf_cache)
    assert proc.returncode == 2 and "maximum" in proc.stderr and "KV cache" not in proc.stdout


@pytest.mark.parametrize(("typo", "meant"), [("memctl-test/tiny-lama", TINY_ID),
                                             ("memctl-test/tiny-llama-untie", TINY_UNTIED_ID),
                                             ("Memctl-Test/Tiny-Llama", TINY_ID)])
def test_a_typo_in_the_model_id_gets_did_you_mean(hf_cache, typo, meant):
    proc = _memctl(["estimate", typo], hf_cache)
    assert proc.returncode == 1 and f"did you mean {meant}" in proc.stderr and "Traceback" not in proc.stderr


def test_the_recommendation_names_the_table_row_by_its_label_apart_from_the_precision_used():
    from memory_controller.settings import load_settings

    bands = load_settings().bands
    rec = {"band": "transformers_fp16", "reason": "23.06 GiB free on host memory → transformers_fp16",
           "profile": {"mode": "transformers", "precision": "bf16", "context_tokens": 1024, "batch": 1,
                       "device": "cpu"}}
    lines = cli_models.recommendation_lines(rec, bands)
    assert lines[0] == ("Recommended: Transformers (in-process), precision bf16, context 1,024 tokens, batch 1, "
                        "on cpu")
    assert lines[1] == "  why: 23.06 GiB free on host memory → the guide's row “With 4-6 GB free”"
    vllm = cli_models.recommendation_lines({**rec, "band": "vllm_full", "reason": "9 GiB free on GPU 0",
                                            "profile": {**rec["profile"], "mode": "vllm", "device": "cuda"}}, bands)
    assert vllm[0].startswith("Recommended: vLLM (Docker)") and "“With 8+ GB free”" in vllm[1]
    assert "vllm_full" not in vllm[1]
