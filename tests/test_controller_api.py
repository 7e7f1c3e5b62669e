"""One controller API across processes (issue 17.1) and the owner's identity (issue 19.13).

* The drift test: ``ControllerAPI``'s calls, the control routes and the two implementations
  (``InProcessController``, ``RemoteController``) name the same calls with the same parameters.
* With ``memctl serve`` in another process, a second dashboard (AppTest, this process) applies a
  model through it: the owner's ``memctl ps`` lists it and this process holds none; ``memctl status
  --json`` from a third process lists the owner's deployments.
* A foreign server at the URL ``server.json`` names never receives the token, and the CLI says so;
  a ``200 {}`` is never taken for a result.
"""

from __future__ import annotations

import http.server
import inspect
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from memory_controller.api import LOCAL_CALLS, ROUTED_CALLS, ControllerAPI, InProcessController, api_calls
from memory_controller.settings import load_settings
from server.client import OwnerAnswerError, RemoteController
from server.owner import (
    TOKEN_HEADER,
    OwnerIdentityError,
    OwnerInfo,
    listener_is_pid,
    lock_holder_pids,
    owner_proof,
    read_owner,
)
from tests.conftest import ROOT
from tests.fixtures_models import TINY_ID
from tests.test_owner import _env, stop, wait_published
from tests.test_ui_owner import owner, settle_owner  # noqa: F401 - owner: `memctl serve` in another process
from tests.ui_harness import app_factory, buttons, choose_inmem, texts  # noqa: F401
from tests.ui_harness import controller as local_controller


# ============================================================================ drift
def _params(fn) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name != "self"]


def drift(protocol: type, route_paths: set[str], *implementations: type) -> list[str]:
    """Every way the Protocol, the routes and the implementations disagree, in words."""
    problems = []
    calls = [n for n in vars(protocol) if callable(vars(protocol)[n]) and not n.startswith("_")]
    for name in calls:
        if name not in LOCAL_CALLS and f"/{name}" not in route_paths:
            problems.append(f"no route /{name}")
        for impl in implementations:
            fn = getattr(impl, name, None)
            if fn is None:
                problems.append(f"{impl.__name__} lacks {name}")
            elif _params(fn) != _params(getattr(protocol, name)):
                problems.append(f"{impl.__name__}.{name}{inspect.signature(fn)} differs from the Protocol")
    routed = {f"/{n}" for n in calls if n not in LOCAL_CALLS}
    problems += [f"route {p} is not in the Protocol" for p in sorted(route_paths - routed - {"/ping", "/hello"})]
    return problems


def control_paths() -> set[str]:
    """The paths the control API serves, as the app mounts it (``/control`` stripped)."""
    from fastapi import FastAPI

    from server.control import make_control_router

    app = FastAPI()
    app.include_router(make_control_router(InProcessController(local_controller()), "t" * 43), prefix="/control")
    return {path.removeprefix("/control") for path in app.openapi()["paths"]}


def test_the_protocol_the_routes_and_both_implementations_name_the_same_calls():
    assert len(api_calls()) >= 20 and set(ROUTED_CALLS) == set(api_calls()) - LOCAL_CALLS
    assert drift(ControllerAPI, control_paths(), InProcessController, RemoteController) == []
    assert isinstance(InProcessController(local_controller()), ControllerAPI)


def test_the_drift_check_catches_a_missing_route_a_renamed_parameter_and_an_extra_route():
    class Skewed(RemoteController):
        def history(self, count: int = 50):  # renamed parameter
            return []

    paths = control_paths()
    found = drift(ControllerAPI, (paths - {"/holders"}) | {"/secret"}, InProcessController, Skewed)
    assert "no route /holders" in found
    assert any(p.startswith("Skewed.history") for p in found)
    assert "route /secret is not in the Protocol" in found


