"""The control API and its client: another process's view of the owner's controller, over real HTTP.

The owner here is this test process (a real MemoryController with the in-memory backend, served by
ServerHandle on a free port); the client is the RemoteController other processes get from connect().
"""

from __future__ import annotations

import dataclasses
import time

import httpx
import pytest

from memory_controller import MemoryController
from memory_controller.api import InProcessController
from memory_controller.backend import Deployment, DeploymentState, ReleaseReport
from memory_controller.errors import (
    InsufficientMemoryError,
    InvalidModelIdError,
    MemctlError,
    ModelLoadError,
    ModelNotFoundError,
    StalePlanError,
)
from memory_controller.planning import Plan
from memory_controller.reports import ClearReport, EmergencyReport
from memory_controller.settings import load_settings
from memory_controller.types import (
    CatalogResult,
    OperationRecord,
    Outcome,
    Precision,
    Profile,
    SystemSnapshot,
)
from server.client import RemoteController, from_jsonable, to_json
from server.owner import TOKEN_HEADER, read_owner
from server.runner import ServerHandle
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID
from tests.inmemory_backend import InMemoryBackend


@pytest.fixture()
def owner(hf_cache):
    """(local controller, its backend, a client of it over HTTP)."""
    settings = load_settings(hf_cache_dir=hf_cache, local_model_dirs=[])
    backend = InMemoryBackend(settings)
    ctl = MemoryController(settings, backends={"inmem": backend})
    handle = ServerHandle(ctl, settings, port=0).start()
    client = RemoteController(read_owner(settings), settings, timeout_s=30)
    try:
        yield ctl, backend, client
    finally:
        client.close()
        handle.stop()
        for d in ctl.deployments():
            backend.stop(d.handle)


def test_client_plans_applies_lists_and_unloads_in_the_owner(owner):
    ctl, backend, client = owner
    plan = client.plan("inmem", TINY_ID, purpose="ide")
    assert isinstance(plan, Plan)
    local_plan = ctl.plan("inmem", TINY_ID, purpose="ide")
    moving = {"made_at": 0, "free_bytes_now": 0, "free_bytes_after_unload": 0}  # the host's memory moves
    assert dataclasses.replace(plan, **moving) == dataclasses.replace(local_plan, **moving)  # every other field
    assert plan.fits and plan.profile.context_tokens > 0
    record = client.apply(plan)
    assert isinstance(record, OperationRecord) and record.outcome is Outcome.SUCCESS
    # it runs in the owner, and the client sees the same deployment
    (local,) = ctl.deployments()
    (remote,) = client.deployments()
    assert isinstance(remote, Deployment) and remote == local
    assert remote.state is DeploymentState.READY and remote.context_tokens == plan.profile.context_tokens
    assert client.in_flight() == {}
    history = client.history(limit=5)
    assert history[0].kind == "apply" and history[0].outcome is Outcome.SUCCESS
    assert client.current_operation() is None
    assert client.status()["devices"]
    report = client.unload(TINY_ID)
    assert isinstance(report, ReleaseReport) and report.freed_bytes == local.footprint_bytes > 0
    assert ctl.deployments() == [] and backend.stops == 1


def test_client_reads_devices_and_models_as_dataclasses(owner):
    ctl, _, client = owner
    snap = client.devices()
    assert isinstance(snap, SystemSnapshot)
    assert snap.host.total_bytes == ctl.devices().host.total_bytes
    models = client.models()
    assert isinstance(models, CatalogResult)
    assert {m.model_id for m in models.models} >= {TINY_ID, TINY_UNTIED_ID}


def test_apply_by_backend_and_model_then_emergency_clear_through_the_client(owner):
    ctl, backend, client = owner
    assert client.apply("inmem", TINY_ID).outcome is Outcome.SUCCESS
    assert [d.model_id for d in ctl.deployments()] == [TINY_ID]
    report = client.emergency_clear()
    assert isinstance(report, EmergencyReport)
    assert ctl.deployments() == [] and backend.stops == 1


def test_a_plan_that_no_longer_holds_is_refused_and_nothing_is_touched(owner):
    ctl, backend, client = owner
    plan = client.plan("inmem", TINY_ID)
    ctl.apply("inmem", TINY_UNTIED_ID)  # the owner's state changes after the plan was shown
    with pytest.raises(StalePlanError):
        client.apply(plan)
    assert [d.model_id for d in ctl.deployments()] == [TINY_UNTIED_ID] and backend.starts == 1


def test_errors_come_back_as_the_same_classes_with_message_and_hint(owner):
    _, _, client = owner
    with pytest.raises(ModelNotFoundError) as err:
        client.plan("inmem", "memctl-test/not-there")
    assert "not-there" in err.value.message and err.value.hint
    with pytest.raises(InvalidModelIdError):
        client.plan("inmem", "../etc")
    with pytest.raises(ModelNotFoundError) as err:
        client.unload(TINY_ID)
    assert err.value.code == "not_loaded"


def test_a_model_over_the_memory_budget_is_refused_with_needed_and_free(hf_cache):
    settings = load_settings(hf_cache_dir=hf_cache, local_model_dirs=[], host_memory_budget_bytes=1000)
    ctl = MemoryController(settings, backends={"inmem": InMemoryBackend(settings)})
    handle = ServerHandle(ctl, settings, port=0).start()
    try:
        with RemoteController(read_owner(settings), settings) as client:
            with pytest.raises(InsufficientMemoryError) as err:
                client.apply("inmem", TINY_ID)
        assert err.value.needed_bytes > err.value.free_bytes >= 0
        assert ctl.deployments() == []
    finally:
        handle.stop()


