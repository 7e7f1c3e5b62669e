"""Hostile input and races for the vLLM backend: foreign labels, control characters, label hosts,
two starts of one model, the API key, and PID -> container mapping (issues 11.1, 11.2, 11.9, 11.10, 13.1)."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading

import pytest

from backends.vllm.args import container_name_for
from backends.vllm.holders import container_id_of, holders_for_pids
from backends.vllm.labels import label_text, read_labels, write_labels
from memory_controller.backend import DeploymentState
from memory_controller.errors import ContainerError
from memory_controller.types import Outcome, Precision, Profile
from tests.fixtures_docker import (  # fixtures come from conftest's pytest_plugins
    free_port,
    make_cached_model,
    make_vllm_backend,
    run_foreign,
    vllm_start,
    with_changes,
)

GIB = 1024**3
FP16 = Profile(mode="vllm", precision=Precision.FP16, context_tokens=2048, batch=4)
GOOD = write_labels(model_id="Org/Good", served_name="Org/Good", profile=FP16, port=8000, gpu_util=0.5,
                    claim_bytes={"gpu:0": 12 * GIB}, tool_parser="hermes")
DEEP_LIST = "[" * 5000 + "]" * 5000
DEEP_DICT = '{"a":' * 5000 + "1" + "}" * 5000

BROKEN: dict[str, dict[str, str]] = {
    "util-inf": {"memctl.gpu_util": "inf"},
    "util-nan": {"memctl.gpu_util": "nan"},
    "util-neg": {"memctl.gpu_util": "-1"},
    "util-five": {"memctl.gpu_util": "5"},
    "util-huge": {"memctl.gpu_util": "1e400"},
    "profile-list": {"memctl.profile": "[1, 2, 3]"},
    "profile-deep-list": {"memctl.profile": DEEP_LIST},
    "profile-deep-dict": {"memctl.profile": DEEP_DICT},
    "profile-types": {"memctl.profile": json.dumps({"mode": "vllm", "precision": "fp16", "context_tokens": "2048",
                                                    "batch": 4})},
    "profile-bad-precision": {"memctl.profile": json.dumps({"mode": "vllm", "precision": "int3",
                                                            "context_tokens": 2048, "batch": 4})},
    "profile-gpu-ids": {"memctl.profile": json.dumps({"mode": "vllm", "precision": "fp16", "context_tokens": 2048,
                                                      "batch": 4, "gpu_ids": [True, "0"]})},
    "profile-nan": {"memctl.profile": '{"mode": "vllm", "precision": "fp16", "context_tokens": NaN, "batch": 4}'},
    "profile-missing": {"memctl.profile": None},
    "port-zero": {"memctl.port": "0"},
    "port-big": {"memctl.port": "65536"},
    "port-text": {"memctl.port": "80; rm -rf /"},
    "port-arabic-digits": {"memctl.port": "\u0668\u0660\u0660\u0660"},
    "claim-list": {"memctl.claim": "[1]"},
    "claim-negative": {"memctl.claim": '{"gpu:0": -1}'},
    "claim-float": {"memctl.claim": '{"gpu:0": 1e30}'},
    "claim-host": {"memctl.claim": '{"host": 5}'},
    "claim-deep": {"memctl.claim": DEEP_DICT},
    "model-missing": {"memctl.model": None},
}


def labels_with(**changes: str | None) -> dict[str, str]:
    out = dict(GOOD)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def broken(case: str) -> dict[str, str]:
    return labels_with(**BROKEN[case])


# --------------------------------------------------------------------------- pure: label parsing


def test_memctls_own_labels_read_back_exactly():
    info = read_labels(GOOD)
    assert info.readable and info.profile == FP16 and info.port == 8000 and info.gpu_util == 0.5
    assert info.claim_bytes == {"gpu:0": 12 * GIB} and info.model_id == "Org/Good" and info.tool_parser == "hermes"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_every_malformed_label_makes_the_container_unreadable_without_raising(case):
    info = read_labels(broken(case))
    assert not info.readable and info.problems
    assert all(len(p) <= 201 for p in info.problems)  # a 10 KB label does not become a 10 KB message


def test_labels_that_are_not_a_mapping_or_not_text_are_problems():
    assert not read_labels(None).readable
    assert not read_labels(["memctl.managed"]).readable
    assert not read_labels(labels_with(**{"memctl.model": 5})).readable  # type: ignore[arg-type]


@pytest.mark.parametrize("evil", ["evil\nmemctl-vllm-fake  running  ready", "\x1b[31mred\x1b[0m", "a\rb",
                                  "rtl\u202eexe.txt", "zero\u200bwidth", "bell\x07", "nul\x00x"])
def test_control_characters_in_labels_are_escaped_for_display(evil):
    info = read_labels(labels_with(**{"memctl.model": evil, "memctl.served_name": evil}))
    for text in (info.model_id, info.served_name):
        assert text is not None
        assert not any(ord(ch) < 32 or ch in "\x7f\u202e\u200b" for ch in text), repr(text)
        assert "\\" in text  # shown as an escape such as \n, \x1b, \u202e
    assert info.raw["memctl.model"] == evil  # the raw value is kept (only ever shown as data)
    assert info.raw_served_name is None  # never matched against /v1/models


def test_escape_keeps_plain_text_and_cuts_long_text():
    assert label_text("Qwen/Qwen2.5-Coder-7B-Instruct") == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert label_text("Модель") == "Модель"
    assert label_text("x" * 1000).endswith("…") and len(label_text("x" * 1000)) == 301


# --------------------------------------------------------------------------- pure: PID -> container


def _proc(tmp_path, pid: int, text: str) -> None:
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "cgroup").write_text(text)


def test_container_ids_are_found_in_cgroup_v1_and_v2_forms(tmp_path):
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    _proc(tmp_path, 10, f"12:pids:/docker/{a}\n0::/docker/{a}\n")
    _proc(tmp_path, 11, f"0::/system.slice/docker-{b}.scope\n")
    _proc(tmp_path, 12, f"0::/docker/{a}/docker/{c}\n")  # Docker in Docker: the inner one
    _proc(tmp_path, 13, "0::/user.slice/user-1000.slice/session-2.scope\n")
    _proc(tmp_path, 14, f"0::/docker/{a[:12]}\n")  # not a full id
    _proc(tmp_path, 15, "garbage\x00\xff" * 100)
    assert container_id_of(10, tmp_path) == a
    assert container_id_of(11, tmp_path) == b
    assert container_id_of(12, tmp_path) == c
    for pid in (13, 14, 15, 99, -1, 0):
        assert container_id_of(pid, tmp_path) is None


def test_a_slow_docker_lookup_does_not_block_the_holder_mapping(tmp_path):
    _proc(tmp_path, 20, "0::/docker/" + "d" * 64 + "\n")

    release = threading.Event()

    class _Named:
        name, labels, attrs = "late-answer", {}, {}

    def slow_lookup(ids):
        release.wait(30)  # Docker does not answer until the test is over
        return {"d" * 64: _Named()}

    try:
        out = holders_for_pids([20, 21], slow_lookup, timeout_s=0.3, proc_root=tmp_path)
        assert not release.is_set()  # returned while the lookup was still blocked: its answer is not used
        assert list(out) == [20] and out[20].container_id == "d" * 64 and out[20].name == "?" and not out[20].managed
    finally:
        release.set()


# --------------------------------------------------------------------------- real containers with hostile labels


def _run_labelled(client, image: str, labels: dict[str, str]):
    return client.containers.run(image, ["x", "--port", str(free_port())], labels=labels, detach=True,
                                 network_mode="host", init=True)


@pytest.mark.docker
def test_foreign_containers_with_broken_labels_are_listed_with_a_warning_and_can_be_stopped(
        vllm_settings, docker_client, fake_vllm_image):
    cases = ["util-inf", "util-nan", "util-five", "profile-list", "profile-deep-list", "profile-types",
             "port-text", "claim-deep", "model-missing"]
    port = str(vllm_settings.vllm_port)  # the fixture removes containers labelled with its port
    made = {case: _run_labelled(docker_client, fake_vllm_image,
                                {**broken(case), "memctl.port": BROKEN[case].get("memctl.port") or port,
                                 "memctl.test_port": port})
            for case in cases}
    evil = _run_labelled(docker_client, fake_vllm_image,
                         labels_with(**{"memctl.model": "x\n\x1b[2Jforged line", "memctl.port": port}))
    foreign = run_foreign(docker_client, fake_vllm_image)
    try:
        backend = make_vllm_backend(vllm_settings)
        deps = {d.handle: d for d in backend.deployments(max_wait_s=10)}
        for case, c in made.items():
            d = deps[c.id]
            assert [w.code for w in d.warnings] == ["deployment.unreadable_labels"], case
            assert d.state is DeploymentState.FAILED, case  # running, but nothing memctl could vouch for
            assert (d.endpoint is None) == (case == "port-text"), case
            assert d.detail["raw_labels"]["memctl.managed"] == "true"
        assert "\n" not in deps[evil.id].model_id and "\x1b" not in deps[evil.id].model_id
        assert deps[evil.id].warnings == ()
        assert foreign.id not in deps
        # Everything else keeps working: claim, and stopping each one on request.
        model = make_cached_model(vllm_settings)
        assert backend.claim(model, FP16, _estimate(model), backend.probe.snapshot()).blockers == ()
        for case in ("util-nan", "profile-deep-list"):
            report = backend.stop(made[case].id)
            assert report.verdict is not Outcome.ERROR and report.expected_bytes == 0
        reports = backend.stop_all_managed(timeout_s=1)
        assert {r.handle for r in reports} == {c.id for k, c in made.items() if k not in ("util-nan",
                                                                                          "profile-deep-list")} | {evil.id}
        assert all(r.verdict is not Outcome.ERROR for r in reports)
        foreign.reload()
        assert foreign.status == "running"
    finally:
        for c in [*made.values(), evil, foreign]:
            try:
                c.remove(force=True)
            except Exception:  # noqa: BLE001 - already stopped by the test
                pass


def _estimate(model):
    from tests.fixtures_docker import estimate_of

    return estimate_of(model.model_id, FP16, GIB)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.mark.docker
def test_endpoint_and_health_probe_use_memctls_bind_address_never_a_labels_host(
        vllm_settings, docker_client, fake_vllm_image):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    c = _run_labelled(docker_client, fake_vllm_image,
                      labels_with(**{"memctl.port": str(port), "memctl.host": "169.254.169.254",
                                     "memctl.test_port": str(vllm_settings.vllm_port)}))
    try:
        d = {x.handle: x for x in make_vllm_backend(vllm_settings).deployments(max_wait_s=10)}[c.id]
        assert d.endpoint == f"http://127.0.0.1:{port}/v1"
        assert d.detail["health"] == "ready"  # probed on 127.0.0.1 (where our server answers), not the label's host
        assert "169.254" not in json.dumps(d.detail)
    finally:
        server.shutdown()
        c.remove(force=True)


# --------------------------------------------------------------------------- races: clean up only what we created


@pytest.mark.docker
def test_a_start_refused_because_another_process_runs_the_model_removes_nothing(vllm_settings, docker_client):
    other_process = make_vllm_backend(vllm_settings)
    theirs = vllm_start(other_process, make_cached_model(vllm_settings), FP16)
    ours = make_vllm_backend(vllm_settings)
    with pytest.raises(ContainerError, match=r"already running \(started by another process\)"):
        vllm_start(ours, make_cached_model(vllm_settings), FP16)
    c = docker_client.containers.get(theirs.handle)
    assert c.status == "running" and other_process.verify(theirs)


@pytest.mark.docker
def test_a_fresh_created_container_of_another_start_is_not_taken_for_stale(vllm_settings, docker_client,
                                                                          fake_vllm_image):
    name = container_name_for("Org/Tiny-Llama")
    pending = docker_client.containers.create(fake_vllm_image, ["x"], name=name,
                                              labels={**GOOD, "memctl.port": str(vllm_settings.vllm_port)})
    try:
        with pytest.raises(ContainerError, match="already running"):
            vllm_start(make_vllm_backend(vllm_settings), make_cached_model(vllm_settings), FP16)
        pending.reload()
        assert pending.status == "created"
    finally:
        pending.remove(force=True)


@pytest.mark.docker
def test_two_starts_racing_leave_the_winner_running(vllm_settings, docker_client):
    settings = with_changes(vllm_settings, vllm_tag="slow")  # 2 s of "loading": both starts overlap
    results: dict[int, object] = {}

    def go(i: int) -> None:
        try:
            results[i] = vllm_start(make_vllm_backend(settings), make_cached_model(settings), FP16)
        except Exception as exc:  # noqa: BLE001 - the loser's error is checked below
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wins = [r for r in results.values() if not isinstance(r, Exception)]
    losses = [r for r in results.values() if isinstance(r, Exception)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert isinstance(losses[0], ContainerError) and "already" in losses[0].message
    winner = docker_client.containers.get(wins[0].handle)
    assert winner.status == "running"
    assert make_vllm_backend(settings).verify(wins[0])


# --------------------------------------------------------------------------- the API key


@pytest.mark.docker
def test_the_api_key_travels_in_the_environment_never_in_args_or_logs(vllm_settings, docker_client, caplog):
    key = "sk-memctl-test-" + os.urandom(6).hex()
    settings = with_changes(vllm_settings, vllm_api_key=key)
    backend = make_vllm_backend(settings)
    with caplog.at_level(logging.DEBUG):
        dep = vllm_start(backend, make_cached_model(settings), FP16)
        backend.verify(dep)
    c = docker_client.containers.get(dep.handle)
    assert key not in json.dumps(c.attrs["Args"]) and key not in json.dumps(c.attrs["Config"]["Cmd"])
    assert key not in json.dumps(c.attrs["Path"])
    assert f"VLLM_API_KEY={key}" in c.attrs["Config"]["Env"]  # how vLLM reads it when --api-key is absent
    from tests.test_vllm_docker_engine import fetch

    assert key not in fetch(settings.vllm_port, "/fake/args")
    assert key not in caplog.text and key not in json.dumps(dep.detail) and key not in repr(dep)


# --------------------------------------------------------------------------- who holds the GPU


@pytest.mark.docker
def test_pids_map_to_their_containers_managed_and_foreign(vllm_settings, docker_client, fake_vllm_image):
    backend = make_vllm_backend(vllm_settings)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16)
    foreign = run_foreign(docker_client, fake_vllm_image, name=f"someone-elses-{vllm_settings.vllm_port}")
    try:
        mine = docker_client.containers.get(dep.handle)
        foreign.reload()
        pid_m, pid_f = mine.attrs["State"]["Pid"], foreign.attrs["State"]["Pid"]
        out = backend.containers_for_pids([pid_m, pid_f, os.getpid(), 999_999_999])
        assert set(out) == {pid_m, pid_f}
        assert out[pid_m].container_id == dep.handle and out[pid_m].managed
        assert out[pid_m].model_id == "Org/Tiny-Llama" and out[pid_m].name == dep.name
        assert out[pid_f].container_id == foreign.id and not out[pid_f].managed and out[pid_f].model_id is None
        assert out[pid_f].name == foreign.name and out[pid_f].image == fake_vllm_image
        foreign.reload()
        assert foreign.status == "running"  # naming a holder touches nothing
    finally:
        foreign.remove(force=True)

