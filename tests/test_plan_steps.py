"""A plan's steps are typed values: what apply runs, in order, and what crosses a process boundary as JSON."""

from __future__ import annotations

import json

import pytest

from memory_controller import planning
from memory_controller.backend import Claim, Deployment, DeploymentState
from memory_controller.planning import (
    APPLY_STEPS,
    Check,
    Clear,
    FreeHolder,
    Start,
    Switch,
    Unload,
    Verify,
    plan_from_jsonable,
)
from memory_controller.types import (
    DeviceKind,
    DeviceSnapshot,
    MemoryEstimate,
    NvmlStatus,
    Precision,
    Profile,
    SystemSnapshot,
    msg,
    to_jsonable,
)
from tests.fake_pynvml import GIB

PROFILE = Profile("inmem", Precision.FP16, 1024, 1, gpu_ids=(0,))


def _snap(free: int) -> SystemSnapshot:
    gpu = DeviceSnapshot(DeviceKind.GPU, 0, "GPU", None, 24 * GIB, 24 * GIB - free, free, 0.0)
    host = DeviceSnapshot(DeviceKind.HOST, None, "host", None, 64 * GIB, 0, 64 * GIB, None)
    return SystemSnapshot((gpu,), host, NvmlStatus.OK)


def _plan(running: tuple[Deployment, ...] = (), need: int = 4 * GIB) -> planning.Plan:
    from memory_controller.types import CachedModel

    model = CachedModel("org/m", None, 1, True, True, "LlamaForCausalLM", "/nonexistent")
    est = MemoryEstimate("org/m", PROFILE, need, 0, 0, 0, need, 1, "weight_files")
    return planning.make_plan(backend_id="inmem", model=model, profile=PROFILE, snap=_snap(8 * GIB), running=running,
                              estimate=est, claim_for=lambda _after: Claim({"gpu:0": need}, notes=(msg("n", "note"),)),
                              blockers=(), notes=(), purpose="switch", suggest=lambda _free: (None, None))


def test_the_steps_are_typed_values_in_the_guides_order():
    old = Deployment("inmem", "h1", "org/old", PROFILE, DeploymentState.READY, {"gpu:0": 2 * GIB}, started_at=1.0)
    plan = _plan((old,))
    assert [type(s) for s in plan.steps] == [Unload, Clear, Check, Switch, Start, Verify]
    assert plan.step_names == APPLY_STEPS
    assert plan.steps[0].targets == (old,) and plan.steps[2].bytes_by_device == {"gpu:0": 4 * GIB}
    assert plan.steps[4].claim == plan.claim and plan.steps[4].backend_id == "inmem"
    assert FreeHolder("someholder", ("a",)).name == "unload_someholder"


def test_a_step_refuses_another_kind():
    with pytest.raises(ValueError, match="kind"):
        Unload((), kind="clear")  # type: ignore[arg-type]


def test_a_plan_crosses_json_and_comes_back_equal_with_its_typed_steps():
    old = Deployment("inmem", "h1", "org/old", PROFILE, DeploymentState.READY, {"gpu:0": 2 * GIB}, started_at=1.0)
    plan = _plan((old,))
    plan = planning.dataclasses.replace(plan, steps=(plan.steps[0], FreeHolder("src", ("x:1b",)), *plan.steps[1:]))
    back = plan_from_jsonable(json.loads(json.dumps(to_jsonable(plan), default=list)))
    assert back == plan
    assert [type(s).__name__ for s in back.steps] == ["Unload", "FreeHolder", "Clear", "Check", "Switch", "Start",
                                                      "Verify"]
    data = to_jsonable(plan)
    data["steps"][2] = {"kind": "format_disk"}
    with pytest.raises(ValueError):
        plan_from_jsonable(data)
