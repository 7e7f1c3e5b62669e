"""``memctl models`` and ``memctl estimate``: functions in-process, and the real command as a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memctl_cli import models as cli_models
from memory_controller import estimate as est
from memory_controller.catalog import resolve_model
from memory_controller.errors import InvalidModelIdError, ModelNotFoundError
from memory_controller.settings import load_settings
from memory_controller.types import Precision, Profile
from memory_controller.units import GIB
from tests import model_factory as mf
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID

ROOT = Path(__file__).resolve().parent.parent


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="memctl")
    cli_models.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _run(argv: list[str], settings, capsys) -> tuple[int, str]:
    args = _parse(argv)
    code = args.func(args, settings)
    return code, capsys.readouterr().out


def test_models_json_lists_the_cache_and_its_warnings(hf_settings, hf_cache, capsys):
    code, out = _run(["models", "--json"], hf_settings, capsys)
    data = json.loads(out)
    assert code == 0
    assert data["cache_dir"] == str(hf_cache)
    ids = [m["model_id"] for m in data["models"]]
    assert TINY_ID in ids and TINY_UNTIED_ID in ids
    tiny = next(m for m in data["models"] if m["model_id"] == TINY_ID)
    assert tiny["has_safetensors"] is True and tiny["architecture"] == "LlamaForCausalLM"
    assert any("broken" in w for w in data["warnings"])


def test_models_table_shows_each_model_and_warnings(hf_settings, capsys):
    code, out = _run(["models"], hf_settings, capsys)
    assert code == 0
    assert TINY_ID in out and "LlamaForCausalLM" in out and "safetensors" in out
    assert "warning:" in out and "broken" in out


def test_models_with_no_cache_says_so_and_succeeds(tmp_path, capsys):
    settings = load_settings(hf_cache_dir=tmp_path / "none", local_model_dirs=[])
    code, out = _run(["models"], settings, capsys)
    assert code == 0 and "No models found." in out and "does not exist" in out


def test_estimate_json_matches_the_estimator(hf_settings, capsys):
    # context 2048: the model's own maximum (over it is an argument error, exit 2)
    code, out = _run(["estimate", TINY_UNTIED_ID, "--dtype", "nf4", "--double-quant", "--context", "2048",
                      "--batch", "2", "--device", "cpu", "--json"], hf_settings, capsys)
    assert code == 0
    data = json.loads(out)
    profile = Profile("transformers", Precision.NF4, 2048, 2, double_quant=True, device="cpu")
    expected = est.estimate(resolve_model(TINY_UNTIED_ID, hf_settings), profile, hf_settings)
    for key in ("weights_bytes", "kv_cache_bytes", "activation_bytes", "cuda_context_bytes", "total_bytes"):
        assert data[key] == getattr(expected, key)
    assert data["profile"]["precision"] == "nf4" and data["profile"]["double_quant"] is True
    assert data["source"] == "safetensors_headers" and "summary" in data


def test_estimate_with_free_memory_prints_the_largest_context(hf_settings, capsys):
    model = resolve_model(TINY_ID, hf_settings)
    profile = Profile("transformers", Precision.BF16, 2048, 1, device="cuda")
    expected = est.max_context_that_fits(model, int(0.6 * GIB), profile, hf_settings)
    code, out = _run(["estimate", TINY_ID, "--free-gib", "0.6", "--device", "cuda", "--json"], hf_settings, capsys)
    assert code == 0 and json.loads(out)["max_context_that_fits"] == expected
    code, out = _run(["estimate", TINY_ID, "--free-gib", "0.1", "--device", "cuda"], hf_settings, capsys)
    assert "does not fit" in out  # 0.5 GiB CUDA context alone is more than 0.1 GiB


def test_estimate_table_shows_the_breakdown(hf_settings, capsys):
    code, out = _run(["estimate", TINY_ID, "--dtype", "int8", "--device", "cpu"], hf_settings, capsys)
    assert code == 0
    for label in ("weights", "KV cache", "activations", "CUDA context", "total", "safetensors_headers"):
        assert label in out


def test_estimate_of_unknown_or_tricky_ids_raises_project_errors(hf_settings):
    with pytest.raises(ModelNotFoundError):
        args = _parse(["estimate", "memctl-test/absent"])
        args.func(args, hf_settings)
    with pytest.raises(InvalidModelIdError):
        args = _parse(["estimate", "../../etc/passwd"])
        args.func(args, hf_settings)


@pytest.mark.parametrize("argv", [
    ["estimate", TINY_ID, "--dtype", "int4"], ["estimate", TINY_ID, "--context", "0"],
    ["estimate", TINY_ID, "--batch", "-1"], ["estimate", TINY_ID, "--device", "tpu"],
    ["estimate", TINY_ID, "--free-gib", "-2"],
])
def test_bad_arguments_exit_with_code_2(argv):
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2


def _memctl(args: list[str], hub: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **mf.hf_env(hub)}
    return subprocess.run([sys.executable, "-m", "memctl_cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_memctl_models_and_estimate_run_as_commands(hf_cache):
    proc = _memctl(["models", "--json"], hf_cache)
    assert proc.returncode == 0, proc.stderr
    assert TINY_ID in [m["model_id"] for m in json.loads(proc.stdout)["models"]]

    proc = _memctl(["estimate", TINY_ID, "--dtype", "fp32", "--context", "100", "--device", "cpu", "--json"],
                   hf_cache)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 100 * 4

    proc = _memctl(["estimate", "memctl-test/absent"], hf_cache)
    assert proc.returncode == 1
    assert "not in the Hugging Face cache" in proc.stderr and "hint:" in proc.stderr


def test_memctl_models_warns_of_a_truncated_model_with_the_fix(bad_settings, bad_models, capsys):
    """Issue 20.3: `memctl models` listed a truncated model with no warning."""
    code, out = _run(["models"], bad_settings, capsys)
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith(f"warning: {bad_models['truncated']}:"))
    assert "truncated" in line and "download it again" in line, line
