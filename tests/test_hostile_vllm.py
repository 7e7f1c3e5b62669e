"""Deployments that died or were started under other settings: never served as is, never "already active",
replaced by the next load and never logged as a success with nothing done.

The controller-level replacement runs on the in-memory backend (a deployment marked failed, as the vLLM
backend reports a dead container); the vLLM-level checks run against the private Docker engine with the fake
vLLM image (a killed container, a container started with another image tag, port or API key)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from memory_controller import MemoryController
from memory_controller.backend import DeploymentState
from memory_controller.settings import load_settings
from memory_controller.types import Precision, Profile
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID
from tests.inmemory_backend import InMemoryBackend
from tests.test_openai_api import DEAD_DOCKER, Served, _serve

FP16 = Profile(mode="vllm", precision=Precision.FP16, context_tokens=2048, batch=4)


def _fail(backend: InMemoryBackend, model_id: str) -> None:
    """What the vLLM backend reports for a container that died: the deployment is FAILED."""
    with backend._lock:
        backend._running[model_id] = backend._running[model_id].to(DeploymentState.FAILED)


@pytest.fixture
def ctl(hf_cache) -> Iterator[tuple[MemoryController, InMemoryBackend]]:
    settings = load_settings(hf_cache_dir=hf_cache, local_model_dirs=[], docker_host=DEAD_DOCKER)
    backend = InMemoryBackend(settings)
    yield MemoryController(settings, backends={"inmem": backend}), backend


@pytest.mark.parametrize("model_id", [TINY_ID, TINY_UNTIED_ID])
def test_a_failed_deployment_is_replaced_on_the_next_load_and_logged_as_such(ctl, model_id):
    c, backend = ctl
    first = c.ensure_deployment(model_id)
    _fail(backend, model_id)
    plan = c.plan("inmem", model_id, first.profile, purpose="ide")
    assert not plan.already_active and [d.model_id for d in plan.to_stop] == [model_id]
    again = c.ensure_deployment(model_id)
    assert again.state is DeploymentState.READY and backend.starts == 2 and backend.stops == 1
    last = c.history(limit=1)[0]
    assert "nothing to do" not in " ".join(s.message or "" for s in last.steps)
    assert any(s.name == "unload" for s in last.steps) and any(s.name == "prepare" for s in last.steps)
    assert [d.state for d in c.deployments()] == [DeploymentState.READY]


def test_a_failed_deployment_is_not_restored_when_its_replacement_fails(ctl):
    c, backend = ctl
    c.ensure_deployment(TINY_ID)
    _fail(backend, TINY_ID)
    backend.fail_on_start.add(TINY_UNTIED_ID)
    with pytest.raises(Exception, match="told to fail"):
        c.ensure_deployment(TINY_UNTIED_ID)
    assert backend.starts == 1  # the dead one was removed, not started again as "the previous model"
    assert c.deployments() == []


@pytest.fixture
def served(hf_settings, tmp_path) -> Iterator[Served]:
    settings = hf_settings.model_copy(update={"state_dir": tmp_path / "state", "docker_host": DEAD_DOCKER,
                                              "serve_heartbeat_s": 0.1, "host_memory_budget_bytes": 4096})
    yield from _serve(settings)


@pytest.mark.parametrize("stream", [False, True])
def test_the_server_replaces_a_dead_deployment_on_the_next_request(served, stream):
    served.ctl.ensure_deployment(TINY_ID)
    _fail(served.backend, TINY_ID)
    body = {"model": TINY_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
    r = httpx.post(served.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert "error" not in r.text
    assert served.backend.starts == 2 and served.running() == [TINY_ID]


# --------------------------------------------------------------------------- vLLM in Docker
docker_fixtures = pytest.importorskip("tests.fixtures_docker")


def _listed(backend, handle: str):
    return next(d for d in backend.list_managed(probe=True) if d.handle == handle)


@pytest.mark.docker
def test_a_killed_container_is_failed_and_removed_by_a_stop(vllm_settings, docker_client):
    backend = docker_fixtures.make_vllm_backend(vllm_settings)
    dep = docker_fixtures.vllm_start(backend, docker_fixtures.make_cached_model(vllm_settings), FP16)
    docker_client.containers.get(dep.handle).kill()
    dead = _listed(backend, dep.handle)
    assert dead.state is DeploymentState.FAILED and dead.detail["docker_state"] != "running"
    backend.stop(dep.handle)
    assert all(d.handle != dep.handle for d in backend.list_managed(probe=False))


KEY_A = "sk-memctl-a-" + os.urandom(4).hex()
KEY_B = "sk-memctl-b-" + os.urandom(4).hex()
MISMATCHES = {
    "tag": ({}, {"vllm_tag": "other"}, "the settings ask for"),
    "port": ({}, {"vllm_port": "@other"}, "listens on port"),
    "key now required": ({}, {"vllm_api_key": KEY_A}, "without the API key"),
    "another key": ({"vllm_api_key": KEY_A}, {"vllm_api_key": KEY_B}, "another API key"),
    "key no longer set": ({"vllm_api_key": KEY_A}, {"vllm_api_key": None}, "requires an API key"),
}


@pytest.mark.docker
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_container_started_under_other_settings_is_not_adopted(vllm_settings, case, caplog):
    before, after, words = MISMATCHES[case]
    started_with = docker_fixtures.with_changes(vllm_settings, **before)
    backend = docker_fixtures.make_vllm_backend(started_with)
    dep = docker_fixtures.vllm_start(backend, docker_fixtures.make_cached_model(started_with), FP16)
    try:
        assert _listed(backend, dep.handle).state is not DeploymentState.FAILED
        if after.get("vllm_port") == "@other":
            after = {"vllm_port": docker_fixtures.free_port()}
        now = docker_fixtures.make_vllm_backend(docker_fixtures.with_changes(vllm_settings, **after))
        seen = _listed(now, dep.handle)
        assert seen.state is DeploymentState.FAILED
        text = " ".join(w.text for w in seen.warnings)
        assert words in text and "replaces it" in text, text
        for key in (KEY_A, KEY_B):
            assert key not in text and key not in str(seen.detail) and key not in caplog.text
    finally:
        backend.stop(dep.handle)


@pytest.mark.docker
def test_a_running_container_whose_api_never_answers_is_failed_after_the_start_deadline(vllm_settings, docker_client,
                                                                                       fake_vllm_image):
    """Running (Docker says so), but nothing answers on its port long after a cold start could take: not
    "starting" for ever (which made every later load "nothing to do"), but failed, to be replaced."""
    import time

    from backends.vllm.labels import write_labels

    settings = docker_fixtures.with_changes(vllm_settings, vllm_ready_timeout_s=1.0)
    labels = write_labels(model_id="Org/Tiny-Llama", served_name="Org/Tiny-Llama", profile=FP16,
                          port=settings.vllm_port, gpu_util=0.5, claim_bytes={"gpu:0": 1024**3}, tool_parser=None)
    # the fake engine listens on another port than its labels say: memctl's probe is refused, as for a dead engine
    c = docker_fixtures.run_foreign(docker_client, fake_vllm_image, labels=labels, port=docker_fixtures.free_port())
    backend = docker_fixtures.make_vllm_backend(settings)
    try:
        time.sleep(1.5)
        seen = _listed(backend, c.id)
        assert seen.state is DeploymentState.FAILED, seen
        assert any("has not answered" in w.text for w in seen.warnings)
        patient = docker_fixtures.make_vllm_backend(vllm_settings)  # a 20 s deadline: still starting
        assert _listed(patient, c.id).state is DeploymentState.STARTING
    finally:
        backend.stop(c.id)
