"""The dashboard in a real browser: ``streamlit run app.py`` on 127.0.0.1, driven through Debian's
Chromium with Playwright (``executable_path="/usr/bin/chromium"``; ``playwright install`` is never run).

This machine's own setting, untouched: no GPU (the real ``pynvml`` finds no driver) and no Docker
engine at the configured address; the in-memory backend (tests/inmemory_backend.py) is added to the
configured ones, so the path runs wherever the real backends cannot. The HF cache holds the tiny
test models. The user's path: the page explains itself, choose the tiny model, apply, see it
loaded (in a second tab too), unload it and read the report, run the emergency clear behind its
confirmation; the tab logs no console warnings (the chart is never handed an empty series).
Screenshots go to ``artifacts/browser/`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.fixtures_models import TINY_ID
from tests.model_factory import hf_env

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NO_DOCKER = "unix:///nonexistent/memctl-browser-test/docker.sock"
SERVED: dict = {}  # the dashboard's memctl server: port, state dir, environment (set by the server fixture)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer /_stcore/health within {timeout_s} s")


@pytest.fixture(scope="module")
def server(hf_cache, tmp_path_factory) -> Iterator[str]:
    """``streamlit run app.py`` as a subprocess on a free 127.0.0.1 port; yields its URL."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api")
    state = tmp_path_factory.mktemp("browser_state")
    for old in ARTIFACTS.glob("*.png"):  # screenshots of an earlier run must not pass for this one
        old.unlink()
    port = _free_port()
    SERVED.update(port=_free_port(), state=state)
    (state / "no-user-config.toml").write_text("")  # an empty user config file: only the defaults apply
    env = subprocess_env(**hf_env(hf_cache), MEMCTL_STATE_DIR=str(state / "state"),
                         MEMCTL_CONFIG_FILE=str(state / "no-user-config.toml"), MEMCTL_DOCKER_HOST=NO_DOCKER,
                         MEMCTL_POLL_INTERVAL_S="1", MEMCTL_BACKENDS='{"inmem": "tests.inmemory_backend:create"}',
                         # the dashboard owns the machine: it runs the memctl server (issue 10.1)
                         MEMCTL_DASHBOARD_SERVES="true", MEMCTL_SERVE_PORT=str(SERVED["port"]),
                         MEMCTL_LANGUAGE="ru")  # the user's default: the test reads the Russian UI
    SERVED["env"] = env
    log = open(state / "streamlit.log", "wb")  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
         # Streamlit's file watcher re-walks the checkout (.venv included) whenever inotify overflows,
         # which other test processes writing here trigger: seconds of CPU per minute for nothing.
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        tail = (state / "streamlit.log").read_text(errors="replace")[-4000:]
        (ARTIFACTS / "streamlit.log").parent.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "streamlit.log").write_text(tail)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _no_traceback(page) -> None:
    assert page.locator("[data-testid=stException]").count() == 0
    assert "Traceback" not in page.inner_text("body")


def _open(browser, url: str, console: list[str] | None = None):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})  # issue 20.10: the user's window
    page.set_default_timeout(30_000)
    if console is not None:
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("warning", "error") else None)
    page.goto(url)
    page.wait_for_selector("[data-testid=stMetricValue]")
    return page


def test_user_loads_and_unloads_a_cached_model_on_cpu_then_clears_everything(server, browser):
    console: list[str] = []
    page = _open(browser, server, console)
    try:
        _user_path(page, browser, server)
        vega = [c for c in console if "Infinite extent" in c or "WARN" in c]
        assert not vega, vega[:5]  # issue 12.8: no Vega warnings from an empty/NaN series
    except BaseException:
        _shot(page, "failure")  # what the page showed when it went wrong
        raise
    finally:
        page.close()


