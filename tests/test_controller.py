"""MemoryController with the real Transformers backend on tiny models (CPU) and a fake NVML."""

from __future__ import annotations

import threading
import time

import pytest

from memory_controller import MemoryController
from memory_controller.errors import (
    InsufficientMemoryError,
    MemctlError,
    ModelNotFoundError,
    OperationBusyError,
    OperationCancelledError,
)
from memory_controller.planning import APPLY_STEPS
from memory_controller.probe import DeviceProbe
from memory_controller.types import Outcome, Precision, Profile
from tests.fake_pynvml import scenario
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID

DEAD_DOCKER = "unix:///nonexistent/memctl-test-docker.sock"
TF = "transformers"


def cpu_profile(precision: Precision = Precision.FP32, context: int = 128) -> Profile:
    return Profile(mode=TF, precision=precision, context_tokens=context, batch=1, device="cpu")


@pytest.fixture
def settings(hf_settings, tmp_path):
    return hf_settings.model_copy(update={"state_dir": tmp_path / "state", "docker_host": DEAD_DOCKER})


def make_ctl(settings, nvml: str = "library_missing", **kw) -> MemoryController:
    return MemoryController(settings, nvml=scenario(nvml).module(), **kw)


def loaded_ids(ctl: MemoryController) -> list[str]:
    return [d.model_id for d in ctl.deployments()]


@pytest.fixture
def ctl(settings):
    c = make_ctl(settings)
    yield c
    c.emergency_clear()


def test_apply_runs_the_guides_steps_and_a_second_model_replaces_the_first(ctl):
    events = []
    rec = ctl.apply(TF, TINY_ID, cpu_profile(), progress=events.append)
    assert rec.outcome is Outcome.SUCCESS
    assert [s.name for s in rec.steps] == list(APPLY_STEPS)
    assert all(s.duration_s >= 0 for s in rec.steps)
    assert {e.stage for e in events} >= set(APPLY_STEPS)
    assert loaded_ids(ctl) == [TINY_ID]
    assert ctl.mode == TF

    rec2 = ctl.apply("transformers", TINY_UNTIED_ID, cpu_profile(Precision.BF16))
    assert rec2.outcome is Outcome.SUCCESS
    assert TINY_ID in rec2.steps[0].message  # step 1 unloaded the previous model
    assert loaded_ids(ctl) == [TINY_UNTIED_ID]
    history = ctl.history(5)
    assert [h.kind for h in history[:2]] == ["apply", "apply"]
    assert history[0].params["model"] == TINY_UNTIED_ID
    assert history[0].memory_before and history[0].memory_after


def test_apply_of_the_active_model_and_profile_does_nothing_and_says_so(ctl):
    ctl.apply(TF, TINY_ID, cpu_profile())
    first = ctl.deployments()[0].started_at
    rec = ctl.apply(TF, TINY_ID, cpu_profile())
    assert [s.name for s in rec.steps] == ["noop"]
    assert "already active" in rec.steps[0].message
    assert ctl.deployments()[0].started_at == first


def test_plan_is_a_dry_run_with_what_is_freed_and_needed(ctl):
    ctl.apply(TF, TINY_ID, cpu_profile())
    plan = ctl.plan(TF, TINY_UNTIED_ID, cpu_profile())
    assert plan.step_names == APPLY_STEPS
    assert [d.model_id for d in plan.to_stop] == [TINY_ID]
    assert plan.expected_freed_bytes > 0
    assert plan.needed_bytes == plan.estimate.total_bytes > 0
    assert plan.fits and plan.device_key == "host"
    assert loaded_ids(ctl) == [TINY_ID]  # nothing changed
    rec = ctl.apply(plan)
    assert rec.outcome is Outcome.SUCCESS and loaded_ids(ctl) == [TINY_UNTIED_ID]


def test_default_profile_is_the_recommendation_for_that_model(ctl):
    rec = ctl.recommend(TINY_ID)
    assert rec.profile.device == "cpu" and rec.profile.mode == TF
    record = ctl.apply(TF, TINY_ID)
    assert record.params["profile"]["precision"] == rec.profile.precision.value


def test_refuses_with_the_numbers_when_it_does_not_fit_and_keeps_the_current_model(settings):
    probe = DeviceProbe(scenario("library_missing").module(), host_memory_budget_bytes=1024 * 1024)
    ctl = MemoryController(settings, probe=probe)
    try:
        forced = ctl.apply(TF, TINY_ID, cpu_profile(), force=True)
        assert forced.outcome is Outcome.WARNING  # the check step warned
        with pytest.raises(InsufficientMemoryError) as info:
            ctl.apply(TF, TINY_UNTIED_ID, cpu_profile())
        err = info.value
        assert err.needed_bytes > err.free_bytes
        assert "needs" in err.message and "free" in err.message
        assert err.advice_key == "out_of_memory"
        assert loaded_ids(ctl) == [TINY_ID]  # refused before anything was unloaded
        assert ctl.history(1)[0].outcome is Outcome.ERROR
    finally:
        ctl.emergency_clear()


