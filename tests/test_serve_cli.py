"""`memctl serve` in one process, `memctl ps / unload / ide` in others acting through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from memory_controller.ide import max_output_tokens
from memory_controller.settings import load_settings
from server.client import RemoteController
from server.connect import controller_for
from tests.conftest import ROOT
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID
from tests.model_factory import hf_env
from tests.test_owner import OWNER_SCRIPT, _env, start_owner, stop, wait_published

BACKENDS = json.dumps({"inmem": "tests.inmemory_backend:create"})


def memctl(tmp_path, hf_cache, *args: str) -> subprocess.CompletedProcess:
    env = _env(tmp_path, MEMCTL_BACKENDS=BACKENDS, **hf_env(hf_cache))
    return subprocess.run([sys.executable, "-c", OWNER_SCRIPT, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def served(tmp_path, hf_cache, monkeypatch):
    """An owner process serving the in-memory backend; yields its OwnerInfo."""
    for key, value in hf_env(hf_cache).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MEMCTL_BACKENDS", BACKENDS)
    proc = start_owner(tmp_path, MEMCTL_BACKENDS=BACKENDS, **hf_env(hf_cache))
    try:
        yield wait_published(load_settings(), proc)
    finally:
        stop(proc)


def test_ps_ide_and_unload_from_other_processes_see_the_owners_model(served, tmp_path, hf_cache):
    # this test process loads a model through the owner
    client = controller_for(load_settings())
    assert isinstance(client, RemoteController) and client.owner.pid == served.pid
    with client:
        client.apply("inmem", TINY_ID)
        (dep,) = client.deployments()
    assert dep.context_tokens and os.getpid() != served.pid

    ps = memctl(tmp_path, hf_cache, "ps", "--json")
    assert ps.returncode == 0, ps.stderr
    data = json.loads(ps.stdout)
    assert data["server"] == {"url": served.url, "pid": served.pid}
    (row,) = data["models"]
    assert row["model"] == TINY_ID and row["backend"] == "inmem"
    assert row["endpoint"] == served.url + "/v1"
    assert row["context_tokens"] == dep.context_tokens
    assert row["memory_bytes"] == dict(dep.memory_bytes) and row["in_flight"] == 0

    text = memctl(tmp_path, hf_cache, "ps")
    assert text.returncode == 0 and TINY_ID in text.stdout and "CONTEXT" in text.stdout

    roo = memctl(tmp_path, hf_cache, "ide", "roo")  # the running model by default
    assert roo.returncode == 0, roo.stderr
    cfg = json.loads(roo.stdout)["providerProfiles"]["apiConfigs"]["memctl"]
    assert cfg["openAiBaseUrl"] == served.url + "/v1" and cfg["openAiModelId"] == TINY_ID
    assert cfg["openAiCustomModelInfo"]["contextWindow"] == dep.context_tokens
    assert cfg["openAiCustomModelInfo"]["maxTokens"] == max_output_tokens(dep.context_tokens)
    assert "below the 32768" in roo.stderr  # the tiny model's context is under the IDE minimum

    unload = memctl(tmp_path, hf_cache, "unload", TINY_ID)
    assert unload.returncode == 0, unload.stderr
    assert "freed" in unload.stdout
    assert json.loads(memctl(tmp_path, hf_cache, "ps", "--json").stdout)["models"] == []


def test_ide_for_a_model_not_running_carries_the_context_the_owner_would_serve(served, tmp_path, hf_cache):
    with controller_for(load_settings()) as client:
        want = client.plan(client.serving_backend_id(), TINY_UNTIED_ID, purpose="ide").profile.context_tokens
    out = memctl(tmp_path, hf_cache, "ide", "continue", "--model", TINY_UNTIED_ID)
    assert out.returncode == 0, out.stderr
    (model,) = yaml.safe_load(out.stdout)["models"]
    assert model["apiBase"] == served.url + "/v1" and model["model"] == TINY_UNTIED_ID
    assert model["defaultCompletionOptions"]["contextLength"] == want
    assert "autocomplete" in model["roles"]


@pytest.mark.parametrize("args", [("ide", "roo", "--model", "memctl-test/not-there"),
                                  ("ide", "roo", "--model", "../etc")])
def test_bad_input_through_the_owner_exits_2_with_a_message_and_no_traceback(served, tmp_path, hf_cache, args):
    out = memctl(tmp_path, hf_cache, *args)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_unloading_through_the_owner_a_model_it_does_not_hold_exits_1(served, tmp_path, hf_cache):
    out = memctl(tmp_path, hf_cache, "unload", TINY_ID)  # 1: nothing to act on; 2 is for bad arguments
    assert out.returncode == 1 and "is not loaded" in out.stderr and "Traceback" not in out.stderr


def test_without_an_owner_the_commands_act_locally_and_say_so(tmp_path, hf_cache):
    ps = memctl(tmp_path, hf_cache, "ps")
    assert ps.returncode == 0 and "No memctl server runs" in ps.stderr and "No models running" in ps.stdout
    roo = memctl(tmp_path, hf_cache, "ide", "roo", "--model", TINY_ID)
    assert roo.returncode == 0, roo.stderr
    assert "memctl serve" in roo.stderr
    cfg = json.loads(roo.stdout)["providerProfiles"]["apiConfigs"]["memctl"]
    assert cfg["openAiBaseUrl"] == "http://127.0.0.1:8765/v1"
    no_model = memctl(tmp_path, hf_cache, "ide", "roo")
    assert no_model.returncode == 2 and "--model" in no_model.stderr


def test_serve_rejects_a_bad_port_with_exit_2(tmp_path, hf_cache):
    out = memctl(tmp_path, hf_cache, "serve", "--port", "70000")
    assert out.returncode == 2 and "70000" in out.stderr and "Traceback" not in out.stderr


def test_after_an_unload_ps_shows_the_pause_and_serve_resume_lifts_it(served, tmp_path, hf_cache):
    with controller_for(load_settings()) as client:
        client.apply("inmem", TINY_ID)
        ps = json.loads(memctl(tmp_path, hf_cache, "ps", "--json").stdout)
        assert ps["paused"] is None and ps["models"][0]["tools"] is True
        assert "TOOLS" in memctl(tmp_path, hf_cache, "ps").stdout
        assert memctl(tmp_path, hf_cache, "unload", TINY_ID).returncode == 0
        assert client.serving_pause()["models"] == [TINY_ID]
        text = memctl(tmp_path, hf_cache, "ps")
        assert "paused" in text.stdout and "memctl serve resume" in text.stdout
        resumed = memctl(tmp_path, hf_cache, "serve", "resume")
        assert resumed.returncode == 0, resumed.stderr
        assert "serving resumed" in resumed.stdout and client.serving_pause() is None
        again = memctl(tmp_path, hf_cache, "serve", "resume")
        assert again.returncode == 0 and "was not paused" in again.stdout


def test_serve_resume_without_a_server_says_nothing_runs(tmp_path, hf_cache):
    r = memctl(tmp_path, hf_cache, "serve", "resume")
    assert r.returncode == 1 and "no memctl server runs" in r.stderr and "Traceback" not in r.stderr


def test_ide_kilo_and_aider_through_the_owner_are_read_back(served, tmp_path, hf_cache):
    with controller_for(load_settings()) as client:
        (dep,) = [client.ensure_deployment(TINY_ID)] if hasattr(client, "ensure_deployment") else [None]
        if dep is None:
            client.apply("inmem", TINY_ID)
            (dep,) = client.deployments()
    kilo = memctl(tmp_path, hf_cache, "ide", "kilo")
    assert kilo.returncode == 0, kilo.stderr
    cfg = json.loads(kilo.stdout)
    provider = cfg["provider"]["memctl"]
    assert provider["options"]["baseURL"] == served.url + "/v1"
    model = provider["models"][TINY_ID]
    assert model["limit"] == {"context": dep.context_tokens, "output": max_output_tokens(dep.context_tokens)}
    assert model["tool_call"] is True  # the in-memory backend's "template" renders tools (qwen family)
    assert cfg["model"] == f"memctl/{TINY_ID}"

    cont = yaml.safe_load(memctl(tmp_path, hf_cache, "ide", "continue").stdout)
    assert cont["models"][0]["capabilities"] == ["tool_use"]

    out = tmp_path / "aider"
    out.mkdir()
    aider = memctl(tmp_path, hf_cache, "ide", "aider", "--write", str(out))
    assert aider.returncode == 0, aider.stderr
    meta = json.loads((out / ".aider.model.metadata.json").read_text())[f"openai/{TINY_ID}"]
    assert meta["max_input_tokens"] + meta["max_output_tokens"] == dep.context_tokens
    (entry,) = yaml.safe_load((out / ".aider.model.settings.yml").read_text())
    assert entry["extra_params"]["max_tokens"] == max_output_tokens(dep.context_tokens)
    assert f"--openai-api-base {served.url}/v1" in aider.stderr
