"""The controller against a third backend that implements the protocol in memory (tests/inmemory_backend.py).

No torch, no Docker: these pin down the controller's own contract — the registry, plans as data that
``apply(plan)`` runs exactly or refuses as stale, rollback of only what the operation started, the
runner's slot, generation that never holds it, and validated deployment states.
"""

from __future__ import annotations

import threading
import time

import pytest

from memory_controller import MemoryController
from memory_controller.backend import (
    Backend,
    Deployment,
    DeploymentState,
    GenerationRequest,
    InvalidTransitionError,
)
from memory_controller.errors import (
    InsufficientMemoryError,
    MemctlError,
    OperationBusyError,
    SettingsError,
    StalePlanError,
)
from memory_controller.planning import APPLY_STEPS
from memory_controller.settings import load_settings
from memory_controller.types import Outcome, Precision, Profile
from tests.fake_pynvml import GIB, FakeGpu, FakeNvml
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID
from tests.inmemory_backend import InMemoryBackend


@pytest.fixture
def gpu() -> FakeGpu:
    return FakeGpu(total_bytes=24 * GIB, used_bytes=GIB // 2)  # the driver's own reserve


@pytest.fixture
def backend(gpu) -> InMemoryBackend:
    def ledger(key: str, delta: int) -> None:
        if key == "gpu:0":
            gpu.used_bytes += delta

    return InMemoryBackend(ledger=ledger)


@pytest.fixture
def ctl(hf_settings, tmp_path, gpu, backend):
    settings = hf_settings.model_copy(update={"state_dir": tmp_path / "state"})
    c = MemoryController(settings, nvml=FakeNvml([gpu]).module(), backends={"inmem": backend})
    yield c
    c.emergency_clear()


def profile(ctx: int = 1024, precision: Precision = Precision.FP16) -> Profile:
    return Profile(mode="inmem", precision=precision, context_tokens=ctx, batch=1, device="cuda", gpu_ids=(0,))


def test_the_in_memory_backend_implements_the_protocol(backend):
    assert isinstance(backend, Backend)


def test_a_backend_is_one_module_and_one_config_line(hf_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMCTL_BACKENDS", '{"inmem": "tests.inmemory_backend:create"}')
    settings = load_settings(hf_cache_dir=hf_settings.hf_cache_dir, state_dir=tmp_path / "s")
    assert settings.backends["inmem"].factory == "tests.inmemory_backend:create"
    c = MemoryController(settings, nvml=FakeNvml([FakeGpu()]).module())
    assert "inmem" in c.registry.ids()
    rec = c.apply("inmem", TINY_ID, profile())
    assert rec.outcome is Outcome.SUCCESS
    assert [(d.backend_id, d.model_id) for d in c.deployments()] == [("inmem", TINY_ID)]
    c.emergency_clear()


def test_an_unknown_backend_is_a_clear_error(ctl):
    with pytest.raises(SettingsError, match="unknown backend 'nope'"):
        ctl.plan("nope", TINY_ID)


def test_a_plan_is_data_and_apply_runs_exactly_its_steps(ctl, gpu):
    plan = ctl.plan("inmem", TINY_ID, profile())
    assert plan.step_names == APPLY_STEPS and plan.fits and not plan.blockers
    assert plan.steps[2].bytes_by_device == {"gpu:0": plan.needed_bytes}
    used_before = gpu.used_bytes
    rec = ctl.apply(plan)
    assert [s.name for s in rec.steps] == list(APPLY_STEPS)
    (dep,) = ctl.deployments()
    assert dep.state is DeploymentState.READY and dep.profile == plan.profile
    assert gpu.used_bytes - used_before == plan.needed_bytes  # the claim landed where the plan said


def test_apply_of_a_plan_made_before_the_loaded_model_changed_is_stale(ctl):
    old_plan = ctl.plan("inmem", TINY_UNTIED_ID, profile())
    ctl.apply("inmem", TINY_ID, profile())
    with pytest.raises(StalePlanError) as info:
        ctl.apply(old_plan)
    assert TINY_ID in info.value.message and "nothing was touched" in info.value.message
    assert [d.model_id for d in ctl.deployments()] == [TINY_ID]  # untouched
    fresh = ctl.plan("inmem", TINY_UNTIED_ID, profile())
    assert [d.model_id for d in fresh.to_stop] == [TINY_ID]
    assert ctl.apply(fresh).outcome is Outcome.SUCCESS


def test_apply_of_a_plan_whose_memory_was_taken_since_is_stale(ctl, gpu):
    plan = ctl.plan("inmem", TINY_ID, profile())
    gpu.used_bytes = gpu.total_bytes - plan.needed_bytes // 2  # another process took the memory
    with pytest.raises(StalePlanError, match="free memory on gpu:0 changed"):
        ctl.apply(plan)
    assert ctl.deployments() == []
    assert ctl.history(1)[0].outcome is Outcome.ERROR


def test_a_model_that_does_not_fit_is_refused_with_the_numbers(ctl, gpu):
    gpu.used_bytes = gpu.total_bytes - 1024
    plan = ctl.plan("inmem", TINY_ID, profile())
    assert not plan.fits and plan.suggestion is not None
    with pytest.raises(InsufficientMemoryError) as info:
        ctl.apply(plan)
    assert info.value.needed_bytes > info.value.free_bytes
    assert info.value.code == "insufficient_memory"


def test_a_failed_verify_removes_only_what_this_apply_started_and_restores(ctl, backend):
    ctl.apply("inmem", TINY_ID, profile())
    backend.fail_on_verify.add(TINY_UNTIED_ID)
    with pytest.raises(MemctlError, match="did not answer"):
        ctl.apply("inmem", TINY_UNTIED_ID, profile())
    assert [d.model_id for d in ctl.deployments()] == [TINY_ID]  # the new one gone, the old one back
    steps = ctl.history(1)[0].steps
    assert steps[-1].name == "rollback" and "restored" in steps[-1].message


def test_a_second_operation_is_refused_at_once_and_emergency_stops_the_first(ctl, backend):
    backend.start_delay_s = 30
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _capture(errors, lambda: ctl.apply("inmem", TINY_ID, profile())))
    t.start()
    deadline = time.monotonic() + 10
    while ctl.current_operation() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OperationBusyError, match="apply"):
        ctl.clear_memory()
    assert t.is_alive() and ctl.current_operation()["kind"] == "apply"  # refused while the 30 s start runs
    report = ctl.emergency_clear()
    t.join(30)
    assert report.cancelled_operation == "apply"
    assert errors and "emergency" in str(errors[0])
    assert ctl.deployments() == [] and ctl.current_operation() is None


