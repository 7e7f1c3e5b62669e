"""`memctl serve` as a process against its surroundings: SIGTERM (systemd, `docker stop`) cleans up like
Ctrl-C; an unusable state dir is a clear message naming the path and the fix (never "internal error"); a
history that cannot be written is said in the serve output and in the control API's status."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from memory_controller import safefiles
from memory_controller.errors import SettingsError
from memory_controller.settings import load_settings
from server.owner import INFO_NAME, TOKEN_HEADER
from tests.conftest import ROOT
from tests.fixtures_models import TINY_ID
from tests.model_factory import hf_env
from tests.test_owner import OWNER_SCRIPT, _env, start_owner, stop, wait_published

BACKENDS = json.dumps({"inmem": "tests.inmemory_backend:create"})


def _serve_once(state_dir: Path, hf_cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = _env(tmp_path, MEMCTL_BACKENDS=BACKENDS, **hf_env(hf_cache))
    env["MEMCTL_STATE_DIR"] = str(state_dir)
    return subprocess.run([sys.executable, "-c", OWNER_SCRIPT, "serve", "--port", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _file(tmp_path: Path) -> Path:
    p = tmp_path / "state-file"
    p.write_text("not a folder")
    return p


def _under_file(tmp_path: Path) -> Path:
    return _file(tmp_path) / "memctl"


def _world_writable(tmp_path: Path, mode: int = 0o777) -> Path:
    p = tmp_path / "shared-state"
    p.mkdir()
    os.chmod(p, mode)
    return p


STATE_CASES = {
    "a file": (_file, "is a file, not a folder"),
    "below a file": (_under_file, "a path above it is a file"),
    "not creatable": (lambda tmp: Path("/sys/memctl-state-test"), "cannot be created"),
    "world-writable": (_world_writable, "writable by every user"),
    "world-writable sticky": (lambda tmp: _world_writable(tmp, 0o1777), "writable by every user"),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_an_unusable_state_dir_is_named_with_the_fix(case, tmp_path, hf_cache):
    make, words = STATE_CASES[case]
    state = make(tmp_path)
    r = _serve_once(state, hf_cache, tmp_path)
    assert r.returncode != 0
    assert words in r.stderr and str(state) in r.stderr, r.stderr
    assert "MEMCTL_STATE_DIR" in r.stderr or "chmod 700" in r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr


def test_the_state_dir_check_creates_a_private_folder(tmp_path):
    p = safefiles.check_state_dir(tmp_path / "new" / "state")
    assert p.is_dir() and not stat.S_IMODE(p.stat().st_mode) & stat.S_IWOTH
    os.chmod(p, 0o757)
    with pytest.raises(SettingsError, match="writable by every user"):
        safefiles.check_state_dir(p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("loaded", [False, True])
def test_sigterm_cleans_up_like_ctrl_c(sig, loaded, tmp_path, hf_cache, monkeypatch):
    for key, value in hf_env(hf_cache).items():
        monkeypatch.setenv(key, value)
    proc = start_owner(tmp_path, MEMCTL_BACKENDS=BACKENDS, **hf_env(hf_cache))
    try:
        settings = load_settings()
        info = wait_published(settings, proc)
        if loaded:
            r = httpx.post(info.url + "/control/apply", json={"backend_id": "inmem", "model_id": TINY_ID},
                           headers={TOKEN_HEADER: info.token}, timeout=60)
            assert r.status_code == 200, r.text
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 0, err
    assert "memctl server stopped" in err and "Traceback" not in err
    assert not (Path(settings.state_dir) / INFO_NAME).exists()  # the token is not left behind


def _symlinked_log(state: Path) -> None:
    (state / "elsewhere.jsonl").write_text("")
    (state / "operations.jsonl").symlink_to(state / "elsewhere.jsonl")


def _folder_log(state: Path) -> None:
    (state / "operations.jsonl").mkdir()


def _folder_lock(state: Path) -> None:
    (state / "operations.jsonl.lock").mkdir()


@pytest.mark.parametrize("spoil,words", [(_symlinked_log, "symbolic link"), (_folder_log, "is a folder"),
                                         (_folder_lock, "could not write the operation log")])
def test_a_history_that_cannot_be_written_is_said_in_serve_output_and_status(spoil, words, tmp_path, hf_cache,
                                                                               monkeypatch):
    for key, value in hf_env(hf_cache).items():
        monkeypatch.setenv(key, value)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    spoil(state)
    proc = start_owner(tmp_path, MEMCTL_BACKENDS=BACKENDS, **hf_env(hf_cache))
    try:
        info = wait_published(load_settings(), proc)
        headers = {TOKEN_HEADER: info.token}
        r = httpx.post(info.url + "/control/apply", json={"backend_id": "inmem", "model_id": TINY_ID},
                       headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        status = httpx.get(info.url + "/control/status", headers=headers, timeout=60).json()
        problems = status["history"]["write_errors"]
        assert problems and words in problems[0] and "MEMCTL_STATE_DIR" in problems[0], problems
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert "could not write the operation log" in err and words in err, err