def _user_path(page, browser, server: str) -> None:
    from playwright.sync_api import expect

    sidebar = page.locator("[data-testid=stSidebar]")

    # first paint: the sidebar section, the guide's four figures, and what was found here
    expect(sidebar.get_by_text("🔧 Управление режимами и памятью")).to_be_visible()
    for label in ("Оперативная память (всего)", "Используется", "Доступно", "Утилизация"):
        expect(sidebar.get_by_text(label, exact=True)).to_be_visible()
    expect(page.get_by_text("GPU NVIDIA не найден", exact=False)).to_be_visible()
    expect(page.get_by_text("vLLM недоступен", exact=False).first).to_be_visible()

    # the live panel reruns on its own (poll 1 s) and draws the chart once there are two samples
    stamp = page.get_by_text(re.compile(r"обновлено в \d\d:\d\d:\d\d"))
    first = stamp.inner_text()
    expect(stamp).not_to_have_text(first, timeout=10_000)
    expect(page.locator("[data-testid=stVegaLiteChart]")).to_be_visible(timeout=15_000)
    _chart_axis_spans_the_history(page)
    _layout(page)
    _shot(page, "01-first-paint")
    _no_traceback(page)

    # the in-memory backend (a third backend appears in the mode selector by itself)
    inmem = sidebar.get_by_text("in-memory (tests)", exact=True)
    expect(inmem).to_be_visible()
    if sidebar.get_by_role("radio", name="in-memory (tests)").is_enabled():
        inmem.click()

    # choose the tiny model and apply
    # (no "/" in the pattern: Playwright's role selector does not escape it)
    _choose_model(page, "tiny-llama", re.compile(r"^tiny-llama · .+ · ✅$"))  # short label, mark visible
    expect(sidebar.get_by_text("Помещается", exact=True)).to_be_visible()  # ✅ becomes the icon
    expect(page.get_by_text("Сейчас рекомендуется:", exact=False)).to_be_visible()

    # a context the inputs would once drop silently: shown as an error, Apply blocked until reset
    context = sidebar.get_by_role("spinbutton", name="Контекст, токенов")
    context.fill("10000000")
    context.press("Enter")
    expect(sidebar.get_by_text(re.compile("вне допустимого диапазона"))).to_be_visible()
    expect(sidebar.get_by_role("button", name="🔄 Применить изменения")).to_be_disabled()
    _shot(page, "01b-out-of-range")
    sidebar.get_by_role("button", name="↺ Вернуть рекомендованные значения").click()
    expect(sidebar.get_by_text(re.compile("вне допустимого диапазона"))).to_have_count(0)
    expect(sidebar.get_by_role("button", name="🔄 Применить изменения")).to_be_enabled()
    sidebar.get_by_role("button", name="🔄 Применить изменения").click()
    expect(page.get_by_text(f"Успех: {TINY_ID} загружена (in-memory (tests)).")).to_be_visible(timeout=120_000)
    unload = page.get_by_role("button", name="🗑️")
    expect(unload).to_have_count(1)
    row = re.compile(rf"{re.escape(TINY_ID)} · in-memory \(tests\) · cpu ·")
    expect(page.get_by_text(row)).to_be_visible()
    # the busy message never doubled, the closed selector's mark is the plan's
    expect(sidebar.get_by_text(re.compile(r"^🚫 Эта модель уже загружена"))).to_have_count(1)
    _shot(page, "02-applied")
    _no_traceback(page)
    _ide_section(page)

    # a second tab sees the same loaded model
    other = _open(browser, server)
    expect(other.get_by_role("button", name="🗑️")).to_have_count(1, timeout=30_000)
    expect(other.get_by_text(row)).to_be_visible()
    other.close()

    # unload it with 🗑️ and read the report, beside the button (issue 20.10), not at the top of the page
    unload.click()
    report = page.get_by_text(re.compile(rf"Выгружено: {re.escape(TINY_ID)} \(Оперативная память хоста\) — .+ вернулось, удерживается"))
    expect(report).to_be_visible(timeout=60_000)
    expect(page.get_by_role("button", name="🗑️")).to_have_count(0)
    expect(page.get_by_text("Ничего не запущено.")).to_be_visible()
    assert "(англ.)" not in page.inner_text("body")  # issue 12.6
    heading = page.get_by_role("heading", name="Что запущено")
    assert heading.bounding_box()["y"] < report.bounding_box()["y"] < page.get_by_text("Ничего не запущено.").bounding_box()["y"] + 400
    _shot(page, "03-unloaded")

    # apply again, then the emergency clear asks first (its buttons in the window), then says what it did
    sidebar.get_by_role("button", name="🔄 Применить изменения").click()
    expect(page.get_by_role("button", name="🗑️")).to_have_count(1, timeout=120_000)
    _emergency_clear(page)

    # the language switch
    sidebar.get_by_text("English", exact=True).click()
    expect(sidebar.get_by_text("🔧 Modes and memory")).to_be_visible()
    expect(sidebar.get_by_role("button", name="🔄 Apply changes")).to_be_visible()
    _shot(page, "05-english")