def _capture(errors: list, fn) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


def test_generation_never_holds_the_slot_and_an_emergency_clear_cancels_it(ctl, backend):
    ctl.apply("inmem", TINY_ID, profile())
    backend.token_delay_s = 0.05
    (dep,) = ctl.deployments()
    chunks: list = []
    started = threading.Event()

    def generate() -> None:
        with ctl.generating(dep) as slot:
            request = GenerationRequest(messages=({"role": "user", "content": " ".join(["w"] * 200)},),
                                        max_new_tokens=500)
            for chunk in slot.generator.generate_stream(dep, request, slot.cancelled):
                started.set()
                chunks.append(chunk)

    t = threading.Thread(target=generate)
    t.start()
    assert started.wait(10)
    assert ctl.in_flight() == {TINY_ID: 1}
    report = ctl.emergency_clear()  # proceeds although a request is generating
    t.join(10)
    assert report.outcome is Outcome.SUCCESS
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) < 200
    assert ctl.in_flight() == {} and ctl.deployments() == []


def test_a_switch_waits_for_requests_in_flight_or_cancels_them_when_asked(ctl, backend):
    ctl.apply("inmem", TINY_ID, profile())
    (dep,) = ctl.deployments()
    with ctl.generating(dep) as slot:
        s = ctl.settings.model_copy(update={"step_timeout_s": 0.3})
        ctl.settings = s
        with pytest.raises(OperationBusyError, match="generating"):
            ctl.apply("inmem", TINY_UNTIED_ID, profile())
        assert [d.model_id for d in ctl.deployments()] == [TINY_ID]
        assert not slot.cancelled()
    rec = ctl.apply("inmem", TINY_UNTIED_ID, profile(), cancel_generation=True)
    assert rec.outcome is Outcome.SUCCESS


