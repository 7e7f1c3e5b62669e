"""`memctl status` run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, subprocess_env


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memctl_cli", *args],
        cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=120,
    )


def test_status_json_with_no_gpu_shows_host_and_says_why(tmp_path):
    p = run_cli("status", "--json", MEMCTL_STATE_DIR=str(tmp_path))
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["gpu_available"] is False
    assert "not found" in data["no_gpu_reason"]
    (host,) = data["devices"]
    assert host["kind"] == "host" and host["total_bytes"] > 0
    assert data["recommendation"]["profile"]["device"] == "cpu"
    assert data["backends"]["vllm"]["available"] is False
    assert "NVIDIA GPU" in data["backends"]["vllm"]["reason"]
    assert data["recommendation"]["preferred_available"] is False
    assert "no NVIDIA GPU" in data["recommendation"]["preferred_reason"]


def test_status_text_with_two_fake_gpus(tmp_path):
    p = run_cli("status", MEMCTL_NVML_MODULE="tests.fake_pynvml", MEMCTL_FAKE_NVML="two_gpus",
                MEMCTL_STATE_DIR=str(tmp_path), MEMCTL_DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert p.returncode == 0, p.stderr
    assert "NVIDIA RTX A6000" in p.stdout and "NVIDIA GeForce RTX 3060" in p.stdout
    assert "🟢 gpu:1" in p.stdout
    assert "Recommended:" in p.stdout


def test_invalid_setting_exits_2_with_the_field_named(tmp_path):
    p = run_cli("status", MEMCTL_LANGUAGE="klingon", MEMCTL_STATE_DIR=str(tmp_path))
    assert p.returncode == 2
    assert "MEMCTL_LANGUAGE" in p.stderr and "klingon" in p.stderr
    assert "Traceback" not in p.stderr
