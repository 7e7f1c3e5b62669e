"""Shared test set-up: every test runs with clean MEMCTL_* settings and its own state dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_KEEP = {"MEMCTL_TEST_DOCKER_HOST"}

pytest_plugins = [
    name for name in ("tests.fixtures_models", "tests.fixtures_docker")
    if (ROOT / (name.replace(".", "/") + ".py")).exists()
]


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("MEMCTL_") and key not in _KEEP:
            monkeypatch.delenv(key, raising=False)
    empty_config = tmp_path / "no-user-config.toml"
    empty_config.write_text("")  # an empty user config file: only the defaults apply
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(empty_config))
    monkeypatch.setenv("MEMCTL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEMCTL_TEST_SEAMS", "1")  # the fake NVML seam (MEMCTL_NVML_MODULE) is test-only
    monkeypatch.setenv("MEMCTL_DASHBOARD_SERVES", "false")  # tests that want the dashboard's server say so
    yield
    from memory_controller import oplog

    oplog._PROCESS_WRITE_ERRORS.clear()  # a log write a test made fail is not the next test's (CLI exit codes)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running memctl/streamlit as a subprocess from a test."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MEMCTL_") and k not in _KEEP)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MEMCTL_TEST_SEAMS"] = "1"
    env["MEMCTL_DASHBOARD_SERVES"] = "false"
    # The CLI prints in the configured language (default ru); tests asserting its English text get en
    # explicitly here; a test of the Russian output passes MEMCTL_LANGUAGE="ru".
    env["MEMCTL_LANGUAGE"] = "en"
    env.update(extra)
    return env


@pytest.fixture
def english_cli(monkeypatch):
    """For tests that assert the CLI's English text when they call it in this process (the default is ru)."""
    monkeypatch.setenv("MEMCTL_LANGUAGE", "en")
