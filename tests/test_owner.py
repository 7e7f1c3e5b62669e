"""One owner per machine: the lock, the published URL and token, take-over after a crash, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from memory_controller.errors import MemctlError
from memory_controller.settings import load_settings
from server.connect import connect
from server.owner import (
    INFO_NAME,
    TOKEN_HEADER,
    OwnerExistsError,
    OwnerLock,
    OwnerUnreachableError,
    lock_is_held,
    read_owner,
)
from server.runner import PortBusyError, ServerHandle
from tests.conftest import ROOT, subprocess_env

# A process that owns the server the way `memctl serve --port 0` does, with this checkout's CLI.
OWNER_SCRIPT = """
import argparse, sys
from memory_controller.settings import load_settings
from memctl_cli.serve import add_commands
parser = argparse.ArgumentParser(prog="memctl")
add_commands(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args, load_settings()))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(**{"MEMCTL_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1",
                             "MEMCTL_CONFIG_FILE": os.environ["MEMCTL_CONFIG_FILE"], **extra})


def start_owner(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, "serve", "--port", "0", *args], cwd=ROOT,
                            env=_env(tmp_path, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_published(settings, proc: subprocess.Popen | None = None, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    info_path = Path(settings.state_dir) / INFO_NAME
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"owner exited {proc.returncode}: {proc.stderr.read()}")
        if info_path.exists():
            info = read_owner(settings, wait_s=0)
            if info is not None and (proc is None or info.pid == proc.pid):
                return info
        time.sleep(0.05)
    raise AssertionError("the owner never published server.json")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _tiny_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app


class _Ctl:  # the runner never calls the controller when given an app
    settings = None


def test_server_publishes_url_pid_and_token_in_a_0600_file_and_cleans_up(tmp_path):
    settings = load_settings()
    handle = ServerHandle(_Ctl(), settings, port=0, app=_tiny_app()).start()
    try:
        path = Path(settings.state_dir) / INFO_NAME
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        data = json.loads(path.read_text())
        assert data["pid"] == os.getpid() and data["url"] == handle.url and data["token"] == handle.token
        assert len(handle.token) >= 32
        assert httpx.get(handle.url + "/health", timeout=5).json() == {"status": "ok"}
        assert lock_is_held(settings)
        assert handle.token not in repr(read_owner(settings))
        # this process is the owner: connect() says "use your own controller"
        assert connect(settings) is None
    finally:
        handle.stop()
    assert not (Path(settings.state_dir) / INFO_NAME).exists()
    assert not lock_is_held(settings)
    assert read_owner(settings) is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(handle.url + "/health", timeout=2)


def test_a_second_server_on_the_machine_is_refused_and_names_the_owner(tmp_path):
    settings = load_settings()
    first = ServerHandle(_Ctl(), settings, port=0, app=_tiny_app()).start()
    try:
        with pytest.raises(OwnerExistsError) as err:
            ServerHandle(_Ctl(), settings, port=0, app=_tiny_app()).start()
        assert str(os.getpid()) in err.value.message and first.url in err.value.message
        assert httpx.get(first.url + "/health", timeout=5).status_code == 200  # the first is untouched
    finally:
        first.stop()


def test_a_busy_port_is_a_clear_error_and_leaves_no_lock(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    settings = load_settings()
    try:
        with pytest.raises(PortBusyError) as err:
            ServerHandle(_Ctl(), settings, port=port, app=_tiny_app()).start()
        assert f"port {port}" in err.value.message and "--port" in err.value.hint
        assert not lock_is_held(settings)
    finally:
        blocker.close()


def test_a_live_lock_without_a_published_address_is_reported_not_ignored(tmp_path):
    settings = load_settings()
    lock = OwnerLock.try_acquire(settings)
    assert lock is not None
    try:
        assert OwnerLock.try_acquire(settings) is None
        with pytest.raises(OwnerUnreachableError) as err:
            read_owner(settings, wait_s=0.2)
        assert "owner lock" in err.value.message
    finally:
        lock.release()
    assert OwnerLock.try_acquire(settings) is not None


def test_serve_in_another_process_is_found_and_used_then_taken_over_after_kill_9(tmp_path):
    settings = load_settings()
    proc = start_owner(tmp_path)
    try:
        info = wait_published(settings, proc)
        # the control API requires the token
        assert httpx.get(info.url + "/control/status", timeout=10).status_code == 401
        assert httpx.get(info.url + "/control/status", headers={TOKEN_HEADER: "x" * 43},
                         timeout=10).status_code == 401
        assert httpx.get(info.url + "/health", timeout=10).status_code == 200
        client = connect(settings)
        assert client is not None and client.owner.pid == proc.pid
        with client:
            assert client.ping()["pid"] == proc.pid
        # a second `memctl serve` is refused while the first lives
        second = subprocess.run([sys.executable, "-c", OWNER_SCRIPT, "serve", "--port", "0"], cwd=ROOT,
                                env=_env(tmp_path), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and f"PID {proc.pid}" in second.stderr
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # the kernel dropped the lock: no owner, and this process can take over
        assert connect(settings) is None
        handle = ServerHandle(_Ctl(), load_settings(), port=0, app=_tiny_app()).start()
        try:
            assert read_owner(settings).pid == os.getpid()
        finally:
            handle.stop()
    finally:
        stop(proc)


def test_ctrl_c_stops_serve_within_seconds_and_removes_the_address(tmp_path):
    settings = load_settings()
    proc = start_owner(tmp_path)
    try:
        info = wait_published(settings, proc)
        assert f"{info.url}/v1" in proc.stdout.readline() + proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(15)  # a hang guard, not a speed bound
        assert rc == 0, proc.stderr.read()
        assert "Traceback" not in proc.stderr.read()
        assert not (Path(settings.state_dir) / INFO_NAME).exists()
        assert read_owner(settings) is None
    finally:
        stop(proc)


def test_unreachable_owner_is_a_clear_error(tmp_path, monkeypatch):
    settings = load_settings()
    handle = ServerHandle(_Ctl(), settings, port=0, app=_tiny_app()).start()
    try:
        monkeypatch.setattr(os, "getpid", lambda: 1)  # look like another process
        handle._server.should_exit = True
        handle._thread.join(10)
        with pytest.raises(MemctlError) as err:
            connect(settings, timeout_s=1)
        assert "does not answer" in err.value.message
    finally:
        monkeypatch.undo()
        handle.stop()


def test_own_or_connect_becomes_the_owner_or_a_client_of_the_live_one(tmp_path):
    from server.connect import own_or_connect

    settings = load_settings()
    made: list[object] = []

    def make() -> _Ctl:
        made.append(_Ctl())
        return made[-1]

    # a live owner in another process: this one becomes its client and builds no controller
    proc = start_owner(tmp_path)
    try:
        info = wait_published(settings, proc)
        got = own_or_connect(settings, make, port=0)
        assert not got.is_owner and got.handle is None and got.ctl.owner.pid == info.pid and made == []
        got.ctl.close()
    finally:
        stop(proc)
    # none (the owner was killed): this process becomes the owner, server on a thread
    got = own_or_connect(settings, make, port=0)
    try:
        assert got.is_owner and got.ctl.local is made[-1] and got.error is None
        assert read_owner(settings).pid == os.getpid()
        assert httpx.get(got.handle.url + "/health", timeout=5).status_code == 200
        with pytest.raises(OwnerExistsError, match="this process already"):
            own_or_connect(settings, make, port=0)
    finally:
        got.handle.stop()


def test_own_or_connect_with_the_port_taken_keeps_a_local_controller_and_says_why(tmp_path):
    from server.connect import own_or_connect

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        got = own_or_connect(load_settings(), _Ctl, port=blocker.getsockname()[1])
        assert got.is_owner and got.handle is None and isinstance(got.error, PortBusyError)
        assert not lock_is_held(load_settings())
    finally:
        blocker.close()


SLOW_OWNER_SCRIPT = """
import sys
from memory_controller import MemoryController
from memory_controller.settings import load_settings
from server.runner import ServerHandle
from tests.inmemory_backend import InMemoryBackend
settings = load_settings()
backend = InMemoryBackend(settings)
backend.start_delay_s = 120
ctl = MemoryController(settings, backends={"inmem": backend})
try:
    ServerHandle(ctl, settings, port=0).serve_forever(on_ready=lambda url: print("ready", url, flush=True))
except KeyboardInterrupt:  # uvicorn hands Ctrl-C on once it has stopped, as `memctl serve` expects
    pass
"""


def test_ctrl_c_during_a_load_cancels_it_and_the_client_gets_a_clean_error(tmp_path, hf_cache):
    import threading

    from memory_controller.errors import OperationCancelledError
    from tests.fixtures_models import TINY_ID
    from tests.model_factory import hf_env

    settings = load_settings()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_OWNER_SCRIPT], cwd=ROOT, env=_env(tmp_path, **hf_env(hf_cache)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_published(settings, proc)
        client = connect(settings)
        got: list[BaseException | object] = []
        worker = threading.Thread(target=lambda: got.append(_catch(lambda: client.apply("inmem", TINY_ID))))
        worker.start()
        deadline = time.monotonic() + 30
        while client.current_operation() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.current_operation()["kind"] == "apply"
        proc.send_signal(signal.SIGINT)
        worker.join(15)
        assert isinstance(got[0], OperationCancelledError), got  # cancelled, not waited for
        assert proc.wait(15) == 0
        assert "Traceback" not in proc.stderr.read()
        client.close()
    finally:
        stop(proc)


def _catch(fn):
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return exc
