""""Процессы, занимающие память" (issue 13.1-4) on the dashboard and the diagnostic page: a stand-in
Ollama (tests/fake_ollama.py) whose runner is a real process named ``ollama runner`` holding memory on
the fake NVML GPU, and a foreign process (this test's parent) that memctl names and never touches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fake_ollama import FakeOllama, FakeOllamaModel
from tests.fake_pynvml import GIB, FakeProcess
from tests.fixtures_models import TINY_ID
from tests.ui_harness import APP, DIAG, app_factory, buttons, choose_inmem, controller, settle, texts  # noqa: F401

MIB = 1024**2
OLLAMA_GIB = 13.1
# 24 GiB card; with Ollama's 13.1 GiB and a foreign 2 GiB, 100 MiB stay free
SPEC = '{"gpus": [{"total_gib": 24, "used_gib": %f}]}' % (24 - OLLAMA_GIB - 2 - 100 / 1024)


@pytest.fixture
def runner_pid(tmp_path):
    """A real process whose command line reads ``ollama runner`` (sh running the script ./runner)."""
    (tmp_path / "runner").write_text("sleep 120; :\n")
    proc = subprocess.Popen(["ollama", "runner"], executable="/bin/sh", cwd=tmp_path)
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def crowded(app_factory, hf_cache, runner_pid):  # noqa: F811
    """The dashboard (or the page named) on a GPU held by Ollama's gpt-oss:20b and a foreign process."""
    with FakeOllama([], unload_delay_s=0.1, memory_delay_s=0.2) as fake:
        def make(script=None, **env):
            at = app_factory(script or APP, SPEC, hub=hf_cache, MEMCTL_OLLAMA_HOST=fake.host, **env)
            gpu = sys.modules["tests.fake_pynvml"]._ACTIVE.gpus[0]
            gpu.used_bytes += 2 * GIB
            gpu.processes.append(FakeProcess(pid=os.getppid(), usedGpuMemory=2 * GIB))
            model = FakeOllamaModel("gpt-oss:20b", int(OLLAMA_GIB * GIB), gpu=gpu, runner_pid=runner_pid)
            fake.models.append(model)
            fake._hold(model)
            controller().holder_source("ollama").loaded(max_age_s=0)  # the page's first run saw Ollama empty: ask again
            at.run()
            return at, gpu

        yield make, fake


def table(at) -> str:
    return next(m.value for m in at.markdown if "| Устройство | PID |" in m.value)


def test_holders_are_named_with_kind_user_memory_and_advice(crowded, runner_pid):
    make, _fake = crowded
    at, _gpu = make()
    rows = table(at)
    assert f"| {runner_pid} | Ollama runner — gpt-oss:20b | модель Ollama |" in rows
    assert "| 13.10 GiB | Модель Ollama gpt-oss:20b: выгрузите её здесь (🗑️)" in rows
    assert f"| {os.getppid()} |" in rows and "| другая программа |" in rows
    assert f"Другая программа (PID {os.getppid()}): закройте её, если она не нужна; memctl её не останавливает" in rows
    assert "Модели, загруженные в Ollama" in texts(at)  # Ollama's own list, when it answers


def test_trash_button_unloads_the_ollama_model(crowded, runner_pid):
    make, fake = crowded
    at, gpu = make()
    free_before = gpu.total_bytes - gpu.used_bytes
    buttons(at)["ollama_unload::gpt-oss:20b"].click().run()
    assert fake._ps()[1]["models"] == []
    assert "gpt-oss:20b выгружена из Ollama" in texts(at)
    assert gpu.total_bytes - gpu.used_bytes - free_before == int(OLLAMA_GIB * GIB)
    at.run()
    assert "ollama_unload::gpt-oss:20b" not in buttons(at)
    assert os.getppid() in [p.pid for p in gpu.processes]  # the foreign process is untouched


def test_plan_offers_to_unload_ollama_and_applies_after_the_tick(crowded):
    make, fake = crowded
    at, _gpu = make()
    choose_inmem(at)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    box = at.checkbox(key="f_unload_ollama")
    assert box.label == "Также выгрузить из Ollama: gpt-oss:20b, 13.10 GiB"
    page = texts(at)
    assert "Память на gpu:0 занята другими: 15.10 GiB" in page and "Не помещается." in [x.strip("❌ ") for x in page.splitlines()]
    assert f"{TINY_ID} сейчас не помещается в свободную память: IDE нечего отдать" in page
    assert [m["name"] for m in fake._ps()[1]["models"]] == ["gpt-oss:20b"]  # not ticked: Ollama untouched
    box.check().run()
    page = texts(at)
    assert "Помещается" in [x.strip("✅ ") for x in page.splitlines()] and "Выгрузка моделей Ollama" in page  # the step is in the plan shown
    assert not at.button(key="btn_apply").disabled
    at.button(key="btn_apply").click().run()
    settle(at)
    assert fake._ps()[1]["models"] == []
    assert [d.model_id for d in controller().deployments()] == [TINY_ID]


def test_plan_blocked_by_a_foreign_process_names_it(app_factory, hf_cache):  # noqa: F811
    at = app_factory(APP, '{"gpus": [{"total_gib": 24, "used_gib": 0}]}', hub=hf_cache)
    gpu = sys.modules["tests.fake_pynvml"]._ACTIVE.gpus[0]
    gpu.used_bytes = 24 * GIB - 100 * MIB
    gpu.processes.append(FakeProcess(pid=os.getppid(), usedGpuMemory=20 * GIB))
    choose_inmem(at)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    page = texts(at)
    assert f"PID {os.getppid()}" in page and "memctl никогда не останавливает процессы" in page
    assert at.button(key="btn_apply").disabled


def test_emergency_dialog_lists_ollama_and_its_result_names_what_remains(crowded):
    make, fake = crowded
    at, _gpu = make()
    at.button(key="btn_emergency").click().run()
    dialog = texts(at)
    assert "попросит Ollama выгрузить его модели: gpt-oss:20b" in dialog and "Продолжить?" in dialog
    at.button(key="btn_emergency_confirm").click().run()
    settle(at)
    assert fake._ps()[1]["models"] == []
    page = texts(at)
    assert "Память все еще занята" in page and f"PID {os.getppid()}" in page
    assert "другая программа" in page and "memctl её не останавливает" in page


def test_emergency_dialog_leaves_ollama_out_when_the_setting_is_off(crowded):
    make, _fake = crowded
    at, _gpu = make(MEMCTL_EMERGENCY_UNLOADS_OLLAMA="false")
    at.button(key="btn_emergency").click().run()
    assert "Ollama" not in next(w.value for w in at.warning if "Продолжить?" in w.value)


def test_diagnostic_page_shows_the_same_holder_rows(crowded, runner_pid):
    make, _fake = crowded
    at, _gpu = make(DIAG)
    rows = table(at)
    assert f"| {runner_pid} | Ollama runner — gpt-oss:20b | модель Ollama |" in rows
    assert f"| {os.getppid()} |" in rows
