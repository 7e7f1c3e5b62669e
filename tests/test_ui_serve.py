"""The dashboard's "what runs" shows, for each model its own server serves, the requests in flight and the
idle-unload countdown (issue 10.7). The dashboard owns the server (in-memory backend) under AppTest."""

from __future__ import annotations

import re
import socket

import httpx

from memory_controller.types import Precision, Profile
from pages import ui_common as ui
from tests.fixtures_models import TINY_ID
from tests.ui_harness import app_factory, texts  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_running_model_shows_requests_in_flight_and_the_unload_countdown(app_factory, hf_cache):  # noqa: F811
    port = free_port()
    at = app_factory(hub=hf_cache, MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=port,
                     MEMCTL_SERVE_IDLE_UNLOAD_S=30)
    small = Profile(mode="inmem", precision=Precision.NF4, context_tokens=64, batch=1, device="cuda")
    ui.ownership().ctl.apply("inmem", TINY_ID, small)  # the owner's controller, as the dashboard's start does
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, trust_env=False).status_code == 200
    at.run()
    assert not at.exception
    page = texts(at)
    row = next(line for line in page.split("\n") if TINY_ID in line and "выгрузка через" in line)
    assert "запросов в работе: 0" in row
    seconds = int(re.search(r"выгрузка через (\d+) с", row).group(1))
    assert 0 < seconds <= 30
