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


# --------------------------------------------------------------------------- issue 20.11: the CLI's edges
def test_version_prints_the_package_version():
    import tomllib

    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    p = run_cli("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"memctl {want}"


def test_output_into_a_closed_pipe_ends_quietly_with_141(tmp_path):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has gone: every write fails with EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "memctl_cli", "models", "--json"], cwd=ROOT,
                           env=subprocess_env(MEMCTL_STATE_DIR=str(tmp_path), MEMCTL_HF_CACHE_DIR=str(tmp_path)),
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert p.returncode == 141, p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr


def test_unloading_a_model_that_is_not_loaded_exits_1_not_2(tmp_path):
    p = run_cli("unload", "memctl-test/not-loaded", MEMCTL_STATE_DIR=str(tmp_path))
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "is not loaded" in p.stderr and "Traceback" not in p.stderr
    bad = run_cli("unload", "../etc", MEMCTL_STATE_DIR=str(tmp_path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr  # a malformed name stays a bad argument


def test_containers_json_with_docker_down_says_docker_is_unavailable(tmp_path):
    p = run_cli("containers", "--json", MEMCTL_STATE_DIR=str(tmp_path),
                MEMCTL_DOCKER_HOST=f"unix://{tmp_path}/docker.sock")
    assert p.returncode == 1
    err = json.loads(p.stdout)
    assert err["error"] == "DockerUnavailableError" and err["code"] == "docker_unavailable"
    assert err["advice"] is None  # not "a container does not stop"
    assert "Docker daemon is not running" in err["message"] and "start Docker" in err["hint"]


def test_stop_with_docker_down_says_docker_is_down_not_not_loaded(tmp_path):
    p = run_cli("stop", "memctl-vllm-org-tiny-llama", MEMCTL_STATE_DIR=str(tmp_path),
                MEMCTL_DOCKER_HOST=f"unix://{tmp_path}/docker.sock")
    assert p.returncode == 1
    assert "Docker daemon is not running" in p.stderr and "is not loaded" not in p.stderr
    assert "hint: start Docker" in p.stderr and "Traceback" not in p.stderr


def test_status_names_the_guides_row_by_its_label(tmp_path):
    p = run_cli("status", MEMCTL_STATE_DIR=str(tmp_path), MEMCTL_DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert p.returncode == 0, p.stderr
    why = next(line for line in p.stdout.splitlines() if line.strip().startswith("why:"))
    assert "the guide's row “With " in why and "GB" in why
    assert "transformers_" not in why and "vllm_" not in why and "a row's name" not in why


def test_hints_name_the_environment_variable_a_user_sets():
    """Hints say MEMCTL_OLLAMA_HOST (what a user sets), never the settings field ``ollama_host``."""
    import re
    import tomllib

    import pytest

    from backends.ollama.client import parse_host
    from memory_controller.errors import SettingsError
    from memory_controller.settings import Settings

    with pytest.raises(SettingsError) as err:
        parse_host("ftp://127.0.0.1:11434")
    assert "MEMCTL_OLLAMA_HOST" in str(err.value) and "ollama_host" not in str(err.value).replace("MEMCTL_OLLAMA_HOST", "")
    fields = [f for f in Settings.model_fields if "_" in f]

    def strings(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    for lang in ("en", "ru"):
        catalog = tomllib.loads((ROOT / "config" / f"strings.{lang}.toml").read_text())
        named = [(f, s) for s in strings(catalog) for f in fields
                 if re.search(rf"(?<![A-Za-z_]){f}(?![A-Za-z_])", s)]
        assert named == [], named


def test_cli_error_lines_follow_the_language_setting(tmp_path):
    ru = run_cli("unload", "memctl-test/not-loaded", MEMCTL_STATE_DIR=str(tmp_path), MEMCTL_LANGUAGE="ru")
    assert ru.returncode == 1, ru.stderr
    assert "error: memctl-test/not-loaded не запущена." in ru.stderr, ru.stderr
    en = run_cli("unload", "memctl-test/not-loaded", MEMCTL_STATE_DIR=str(tmp_path), MEMCTL_LANGUAGE="en")
    assert "is not loaded" in en.stderr and "не запущена" not in en.stderr
    js = run_cli("unload", "memctl-test/not-loaded", "--json", MEMCTL_STATE_DIR=str(tmp_path),
                 MEMCTL_LANGUAGE="ru")
    assert "is not loaded" in json.loads(js.stdout)["message"]  # JSON stays language-neutral (English)
