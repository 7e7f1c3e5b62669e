"""Controller flows across both backends: real tiny models, the private dockerd and the fake vLLM image."""

from __future__ import annotations

import threading
import time

import pytest

from memory_controller import MemoryController
from memory_controller.errors import ContainerStartError, MemctlError, OperationCancelledError
from memory_controller.types import Outcome, Precision, Profile
from tests.fake_pynvml import scenario
from tests.fixtures_docker import with_changes
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID

pytestmark = pytest.mark.docker

CPU = Profile(mode="transformers", precision=Precision.FP32, context_tokens=128, batch=1, device="cpu")
GPU = Profile(mode="vllm", precision=Precision.FP16, context_tokens=512, batch=2, device="cuda", gpu_ids=(0,))


@pytest.fixture
def settings(vllm_settings, hf_cache, tmp_path):
    return with_changes(vllm_settings, hf_cache_dir=hf_cache, state_dir=tmp_path / "state")


def managed(docker_client) -> list:
    return docker_client.containers.list(all=True, filters={"label": "memctl.managed=true"})


def make_ctl(settings) -> MemoryController:
    return MemoryController(settings, nvml=scenario("one_gpu").module())


def test_transformers_to_vllm_to_transformers(settings, docker_client):
    ctl = make_ctl(settings)
    try:
        assert ctl.apply("transformers", TINY_ID, CPU).outcome is Outcome.SUCCESS
        rec = ctl.apply("vllm", TINY_ID, GPU)
        assert rec.outcome is Outcome.SUCCESS, rec
        assert rec.steps[-1].name == "verify" and "answers" in rec.steps[-1].message
        loaded = ctl.deployments()
        assert [(d.backend_id, d.model_id) for d in loaded] == [("vllm", TINY_ID)]
        assert loaded[0].state.value == "ready"
        assert loaded[0].endpoint == f"http://{settings.bind_address}:{settings.vllm_port}/v1"
        assert len(managed(docker_client)) == 1

        rec = ctl.apply("transformers", TINY_UNTIED_ID, CPU)
        assert rec.outcome is Outcome.SUCCESS
        assert TINY_ID in rec.steps[0].message and "freed" in rec.steps[0].message
        assert managed(docker_client) == []
        assert [d.model_id for d in ctl.deployments()] == [TINY_UNTIED_ID]
    finally:
        ctl.emergency_clear()
    assert managed(docker_client) == []


def test_a_new_controller_finds_the_running_container_and_the_log(settings, docker_client):
    ctl = make_ctl(settings)
    try:
        ctl.apply("vllm", TINY_ID, GPU)
        again = make_ctl(settings)
        (lm,) = again.deployments()
        assert lm.backend_id == "vllm" and lm.model_id == TINY_ID
        assert lm.profile is not None and lm.profile.context_tokens == 512
        assert lm.device == "cuda:0" and lm.footprint_bytes > 0  # gpu_memory_utilization × 24 GiB
        plan = again.plan("vllm", TINY_UNTIED_ID, GPU)
        assert plan.expected_freed_bytes == lm.footprint_bytes
        assert plan.free_bytes_after_unload == plan.free_bytes_now + lm.footprint_bytes
        assert again.history(1)[0].kind == "apply"
        again.unload(lm.name)
        assert managed(docker_client) == []
        assert again.history(1)[0].kind == "unload"
    finally:
        ctl.emergency_clear()


def test_a_crashing_container_is_removed_and_the_previous_model_restored(settings, docker_client):
    ctl = make_ctl(with_changes(settings, vllm_tag="oom"))
    try:
        ctl.apply("transformers", TINY_ID, CPU)
        with pytest.raises(ContainerStartError) as info:
            ctl.apply("vllm", TINY_ID, GPU)
        assert info.value.cause and info.value.log_tail
        assert managed(docker_client) == []
        assert [(d.backend_id, d.model_id) for d in ctl.deployments()] == [("transformers", TINY_ID)]
        steps = ctl.history(1)[0].steps
        assert [s.name for s in steps][-2:] == ["prepare", "rollback"]
        assert "restored" in steps[-1].message
    finally:
        ctl.emergency_clear()


def test_emergency_clear_during_a_slow_container_start_leaves_no_container(settings, docker_client):
    ctl = make_ctl(with_changes(settings, vllm_tag="slow"))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ctl.apply("vllm", TINY_ID, GPU)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while not managed(docker_client) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert managed(docker_client), "the container never appeared"
    report = ctl.emergency_clear()
    t.join(60)
    assert report.cancelled_operation == "apply"
    assert errors and isinstance(errors[0], OperationCancelledError)
    assert managed(docker_client) == []
    assert ctl.deployments() == [] and ctl.current_operation() is None


def test_vllm_plans_count_what_vllm_claims_and_refuse_int8(settings):
    ctl = make_ctl(settings)
    plan = ctl.plan("vllm", TINY_ID, GPU)
    assert plan.fits and not plan.blockers
    assert plan.needed_bytes > plan.estimate.total_bytes  # gpu_memory_utilization × 24 GiB, margin included
    int8 = ctl.plan("vllm", TINY_ID, GPU.with_(precision=Precision.INT8))
    assert any(b.code == "backend.precision_unsupported" and "int8" in b.text for b in int8.blockers)
    with pytest.raises(MemctlError, match="cannot serve int8"):
        ctl.apply(int8)
