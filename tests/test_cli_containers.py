"""``memctl containers / stop / stop-all`` against the private Docker engine and the fake vLLM image."""
# ruff: noqa: F811  (fixtures are imported explicitly and then named as test arguments)

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from memctl_cli import containers as cli_containers
from memctl_cli.output import fmt_duration
from memctl_cli.output import print_error as _print_error
from memory_controller.errors import MemctlError
from memory_controller.types import Precision, Profile
from tests.conftest import ROOT, subprocess_env
from tests.fixtures_docker import free_port, make_cached_model, make_vllm_backend, vllm_start

GIB = 1024**3
FP16 = Profile(mode="vllm", precision=Precision.FP16, context_tokens=1024, batch=2)


pytestmark = pytest.mark.usefixtures("english_cli")  # these tests assert the CLI's English text


def memctl(*argv: str, docker_host: str, settings=None) -> subprocess.CompletedProcess:
    """Run ``python -m memctl_cli ARGV`` against ``docker_host`` (with the vLLM image and port of ``settings``:
    a container started under other settings is listed as failed)."""
    same = {} if settings is None else {"MEMCTL_VLLM_IMAGE": settings.vllm_image, "MEMCTL_VLLM_TAG": settings.vllm_tag,
                                        "MEMCTL_VLLM_PORT": str(settings.vllm_port)}
    return subprocess.run([sys.executable, "-m", "memctl_cli", *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=60,
                          env=subprocess_env(MEMCTL_DOCKER_HOST=docker_host, MEMCTL_NVML_MODULE="tests.fake_pynvml",
                                             MEMCTL_FAKE_NVML="one_gpu", **same))


def run_in_process(argv: list[str], settings, capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="memctl")
    cli_containers.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code = args.func(args, settings)
    except MemctlError as exc:  # what memctl_cli.main does with it
        _print_error(exc)
        code = 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def running(vllm_settings):
    backend = make_vllm_backend(vllm_settings)
    return vllm_start(backend, make_cached_model(vllm_settings, "Org/Cli-Model"), FP16)


@pytest.mark.docker
def test_containers_json_lists_the_running_container_with_health(running, docker_host, vllm_settings):
    proc = memctl("containers", "--json", docker_host=docker_host, settings=vllm_settings)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    row = rows[running.name]
    assert row["model_id"] == "Org/Cli-Model" and row["state"] == "ready"
    assert row["endpoint"] == running.endpoint and row["profile"]["context_tokens"] == 1024


@pytest.mark.docker
def test_containers_table_shows_name_model_and_port(running, vllm_settings, capsys):
    code, out, _ = run_in_process(["containers"], vllm_settings, capsys)
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["NAME", "STATE", "MODEL", "ENDPOINT", "UPTIME", "NOTE"]
    line = next(ln for ln in lines if ln.startswith(running.name))
    assert "ready" in line and "Org/Cli-Model" in line and running.endpoint in line


@pytest.mark.docker
def test_stop_removes_it_and_a_second_stop_says_already_gone(running, docker_host, docker_client):
    proc = memctl("stop", running.name, docker_host=docker_host)
    assert proc.returncode == 0, proc.stderr
    assert "stopped Org/Cli-Model" in proc.stdout
    assert running.name not in {c.name for c in docker_client.containers.list(all=True)}
    proc = memctl("stop", running.name, docker_host=docker_host)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "not loaded" in proc.stderr and "hint:" in proc.stderr


@pytest.mark.docker
def test_stop_refuses_a_container_memctl_did_not_start(vllm_settings, docker_client, fake_vllm_image, capsys):
    other = docker_client.containers.run(fake_vllm_image, ["x", "--port", str(free_port())],
                                         name=f"someone-elses-{vllm_settings.vllm_port}", detach=True,
                                         network_mode="host")
    try:
        code, _, err = run_in_process(["stop", other.name], vllm_settings, capsys)
        assert code == 1 and "not loaded" in err and "hint:" in err
        code, _, _ = run_in_process(["stop-all"], vllm_settings, capsys)
        assert code == 0
        other.reload()
        assert other.status == "running"
    finally:
        other.remove(force=True)


@pytest.mark.docker
def test_stop_all_stops_every_managed_container(running, vllm_settings, capsys, docker_client):
    code, out, _ = run_in_process(["stop-all"], vllm_settings, capsys)
    assert code == 0 and f"stopped {running.name}" in out
    assert running.name not in {c.name for c in docker_client.containers.list(all=True)}
    code, out, _ = run_in_process(["stop-all"], vllm_settings, capsys)
    assert code == 0 and "No memctl containers to stop." in out


def test_commands_explain_a_daemon_that_is_down(tmp_path):
    proc = memctl("containers", "--json", docker_host=f"unix://{tmp_path}/docker.sock")
    assert proc.returncode == 1
    assert "error: the Docker daemon is not running" in proc.stderr and "hint:" in proc.stderr
    proc = memctl("stop-all", docker_host=f"unix://{tmp_path}/docker.sock")
    assert proc.returncode == 1 and "not running" in proc.stderr


def test_uptime_is_short_and_readable():
    assert fmt_duration(None) == "—"
    assert fmt_duration(12.7) == "12s"
    assert fmt_duration(185) == "3m05s"
    assert fmt_duration(3720) == "1h02m"
