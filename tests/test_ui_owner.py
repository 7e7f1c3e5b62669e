"""The dashboard owns the machine (issue 10.1/10.2) and the diagnostic page acts through the owner.

An owner in a subprocess is ``memctl serve`` with the in-memory backend; the dashboard and the
diagnostic page run under AppTest in this process, with the same state dir (where the owner lock
and ``server.json`` live).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import httpx
import pytest

from memory_controller.settings import load_settings
from server.connect import connect
from server.owner import lock_is_held, read_owner
from tests.fixtures_models import TINY_ID
from tests.model_factory import hf_env
from tests.test_owner import start_owner, stop, wait_published
from tests.ui_harness import DIAG, app_factory, buttons, settle, texts  # noqa: F401

BACKENDS = json.dumps({"inmem": "tests.inmemory_backend:create"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def owner(tmp_path, hf_cache, monkeypatch):
    """``memctl serve`` in another process (in-memory backend), with TINY_ID loaded through its client."""
    monkeypatch.setenv("MEMCTL_BACKENDS", BACKENDS)
    proc = start_owner(tmp_path, MEMCTL_BACKENDS=BACKENDS, **hf_env(hf_cache))
    try:
        info = wait_published(load_settings(), proc)
        yield proc, info
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        stop(proc)


def settle_owner(at, client, timeout_s: float = 120):
    """Wait for the owner's operations to end (the page's operations run there), then rerun."""
    deadline = time.monotonic() + timeout_s
    while any(op.running for op in client.operations(0)):
        assert time.monotonic() < deadline, "the owner's operation did not finish in time"
        time.sleep(0.1)
    at.run()
    return at


def diag_row(at, name: str) -> str:
    table = next(m.value for m in at.markdown if "| Проверка |" in m.value)
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[1] == name:
            return cells[0]
    raise AssertionError(f"no row {name!r} in {table}")


def test_dashboard_becomes_the_owner_and_serves_on_its_port(app_factory):  # noqa: F811
    port = free_port()
    at = app_factory(MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=port)
    assert f"Сервер memctl: http://127.0.0.1:{port}" in texts(at)
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, trust_env=False).status_code == 200
    info = read_owner(load_settings(), wait_s=0)
    assert info is not None and info.pid == os.getpid() and info.url == f"http://127.0.0.1:{port}"
    at.run()  # paired once per process: a rerun neither starts a second server nor fails
    assert not at.exception and f"Сервер memctl: http://127.0.0.1:{port}" in texts(at)


def test_a_busy_port_is_said_in_words_not_a_traceback(app_factory):  # noqa: F811
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        at = app_factory(MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=port)
        assert not at.exception
        assert f"Порт {port} на 127.0.0.1 уже занят" in texts(at)
        assert not lock_is_held(load_settings())  # nothing half-taken


def test_dashboard_beside_a_live_owner_names_it(app_factory, owner, hf_cache):  # noqa: F811
    proc, info = owner
    at = app_factory(hub=hf_cache, MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=free_port())
    assert f"PID {proc.pid}, {info.url}" in texts(at)
    assert read_owner(load_settings(), wait_s=0).pid == proc.pid  # the owner is still the other process


def test_dashboard_beside_an_owner_that_stops_answering_says_so_without_a_traceback(app_factory, owner, hf_cache):  # noqa: F811
    proc, info = owner
    at = app_factory(hub=hf_cache, MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=free_port())
    assert f"PID {proc.pid}, {info.url}" in texts(at)
    os.kill(proc.pid, signal.SIGSTOP)  # alive, holding the lock, not answering
    try:
        at.run()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert not at.exception
    page = texts(at)
    assert "Процесс-владелец memctl не отвечает" in page and f"PID {proc.pid}, {info.url}" in page
    at.run()  # answering again: the page is back
    assert not at.exception and "Процесс-владелец memctl не отвечает" not in texts(at)


def test_dashboard_takes_the_machine_over_when_the_other_owner_dies(app_factory, owner, hf_cache):  # noqa: F811
    proc, info = owner
    port = free_port()
    at = app_factory(hub=hf_cache, MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=port)
    assert f"PID {proc.pid}, {info.url}" in texts(at)
    stop(proc)  # killed: the kernel drops its lock
    at.run()
    assert not at.exception and f"Сервер memctl: http://127.0.0.1:{port}" in texts(at)
    assert read_owner(load_settings(), wait_s=0).pid == os.getpid()


def test_dashboard_emergency_clear_beside_an_owner_clears_the_owners_model_too(app_factory, owner, hf_cache):  # noqa: F811
    proc, info = owner
    with connect(load_settings()) as client:
        client.apply("inmem", TINY_ID)
        at = app_factory(hub=hf_cache, MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=free_port())
        at.button(key="btn_emergency").click().run()
        assert f"то же в процессе-владельце memctl (PID {proc.pid})" in texts(at)
        at.button(key="btn_emergency_confirm").click().run()
        settle_owner(at, client)
        assert f"Через процесс-владелец memctl (PID {proc.pid}, {info.url})" in texts(at)
        assert client.deployments() == []


def test_diagnostic_page_emergency_clear_clears_the_model_the_owner_loaded(app_factory, owner, hf_cache):  # noqa: F811
    proc, info = owner
    client = connect(load_settings())
    assert client is not None and client.owner.pid == proc.pid
    with client:
        client.apply("inmem", TINY_ID)
        assert [d.model_id for d in client.deployments()] == [TINY_ID]
        at = app_factory(DIAG, hub=hf_cache)
        assert f"PID {proc.pid}, {info.url}" in texts(at)  # the page says who it acts through
        buttons(at)["diag_run_emergency"].click().run()
        buttons(at)["diag_emergency_confirm"].click().run()
        assert diag_row(at, "🚨 Экстренная очистка") in ("✅", "⚠️")
        page = texts(at)
        assert f"Были загружены: {TINY_ID}" in page  # before the fix: "none loaded" while the owner held it
        assert client.deployments() == []  # cleared in the owner process


def test_diagnostic_page_says_exactly_what_it_could_not_reach(app_factory, owner, hf_cache):  # noqa: F811
    proc, _info = owner
    os.kill(proc.pid, signal.SIGSTOP)  # alive, holding the lock, not answering
    at = app_factory(DIAG, hub=hf_cache)
    buttons(at)["diag_run_emergency"].click().run()
    buttons(at)["diag_emergency_confirm"].click().run()
    assert diag_row(at, "🚨 Экстренная очистка") == "❌"
    assert "Процесс-владелец memctl не отвечает" in texts(at)
    assert "none loaded" not in texts(at) and "Загруженных моделей memctl не было" not in texts(at)