@pytest.mark.parametrize(("method", "path"), [("GET", "/control/status"), ("GET", "/control/deployments"),
                                              ("POST", "/control/emergency_clear"), ("POST", "/control/unload")])
@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_the_control_api_requires_the_token(owner, method, path, token):
    ctl, backend, client = owner
    ctl.apply("inmem", TINY_ID)
    headers = {} if token is None else {TOKEN_HEADER: token}
    resp = httpx.request(method, client.owner.url + path, headers=headers, json={"model_id": TINY_ID}, timeout=10)
    assert resp.status_code == 401
    assert [d.model_id for d in ctl.deployments()] == [TINY_ID] and backend.stops == 0
    assert httpx.get(client.owner.url + "/health", timeout=10).json()["status"] == "ok"


def test_plans_and_records_survive_the_json_round_trip(owner):
    ctl, _, _ = owner
    plan = ctl.plan("inmem", TINY_ID, purpose="ide")
    assert from_jsonable(Plan, to_json(plan)) == plan
    record = ctl.apply(plan)
    assert from_jsonable(OperationRecord, to_json(record)) == record


def _finished(client, op_id: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while (view := client.operation(op_id)) is not None and view.running:
        assert time.monotonic() < deadline, "the operation did not finish in time"
        time.sleep(0.05)
    return view


def _outcome(call):
    """A call's value, or its error's class, code and message (the same either side of the wire)."""
    try:
        return call()
    except MemctlError as exc:
        return type(exc), exc.code, exc.message


def test_every_call_answers_the_same_through_the_client_as_in_process(owner):
    """Each call of ControllerAPI, through the control API and in process: the same values (the host's
    moving figures aside), operations submitted on one side seen the same from the other."""
    ctl, backend, client = owner
    local = InProcessController(ctl)
    profile = Profile(mode="inmem", precision=Precision.NF4, context_tokens=64, batch=1, device="cpu")
    backend.fail_on_start.add(TINY_UNTIED_ID)
    failed = _finished(client, client.submit_apply("inmem", TINY_UNTIED_ID, profile))
    assert isinstance(failed.error, ModelLoadError) and "told to fail" in failed.error.message
    assert failed.record.outcome is Outcome.ERROR

    op_id = client.submit_apply("inmem", TINY_ID, profile)
    remote_view = _finished(client, op_id)
    local_view = local.operation(op_id)
    assert isinstance(remote_view.result, OperationRecord) and remote_view.result == local_view.result
    assert remote_view.record == local_view.record and remote_view.events == local_view.events
    assert remote_view.events and remote_view.error is None and not remote_view.running
    assert [(v.op_id, v.kind) for v in client.operations(5)] == [(v.op_id, v.kind) for v in local.operations(5)]
    assert client.operation("0" * 12) is None

    same = {
        "deployments": lambda c: c.deployments(), "backend_ids": lambda c: c.backend_ids(),
        "availability": lambda c: c.availability("inmem"), "capabilities": lambda c: c.capabilities("inmem"),
        "max_context": lambda c: c.max_context(TINY_ID, profile, free_bytes=1 << 30),
        "history": lambda c: c.history(5), "log_write_errors": lambda c: c.log_write_errors(),
        "log_warnings": lambda c: c.log_warnings(), "serving_backend_id": lambda c: c.serving_backend_id(),
        "in_flight": lambda c: c.in_flight(), "current_operation": lambda c: c.current_operation(),
        "holders": lambda c: c.holders(), "models": lambda c: [m.model_id for m in c.models().models],
        "resolve": lambda c: (c.resolve(TINY_ID), _outcome(lambda: c.resolve("no-org/missing"))),
        "devices": lambda c: [d.key for d in c.devices().devices],
        "recommend": lambda c: c.recommend(model=TINY_ID, device_key="host").profile.mode,
        "recommend_in_view": lambda c: c.recommend_in_view(device_key="host").band,
        "plans": lambda c: {k: (p.model_id, p.backend_id) for k, p in c.plans("inmem", [TINY_ID], profile).items()},
        "status": lambda c: sorted(c.status()),
        "memory_history": lambda c: type(c.memory_history()),
        "export_formats": lambda c: c.export_formats(),
        "export": lambda c: _outcome(lambda: c.export("helm", TINY_ID, gpu_bytes=24 << 30)),
    }
    for name, call in same.items():
        assert call(client) == call(local), name
    assert client.level(ctl.devices().host) == local.level(ctl.devices().host)

    for submit, result_type in ((lambda: client.submit_unload(TINY_ID), ReleaseReport),
                                (client.submit_clear, ClearReport), (client.submit_emergency, EmergencyReport)):
        view = _finished(client, submit())
        assert isinstance(view.result, result_type) and view.result == local.operation(view.op_id).result
    with pytest.raises(ModelNotFoundError):
        client.submit_unload(TINY_ID)  # refused at once: nothing is loaded
    client.acknowledge_log_errors()


def test_a_field_this_owner_does_not_know_is_refused_naming_it(owner):
    """A client of another memctl version sending a field this owner does not know (here the opt-in step's
    old name) gets a 422 that names it, not a plan made without what it asked for."""
    ctl, _backend, client = owner
    body = {"backend_id": "inmem", "model_id": TINY_ID, "unload_ollama": True}
    resp = httpx.post(client.owner.url + "/control/plan", headers={TOKEN_HEADER: client.owner.token}, json=body,
                      timeout=30)
    assert resp.status_code == 422 and "unload_ollama" in resp.text
    body["free_holders"] = body.pop("unload_ollama")
    resp = httpx.post(client.owner.url + "/control/plan", headers={TOKEN_HEADER: client.owner.token}, json=body,
                      timeout=30)
    assert resp.status_code == 200 and resp.json()["model_id"] == TINY_ID
    assert ctl.deployments() == []