@pytest.mark.parametrize("failing_step", APPLY_STEPS)
def test_failure_at_each_step_leaves_nothing_half_loaded_and_restores_the_previous_model(settings, failing_step):
    def hook(step: str) -> None:
        if armed.is_set() and step == failing_step:
            raise RuntimeError(f"injected failure in {step}")

    armed = threading.Event()
    ctl = make_ctl(settings, step_hook=hook)
    try:
        ctl.apply(TF, TINY_ID, cpu_profile())
        armed.set()
        with pytest.raises(MemctlError) as info:
            ctl.apply(TF, TINY_UNTIED_ID, cpu_profile())
        assert failing_step in str(info.value)
        assert loaded_ids(ctl) == [TINY_ID]  # new one gone, previous one back (or never unloaded)
        record = ctl.history(1)[0]
        assert record.outcome is Outcome.ERROR
        names = [s.name for s in record.steps]
        assert names[-1] == "rollback"
        assert next(s for s in record.steps if s.name == failing_step).outcome is Outcome.ERROR
        armed.clear()
        assert ctl.apply(TF, TINY_UNTIED_ID, cpu_profile()).outcome is Outcome.SUCCESS
    finally:
        ctl.emergency_clear()


def test_without_restore_a_failed_switch_leaves_the_controller_idle(settings):
    s = settings.model_copy(update={"restore_previous_on_failure": False})
    ctl = make_ctl(s, step_hook=lambda step: (_ for _ in ()).throw(RuntimeError("boom")) if step == "verify" else None)
    try:
        with pytest.raises(MemctlError):
            ctl.apply(TF, TINY_ID, cpu_profile())
        assert loaded_ids(ctl) == []
        assert ctl.mode is None
    finally:
        ctl.emergency_clear()


def test_a_second_apply_while_one_runs_is_refused_at_once(settings):
    in_prepare, release = threading.Event(), threading.Event()

    def hook(step: str) -> None:
        if step == "prepare":
            in_prepare.set()
            release.wait(30)

    ctl = make_ctl(settings, step_hook=hook)
    results: dict = {}
    t = threading.Thread(target=lambda: results.setdefault("rec", ctl.apply(TF, TINY_ID, cpu_profile())))
    t.start()
    try:
        assert in_prepare.wait(30)
        with pytest.raises(OperationBusyError) as info:
            ctl.apply(TF, TINY_UNTIED_ID, cpu_profile())
        # refused while the first is still held in prepare: not queued behind it
        assert not release.is_set() and t.is_alive()
        assert "apply" in info.value.message and "since" in info.value.message
        with pytest.raises(OperationBusyError):
            ctl.clear_memory()
        assert ctl.current_operation()["kind"] == "apply"
    finally:
        release.set()
        t.join(60)
    assert results["rec"].outcome is Outcome.SUCCESS
    assert loaded_ids(ctl) == [TINY_ID]
    ctl.emergency_clear()


def test_a_progress_callback_that_raises_does_not_break_the_switch(ctl):
    def bad(_event):
        raise ValueError("callback bug")

    assert ctl.apply(TF, TINY_ID, cpu_profile(), progress=bad).outcome is Outcome.SUCCESS
    assert loaded_ids(ctl) == [TINY_ID]


def test_unload_returns_a_measured_report_and_unknown_models_are_a_clear_error(ctl):
    ctl.apply(TF, TINY_ID, cpu_profile())
    report = ctl.unload(TINY_ID)
    assert report.model_id == TINY_ID and report.measure.startswith("rss_anon")
    assert report.expected_bytes > 0
    assert loaded_ids(ctl) == []
    with pytest.raises(ModelNotFoundError, match="not loaded"):
        ctl.unload(TINY_ID)
    assert ctl.history(1)[0].kind == "unload"


def test_clear_memory_reports_before_and_after_per_device(ctl):
    report = ctl.clear_memory()
    assert set(report.before) == set(report.after) == {"host"}
    assert report.actions  # which clean-ups ran
    assert ctl.history(1)[0].kind == "clear_memory"


def test_emergency_clear_with_docker_down_still_unloads_the_transformers_model(settings):
    ctl = make_ctl(settings, nvml="one_gpu")  # a GPU, so stopping containers is attempted
    ctl.apply(TF, TINY_ID, cpu_profile())
    report = ctl.emergency_clear()
    by_name = {s.name: s for s in report.steps}
    assert by_name["stop_transformers"].outcome is Outcome.SUCCESS
    assert TINY_ID in by_name["stop_transformers"].message
    # issue 20.9: what it unloaded is named in the step's own code and arguments, not a bare "done"
    assert by_name["stop_transformers"].code == "emergency.stopped"
    assert TINY_ID in by_name["stop_transformers"].args["models"]
    assert by_name["cancel"].code == "emergency.nothing_running"
    assert by_name["stop_vllm"].outcome is Outcome.ERROR
    assert "Docker" in by_name["stop_vllm"].message
    assert by_name["clear"].outcome is Outcome.SUCCESS
    assert report.outcome is Outcome.WARNING
    assert loaded_ids(ctl) == [] and ctl.mode is None
    assert ctl.history(1)[0].kind == "emergency_clear"