def _choose_model(page, typed: str, option: re.Pattern) -> None:
    """Open the searchable model selector, type to filter, pick the option. The live panel reruns every
    second and a rerun can close an open list: opened again until the option is there."""
    model = page.locator("[data-testid=stSidebar] [data-testid=stSelectbox]").filter(has_text="Модель")
    wanted = page.get_by_role("option", name=option)
    for _ in range(5):
        model.get_by_role("button", name="Open").click()
        model.get_by_role("combobox").press_sequentially(typed)
        try:
            wanted.click(timeout=5_000)
            return
        except Exception:  # noqa: BLE001 - the list closed under a rerun: open it again
            page.keyboard.press("Escape")
    wanted.click()


def _emergency_clear(page) -> None:
    """Issue 20.9/20.10: the confirmation's buttons are in the 1400×1000 window; the result names what it
    unloaded, says what it cut, has its Ollama line, and who still holds the RAM, each with advice."""
    from playwright.sync_api import expect

    page.locator("[data-testid=stSidebar]").get_by_role("button", name="🚨 Экстренная очистка").click()
    expect(page.get_by_text("Продолжить?", exact=False)).to_be_visible()
    for name in ("Да, очистить всё", "Отмена"):
        expect(page.get_by_role("button", name=name)).to_be_in_viewport()
    _shot(page, "04a-emergency-confirm")
    page.get_by_role("button", name="Да, очистить всё").click()
    expect(page.get_by_text(re.compile("Экстренная очистка выполнена"))).to_be_visible(timeout=60_000)
    body = page.inner_text("body")
    assert f"выгружено: {TINY_ID}" in body, body[-3000:]
    assert "ни операции, ни запросов не шло" in body
    assert re.search(r"Ollama не отвечает по адресу \S+: его модели не выгружались", body)
    assert "Кто еще занимает оперативную память" in body
    assert "этот процесс memctl" in body and "закройте её, если она не нужна" in body
    assert "| выполнено" not in body and "\tвыполнено" not in body  # never a bare "done"
    _shot(page, "04-emergency")
    _no_traceback(page)


def _layout(page) -> None:
    """Issue 20.10 at 1400×1000: «Контекст, токенов» on one line like «Батч размер» (no wrap, aligned)."""
    sidebar = page.locator("[data-testid=stSidebar]")
    context = sidebar.locator("[data-testid=stWidgetLabel]").filter(has_text="Контекст, токенов").first
    batch = sidebar.locator("[data-testid=stWidgetLabel]").filter(has_text="Батч размер").first
    assert context.bounding_box()["height"] <= batch.bounding_box()["height"] + 1  # one line each
    inputs = [sidebar.get_by_role("spinbutton", name=n).bounding_box() for n in ("Контекст, токенов", "Батч размер")]
    assert abs(inputs[0]["x"] - inputs[1]["x"]) < 2 and abs(inputs[0]["width"] - inputs[1]["width"]) < 2


