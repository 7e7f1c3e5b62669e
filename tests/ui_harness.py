"""Shared AppTest harness for the dashboard and diagnostic page tests (tests/test_app.py,
tests/test_diagnostic_page.py).

The app is built from the environment, as a user's start would: a fake NVML scenario
(``MEMCTL_FAKE_NVML``), an HF cache, a Docker host that does not exist unless a test passes the
private engine, and the in-memory backend (tests/inmemory_backend.py) added to the configured ones
under the id ``inmem``: the UI's flows run on it wherever the real backends cannot run here.
The controller is process-wide, so every ``make`` forgets the previous one and the fake NVML
module (it reads its scenario at import).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from memory_controller.errors import SettingsError

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
DIAG = str(ROOT / "test_memory_controller.py")
NO_DOCKER = "unix:///nonexistent/memctl-test/docker.sock"
INMEM = "inmem"
INMEM_BACKENDS = '{"inmem": "tests.inmemory_backend:create"}'
GIB = 1024**3

# Reading the shared controller from the test thread (outside a script run) makes Streamlit warn
# "missing ScriptRunContext" on every call: harmless here, and it floods the failure output.
logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)


def reset_shared_state() -> None:
    """Forget the previous test's controller and the NVML scenario read at import."""
    from memory_controller.controller import reset_shared_controller
    from pages import ui_common

    ui_common.release_ownership()  # stop the server a dashboard test started (dashboard_serves)
    st.cache_resource.clear()
    reset_shared_controller()
    sys.modules.pop("tests.fake_pynvml", None)


def controller():
    """The app's shared MemoryController (the one the pages use)."""
    from pages import ui_common

    return ui_common._controller()


def runner():
    """The shared controller's operation runner (operations started from the UI)."""
    return controller().runner


def choose_inmem(at: AppTest) -> AppTest:
    """Select the in-memory backend in the sidebar (it is the only one that can run everywhere)."""
    radio = at.radio(key="f_mode")
    if radio.value != INMEM:
        radio.set_value(INMEM).run()
    return at


@pytest.fixture
def app_factory(monkeypatch, tmp_path) -> Iterator:
    """``make(script=APP, scenario=..., hub=..., docker_host=..., **MEMCTL_env)`` → AppTest after its first run.

    At teardown: waits for running operations, unloads what a test loaded, forgets shared state.
    """
    made: list[AppTest] = []

    def make(script: str = APP, scenario: str = "library_missing", hub: Path | None = None,
             docker_host: str = NO_DOCKER, **env: object) -> AppTest:
        monkeypatch.setenv("MEMCTL_NVML_MODULE", "tests.fake_pynvml")
        monkeypatch.setenv("MEMCTL_FAKE_NVML", scenario)
        monkeypatch.setenv("MEMCTL_DOCKER_HOST", docker_host)
        monkeypatch.setenv("MEMCTL_HF_CACHE_DIR", str(hub or tmp_path / "empty-hub"))
        monkeypatch.setenv("MEMCTL_BACKENDS", INMEM_BACKENDS)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        reset_shared_state()
        at = AppTest.from_file(script, default_timeout=60)
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        made.append(at)
        return at

    yield make
    if made:
        try:
            ctl = controller()
        except SettingsError:  # a test of invalid settings: no controller was ever made
            ctl = None
        if ctl is not None:
            ctl.step_hook = None
            ctl.runner.wait_idle(120)
            if ctl.deployments():
                ctl.emergency_clear()  # give what a test started back before the next test
    reset_shared_state()


def settle(at: AppTest, timeout_s: float = 120) -> AppTest:
    """Wait for running operations to end, then rerun (what the page's poll does)."""
    assert runner().wait_idle(timeout_s), "the operation did not finish in time"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """Every text element of the page, sidebar included, one per line."""
    parts: list[str] = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "success", "info", "warning", "error"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [s.label for s in at.status] + [e.label for e in at.expander]
    return "\n".join(parts)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def buttons(at: AppTest) -> dict[str, object]:
    return {b.key: b for b in at.button if b.key}
