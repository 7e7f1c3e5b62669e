"""The "🔌 Подключить IDE" section (issue 10.9): the numbers equal what `memctl ide` prints and what the
server enforces, for a model that is only selected and for one that runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from memory_controller.ide import max_output_tokens
from server.served import served_context
from tests.conftest import ROOT
from tests.fixtures_models import TINY_ID
from tests.model_factory import hf_env
from tests.test_owner import OWNER_SCRIPT, _env
from tests.ui_harness import INMEM_BACKENDS, app_factory, choose_inmem, controller, settle, texts  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ide_values(at) -> dict[str, str]:
    """{label: value} of the section's copyable fields (each label is a bold line before its st.code)."""
    exp = next(e for e in at.expander if e.label == "🔌 Подключить IDE")
    labels = [m.value.strip("*") for m in exp.markdown if m.value.startswith("**")]
    codes = [c.value for c in exp.code]
    return dict(zip(labels, codes, strict=True))


def memctl_ide(tmp_path, hf_cache, *args: str) -> subprocess.CompletedProcess:
    env = _env(tmp_path, MEMCTL_BACKENDS=INMEM_BACKENDS, **hf_env(hf_cache))
    return subprocess.run([sys.executable, "-c", OWNER_SCRIPT, "ide", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def cli_kilo(tmp_path, hf_cache) -> str:
    cli = memctl_ide(tmp_path, hf_cache, "kilo", "--model", TINY_ID)
    assert cli.returncode == 0, cli.stderr
    return cli.stdout


def test_ide_section_numbers_equal_memctl_ide_for_the_selected_and_the_running_model(
        app_factory, hf_cache, tmp_path):  # noqa: F811
    port = free_port()
    at = choose_inmem(app_factory(hub=hf_cache, MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=port))
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    base = f"http://127.0.0.1:{port}/v1"

    # selected, not running: the context the owner would serve it with (plan purpose="ide")
    values = ide_values(at)
    _, planned, _ = served_context(controller(), TINY_ID)
    assert values == {"Base URL": base, "ID модели": TINY_ID, "Окно контекста (токенов)": str(planned),
                      "Максимум токенов ответа": str(max_output_tokens(planned))}
    assert "Ключ API" not in values  # loopback: no key
    cli = memctl_ide(tmp_path, hf_cache, "roo", "--model", TINY_ID)  # another process, through this owner
    assert cli.returncode == 0, cli.stderr
    cfg = json.loads(cli.stdout)["providerProfiles"]["apiConfigs"]["memctl"]
    assert cfg["openAiBaseUrl"] == base and cfg["openAiModelId"] == TINY_ID
    assert cfg["openAiCustomModelInfo"]["contextWindow"] == planned
    assert cfg["openAiCustomModelInfo"]["maxTokens"] == max_output_tokens(planned)
    # the tiny model's window is under the IDE minimum: said in the section as in `memctl ide`; with free
    # memory to spare the bound is the model's own maximum (2048), so the advice is to pick another model,
    # never to free memory (issue 20.6), and `memctl ide` says it once, without a contradicting note
    assert planned == 2048 < 32768 and "below the 32768" in cli.stderr
    assert "the model's own maximum: more memory will not help" in cli.stderr
    assert "free memory" not in cli.stderr.lower(), cli.stderr
    page = texts(at)
    assert "меньше 32768, нужных ассистенту в IDE, и это максимум самой модели" in page
    assert "Освободите память" not in page
    ide = next(e for e in at.expander if e.label == "🔌 Подключить IDE")  # the cluster export has its own
    labels = [b.label for b in ide.get("download_button")]
    assert labels == ["⬇️ Настройки Roo Code (JSON)", "⬇️ Continue config.yaml", "⬇️ Kilo Code kilo.json",
                      "⬇️ aider: .aider.model.metadata.json", "⬇️ aider: .aider.model.settings.yml"]
    kilo = json.loads(cli_kilo(tmp_path, hf_cache))
    assert kilo["provider"]["memctl"]["models"][TINY_ID]["limit"]["context"] == planned

    # running: the deployment's own context
    at.button(key="btn_apply").click().run()
    settle(at)
    (dep,) = controller().deployments()
    values = ide_values(at)
    assert values["Окно контекста (токенов)"] == str(dep.context_tokens)
    assert values["Максимум токенов ответа"] == str(max_output_tokens(dep.context_tokens))
    cli = memctl_ide(tmp_path, hf_cache, "continue")
    assert cli.returncode == 0, cli.stderr
    assert f"contextLength: {dep.context_tokens}" in cli.stdout
    assert f"maxTokens: {max_output_tokens(dep.context_tokens)}" in cli.stdout

    # an emergency clear pauses loads on demand: the section says so and resumes them
    controller().emergency_clear()
    at.run()
    assert any("приостановлена после экстренной очистки" in w.value for w in at.warning)
    at.button(key="ide_resume").click().run()
    assert controller().serving_pause() is None
    assert not any("приостановлена" in w.value for w in at.warning)


def test_ide_section_without_a_server_says_how_to_start_it(app_factory, hf_cache):  # noqa: F811
    at = choose_inmem(app_factory(hub=hf_cache))  # tests: dashboard_serves is off
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    assert "запустите `memctl serve`, он будет отвечать на http://127.0.0.1:8765" in texts(at)
    assert ide_values(at)["Base URL"] == "http://127.0.0.1:8765/v1"


def test_ide_section_shows_the_key_only_beyond_loopback(app_factory, hf_cache):  # noqa: F811
    at = choose_inmem(app_factory(hub=hf_cache, MEMCTL_BIND_ADDRESS="0.0.0.0", MEMCTL_ALLOW_NON_LOOPBACK_BIND="true",
                                  MEMCTL_SERVE_API_KEY="sk-local-test-key"))
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    assert ide_values(at)["Ключ API"] == "sk-local-test-key"