def _chart_axis_spans_the_history(page) -> None:
    """Issue 20.1: the chart's time axis is read as drawn (Vega's own description of the axis), not
    from the data: it spans two distinct clock times, so the samples collected so far are drawn."""
    from playwright.sync_api import expect

    axis = page.locator("[data-testid=stVegaLiteChart] [aria-label^='X-axis']").first
    expect(axis).to_have_attribute("aria-label", re.compile(r"values from \d\d:\d\d:\d\d to \d\d:\d\d:\d\d"),
                                   timeout=15_000)
    label = axis.get_attribute("aria-label") or ""
    assert "NaN" not in label, label
    start, end = re.findall(r"\d\d:\d\d:\d\d", label)[:2]
    assert start < end, label


def _ide_section(page) -> None:
    """Issue 10.9: the dashboard serves, and its "🔌 Подключить IDE" section carries what `memctl ide`
    prints from another process (acting through this dashboard, the owner) for the running model."""
    from playwright.sync_api import expect

    base = f"http://127.0.0.1:{SERVED['port']}"
    expect(page.get_by_text(f"Сервер memctl: {base}", exact=False)).to_be_visible()
    page.get_by_text("🔌 Подключить IDE", exact=True).click()
    section = page.locator("[data-testid=stExpander]").filter(has_text="🔌 Подключить IDE")
    expect(section.get_by_text("Окно контекста (токенов)")).to_be_visible()
    cli = subprocess.run([sys.executable, "-m", "memctl_cli", "ide", "roo"], cwd=ROOT, env=SERVED["env"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    import json

    cfg = json.loads(cli.stdout)["providerProfiles"]["apiConfigs"]["memctl"]
    info = cfg["openAiCustomModelInfo"]
    assert cfg["openAiBaseUrl"] == f"{base}/v1" and cfg["openAiModelId"] == TINY_ID
    codes = [c.strip() for c in section.locator("[data-testid=stCode] code").all_inner_texts()]
    assert codes == [f"{base}/v1", TINY_ID, str(info["contextWindow"]), str(info["maxTokens"])], codes
    expect(section.get_by_role("button", name="⬇️ Настройки Roo Code (JSON)")).to_be_visible()
    # issue 20.12: the copy button the intro names is there, where it says (on hover, in the field's corner)
    expect(section.get_by_text("копируется кнопкой 📋", exact=False)).to_be_visible()
    field = section.locator("[data-testid=stCode]").first
    field.hover()
    copy = field.locator("button")
    expect(copy.first).to_be_visible()
    _shot(page, "02b-ide")


def test_an_invalid_batch_never_changes_the_chosen_model_in_the_browser(server, browser):
    """Issue 12.1: with the second model chosen, batch 0 then 1 leaves the selector (and the plan) on it."""
    from playwright.sync_api import expect

    page = _open(browser, server)
    try:
        sidebar = page.locator("[data-testid=stSidebar]")
        model = sidebar.locator("[data-testid=stSelectbox]").filter(has_text="Модель")
        _choose_model(page, "untied", re.compile(r"^tiny-llama-untied · "))
        chosen = model.get_by_role("combobox")
        expect(chosen).to_have_value(re.compile(r"^tiny-llama-untied · .+ · ✅$"))
        batch = sidebar.get_by_role("spinbutton", name="Батч размер")
        for value in ("0", "1"):
            batch.fill(value)
            batch.press("Enter")
            page.wait_for_timeout(1500)
            expect(chosen).to_have_value(re.compile(r"^tiny-llama-untied · "))
        expect(sidebar.get_by_text(re.compile("вне допустимого диапазона"))).to_have_count(0)
        # issue 12.2: the closed selector's mark is the plan's verdict for the profile on screen
        expect(chosen).to_have_value(re.compile(r" · ✅$"))
        expect(sidebar.get_by_text("Помещается", exact=True)).to_be_visible()  # ✅ becomes the icon
        _no_traceback(page)
    except BaseException:
        _shot(page, "failure-12-1")
        raise
    finally:
        page.close()