# ============================================================================ across processes
def _memctl(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memctl_cli", *args], cwd=ROOT, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=120)


def test_a_second_dashboard_applies_through_the_owner_which_ps_and_status_show(
        app_factory, owner, hf_cache, tmp_path, monkeypatch):  # noqa: F811
    from server.connect import connect
    from tests.model_factory import hf_env
    from tests.test_ui_owner import BACKENDS

    proc, info = owner
    at = app_factory(hub=hf_cache, MEMCTL_DASHBOARD_SERVES="true")
    assert f"PID {proc.pid}, {info.url}" in texts(at)  # this dashboard acts through the owner
    choose_inmem(at)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    buttons(at)["btn_apply"].click().run()
    assert not at.exception
    with connect(load_settings()) as client:
        settle_owner(at, client)
        assert [d.model_id for d in client.deployments()] == [TINY_ID]
    assert f"unload::{TINY_ID}" in buttons(at)  # the owner's model, listed with its 🗑️
    assert local_controller().deployments() == []  # this process holds no model
    assert local_controller().runner.finished() == []  # nor ran the apply itself

    env = {"MEMCTL_BACKENDS": BACKENDS, **hf_env(hf_cache)}
    ps = _memctl(tmp_path, "ps", "--json", env=env)
    assert ps.returncode == 0, ps.stderr
    listed = json.loads(ps.stdout)
    assert listed["server"]["pid"] == proc.pid and [m["model"] for m in listed["models"]] == [TINY_ID]

    status = _memctl(tmp_path, "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert [d["model_id"] for d in json.loads(status.stdout)["deployments"]] == [TINY_ID]

    # and the unload and clear buttons act in the owner too
    buttons(at)[f"unload::{TINY_ID}"].click().run()
    with connect(load_settings()) as client:
        settle_owner(at, client)
        assert client.deployments() == []
        buttons(at)["btn_clear"].click().run()
        settle_owner(at, client)
        kinds = [(op.kind, type(op.result).__name__) for op in client.operations(3)]
        assert kinds[:3] == [("clear_memory", "ClearReport"), ("unload", "ReleaseReport"), ("apply", "OperationRecord")]
    assert local_controller().runner.finished() == []  # none of it ran in this process
    assert "| Устройство | Было занято | Стало занято | Освобождено |" in texts(at)  # the owner's report, here


# ============================================================================ identity
class _Foreign(http.server.ThreadingHTTPServer):
    """A server that is not memctl's: records every request; answers 200 {} (or ``answer``)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.answer: dict | None = None  # None: 200 {} to everything
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(http.server.BaseHTTPRequestHandler):
    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        server: _Foreign = self.server  # type: ignore[assignment]
        server.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        body = b"{}"
        if server.answer is not None and self.path.startswith("/control/hello"):
            nonce = self.path.split("nonce=", 1)[1].split("&", 1)[0]
            body = json.dumps({"pid": server.answer["pid"],
                               "proof": owner_proof(server.answer["token"], nonce, server.answer["pid"])}).encode()
        elif server.answer is not None and self.path.startswith("/control/ping"):
            body = json.dumps({"ok": True, "pid": server.answer["pid"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *args: object) -> None:
        pass


LOCK_HOLDER = """
import sys, time
from memory_controller.settings import load_settings
from server.owner import OwnerLock
lock = OwnerLock.try_acquire(load_settings())
lock.publish(sys.argv[1])
print("ready", flush=True)
time.sleep(300)
"""


@pytest.fixture()
def foreign(tmp_path):
    """A live process holding the owner lock whose server.json names a foreign server (in this process)."""
    server = _Foreign()
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, server.url], cwd=ROOT, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = wait_published(load_settings(), proc)
        yield server, info
    finally:
        stop(proc)
        server.shutdown()
        server.server_close()


def _tokens_sent(server: _Foreign, info: OwnerInfo) -> list[str]:
    return [path for _m, path, headers in server.seen
            if headers.get(TOKEN_HEADER.lower()) == info.token or info.token in path]


@pytest.mark.usefixtures("english_cli")  # asserts the CLI's English text
@pytest.mark.parametrize("command", [["status"], ["ps"], ["unload", TINY_ID], ["containers"], ["models"]])
def test_a_foreign_server_at_the_owner_url_never_gets_the_token_and_the_cli_says_so(foreign, command, capsys):
    from memctl_cli.main import main

    server, info = foreign
    code = main(command)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and "did not send its token" in err
    assert _tokens_sent(server, info) == []
    if Path("/proc/net/tcp").exists():  # Linux names the listener: refused before any request
        assert f"not the memctl owner process (PID {info.pid})" in err and server.seen == []


@pytest.mark.usefixtures("english_cli")  # asserts the CLI's English text
def test_without_the_listener_check_the_proof_still_keeps_the_token(foreign, monkeypatch, capsys):
    """Where the system cannot say who listens (another user's process), the server must prove it
    holds the token; a foreign one cannot, and gets only the nonce."""
    import server.connect as connect_mod
    from memctl_cli.main import main

    monkeypatch.setattr(connect_mod, "listener_is_pid", lambda url, pid: None)
    server, info = foreign
    assert main(["unload", TINY_ID]) == 1
    err = capsys.readouterr().err
    assert "did not prove it is the memctl owner" in err and "did not send its token" in err
    assert [path.split("?")[0] for _m, path, _h in server.seen] == ["/control/hello"]
    assert _tokens_sent(server, info) == []


def test_a_pid_that_does_not_hold_the_lock_is_refused_before_anything_is_sent(foreign):
    server, info = foreign
    if Path("/proc/locks").exists():  # Linux: the kernel names the lock's holder
        assert lock_holder_pids(load_settings()) == {info.pid}
        assert listener_is_pid(info.url, info.pid) is False  # the foreign server is this process's socket
    client = RemoteController(info, load_settings(), timeout_s=5)
    with pytest.raises(OwnerIdentityError, match="does not hold the memctl owner lock"):
        client.verify(lock_pids={info.pid + 1})
    with pytest.raises(OwnerIdentityError, match="not a loopback"):
        RemoteController(OwnerInfo("http://192.0.2.7:8765", info.pid, info.token, 0.0), load_settings()).verify()
    assert server.seen == []


def test_a_200_with_an_empty_object_is_not_taken_for_a_result(foreign, monkeypatch):
    """Even a server that passes the identity check (here: one that knows the token) is not believed
    when its answer is not what the call returns: ``unload`` does not report "unloaded"."""
    server, info = foreign
    server.answer = {"pid": info.pid, "token": info.token}
    client = RemoteController(info, load_settings(), timeout_s=5)
    client.verify(lock_pids={info.pid}, listener_ok=None)
    for call in (lambda: client.unload(TINY_ID), lambda: client.deployments(), lambda: client.status(),
                 lambda: client.submit_emergency(), lambda: client.operations()):
        with pytest.raises(OwnerAnswerError, match="not its result"):
            call()
    assert read_owner(load_settings()).pid == info.pid  # nothing else changed


def test_a_cluster_export_through_the_client_is_the_owners_document(hf_cache):
    """The export (a document for a cluster engine) comes back as the same ExportResult, and its
    refusals as the same error classes (DoesNotFitError with the GPU count that would fit)."""
    from memory_controller import MemoryController
    from memory_controller.clusterfit import BadExportRequestError, DoesNotFitError
    from server.runner import ServerHandle
    from tests.fake_pynvml import FakeNvml

    settings = load_settings(hf_cache_dir=hf_cache, local_model_dirs=[])
    ctl = MemoryController(settings, nvml=FakeNvml(gpus=[]).module())
    handle = ServerHandle(ctl, settings, port=0).start()
    try:
        with RemoteController(read_owner(settings), settings, timeout_s=30) as client:
            formats = client.export_formats()
            assert formats and formats == ctl.export_formats()
            for fmt in formats:
                remote = client.export(fmt, TINY_ID, gpu_bytes=24 << 30, gpus=1)
                assert remote == ctl.export(fmt, TINY_ID, gpu_bytes=24 << 30, gpus=1)
                assert remote.text and remote.fit.context_tokens > 0
            with pytest.raises(DoesNotFitError) as err:
                client.export(formats[0], TINY_ID, gpu_bytes=1 << 20)
            assert err.value.code == "export.does_not_fit"
            with pytest.raises(BadExportRequestError):
                client.export(formats[0], TINY_ID, gpu_bytes=24 << 30, context=10**9)
    finally:
        handle.stop()