def test_emergency_clear_during_a_transformers_load_discards_it(settings):
    in_prepare = threading.Event()
    go = threading.Event()

    def hook(step: str) -> None:
        if step == "prepare":
            in_prepare.set()
            go.wait(30)

    ctl = make_ctl(settings, step_hook=hook)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ctl.apply(TF, TINY_ID, cpu_profile())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert in_prepare.wait(30)
    threading.Timer(0.3, go.set).start()
    report = ctl.emergency_clear()
    t.join(60)
    assert report.cancelled_operation == "apply"
    assert errors and isinstance(errors[0], OperationCancelledError)
    time.sleep(0.2)
    assert loaded_ids(ctl) == []
    assert ctl.current_operation() is None


def test_a_new_controller_reads_the_log_back_and_skips_a_torn_line(settings):
    ctl = make_ctl(settings)
    ctl.apply(TF, TINY_ID, cpu_profile())
    ctl.emergency_clear()
    log_path = settings.state_dir / "operations.jsonl"
    with open(log_path, "a") as fh:
        fh.write('{"op_id": "torn", "kind": "app')
    again = make_ctl(settings)
    kinds = [h.kind for h in again.history()]
    assert kinds == ["emergency_clear", "apply"]
    assert any("torn" in w for w in again.log_warnings)


def test_bad_model_ids_are_refused_before_anything_changes(ctl):
    ctl.apply(TF, TINY_ID, cpu_profile())
    for bad in ("../etc/passwd", "memctl-test/not-there"):
        with pytest.raises(MemctlError):
            ctl.apply(TF, bad, cpu_profile())
    assert loaded_ids(ctl) == [TINY_ID]


def test_vllm_mode_is_refused_with_its_reason_when_there_is_no_gpu(ctl):
    plan = ctl.plan("vllm", TINY_ID)
    assert plan.blockers and plan.blockers[0].code == "backend.no_gpu"
    assert "GPU" in plan.blockers[0].text
    with pytest.raises(MemctlError, match="GPU"):
        ctl.apply("vllm", TINY_ID)


def test_emergency_clear_with_no_gpu_and_no_docker_is_a_clean_success(ctl):
    ctl.apply(TF, TINY_ID, cpu_profile())
    report = ctl.emergency_clear()
    assert report.outcome is Outcome.SUCCESS, report.steps
    stop = next(s for s in report.steps if s.name == "stop_vllm")
    assert "no GPU" in stop.message
    assert loaded_ids(ctl) == []


def test_max_context_grows_with_free_memory(ctl):
    small = ctl.max_context(TINY_ID, cpu_profile(), free_bytes=80 * 1024**2)
    large = ctl.max_context(TINY_ID, cpu_profile(), free_bytes=800 * 1024**2)
    assert 0 < small <= large
    assert ctl.max_context(TINY_ID, cpu_profile(), free_bytes=1024) == 0


def test_memory_history_keeps_samples_for_the_chart(ctl):
    ctl.devices()
    hist = ctl.memory_history()
    assert hist and "host" in hist[-1][1]
    used, free = hist[-1][1]["host"]
    assert used > 0 and free > 0


def test_a_context_beyond_the_models_maximum_is_a_blocker_not_a_fit(ctl):
    plan = ctl.plan(TF, TINY_ID, cpu_profile(context=1_048_576))
    assert any("exceeds the model's maximum 2048" in b.text for b in plan.blockers)
    assert any(b.code == "plan.context_over_model_max" for b in plan.blockers)
    with pytest.raises(MemctlError, match="maximum 2048"):
        ctl.apply(plan)
    assert loaded_ids(ctl) == []


def test_apply_without_a_profile_of_the_active_model_does_nothing(ctl):
    ctl.apply(TF, TINY_ID)
    rec = ctl.apply(TF, TINY_ID)
    assert [s.name for s in rec.steps] == ["noop"]


def test_a_timed_out_load_is_abandoned_not_restored_and_the_slot_is_freed(big_model, tmp_path):
    s = big_model.settings.model_copy(update={"operation_timeout_s": 0.01, "state_dir": tmp_path / "state",
                                              "docker_host": DEAD_DOCKER})
    ctl = make_ctl(s)
    try:
        with pytest.raises(MemctlError, match="did not finish within"):
            ctl.apply(TF, big_model.model_id, cpu_profile())  # fp32: a real copy, not a map
        assert ctl.current_operation() is None  # the slot is free again
        deadline = time.monotonic() + 30
        while loaded_ids(ctl) and time.monotonic() < deadline:  # the late result is unloaded when it returns
            time.sleep(0.05)
        assert loaded_ids(ctl) == []
        assert ctl.history(1)[0].outcome is Outcome.ERROR
    finally:
        ctl.emergency_clear()