def test_ensure_deployment_loads_on_demand_and_refuses_what_cannot_fit(ctl, gpu):
    dep = ctl.ensure_deployment(TINY_ID)
    assert dep.model_id == TINY_ID and dep.state is DeploymentState.READY
    assert ctl.ensure_deployment(TINY_ID) == dep  # already running: nothing happens
    gpu.total_bytes = gpu.used_bytes - dep.footprint_bytes + 100 * 1024**2  # 100 MiB once it is unloaded
    with pytest.raises(InsufficientMemoryError):
        ctl.ensure_deployment(TINY_UNTIED_ID)
    assert [d.model_id for d in ctl.deployments()] == [TINY_ID]


def test_unload_names_are_validated_before_any_backend_is_asked(ctl):
    for bad in ("", "/", "//", "../x", "a\nb"):
        with pytest.raises(MemctlError, match="not a model id"):
            ctl.unload(bad)
    with pytest.raises(MemctlError, match="not loaded"):
        ctl.unload("memctl-test/not-running")


def test_deployment_states_only_move_along_the_lifecycle():
    d = Deployment("inmem", "h", "m", None, DeploymentState.STARTING, {})
    ready = d.to(DeploymentState.READY)
    assert ready.to(DeploymentState.STOPPING).to(DeploymentState.STOPPED).state is DeploymentState.STOPPED
    with pytest.raises(InvalidTransitionError):
        ready.to(DeploymentState.STARTING)
    with pytest.raises(InvalidTransitionError):
        d.to(DeploymentState.STOPPED).to(DeploymentState.READY)


def test_the_recommended_context_is_the_largest_that_fits_up_to_the_models_maximum(ctl, gpu):
    rec = ctl.recommend(TINY_ID)  # 22 GiB free, a tiny model with 2,048 positions
    assert rec.profile.context_tokens == 2048
    rule = next(n for n in rec.notes if n.code.startswith("rec.context_"))
    # issue 20.5: said as a raise from the table's value, bounded by the model's own maximum
    assert rule.code == "rec.context_raised_model_max" and rule.args["rule"] == "model_max"
    assert rule.args["band_ctx"] < 2048 == rule.args["tokens"] == rule.args["model_max"]
    probe = Profile(mode="transformers", precision=Precision.INT8, context_tokens=1024, batch=1, device="cuda",
                    gpu_ids=(0,))
    free = ctl.estimate(TINY_ID, probe).total_bytes  # exactly what 1,024 tokens need: memory decides
    gpu.used_bytes = gpu.total_bytes - free
    small = ctl.recommend(TINY_ID)
    assert small.profile.precision is Precision.INT8
    assert 1024 <= small.profile.context_tokens < 2048
    assert ctl.estimate(TINY_ID, small.profile).total_bytes <= free
    assert any(n.code == "rec.context_raised_memory" and n.args["rule"] == "memory" for n in small.notes)


def test_every_apply_step_says_what_happened_as_a_code_both_languages_render(ctl):
    from memory_controller.i18n import Translator, render

    rec = ctl.apply("inmem", TINY_ID, profile())
    assert [s.name for s in rec.steps] == list(APPLY_STEPS)
    for lang in ("ru", "en"):
        t = Translator(lang)
        for step in rec.steps:
            assert step.code, step
            assert t.has(f"msg.{step.code}"), (lang, step.code)
            assert render(step.text, lang) and "{" not in render(step.text, lang)
    ru = [render(s.text, "ru") for s in rec.steps]
    assert any("готова" in line for line in ru) and not any("ready on" in line for line in ru)
    again = ctl.history(1)[0]  # the codes survive the operation log
    assert [s.code for s in again.steps] == [s.code for s in rec.steps]


def test_the_emergency_clear_says_which_streams_it_cut_and_names_what_it_unloaded(ctl, backend):
    """Issue 20.9: the result said «выполнено» four times; now the cancel step counts the response
    streams it cut and the stop step names the model it unloaded."""
    ctl.apply("inmem", TINY_ID, profile())
    (dep,) = ctl.deployments()
    with ctl.generating(dep) as slot:
        report = ctl.emergency_clear()
        assert slot.cancelled()
    by_name = {s.name: s for s in report.steps}
    assert by_name["cancel"].code == "emergency.cut_streams" and by_name["cancel"].args["streams"] == 1
    assert by_name["stop_inmem"].code == "emergency.stopped" and TINY_ID in by_name["stop_inmem"].args["models"]
    from memory_controller.i18n import render

    assert render(by_name["cancel"].text, "ru") == "операций не шло; прервано потоков ответа: 1"
