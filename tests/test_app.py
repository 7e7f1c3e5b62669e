"""The dashboard (app.py → pages/dashboard.py) through Streamlit's AppTest.

Each test builds the app from the environment (tests/ui_harness.py): a fake NVML scenario, the tiny
models' HF cache, a Docker host that does not exist unless the test wants the private engine, and
the in-memory backend beside the configured ones. Operations run on the controller's runner: a test
clicks, waits for the runner to go idle, then reruns, as the page's own poll would.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import subprocess_env
from tests.fixtures_models import TINY_ID
from tests.ui_harness import (  # noqa: F401 - app_factory is a fixture
    APP,
    DIAG,
    GIB,
    INMEM,
    INMEM_BACKENDS,
    NO_DOCKER,
    ROOT,
    app_factory,
    buttons,
    choose_inmem,
    metrics,
    settle,
    texts,
)
from tests.ui_harness import controller as _controller
from tests.ui_harness import runner as _runner


def _vllm_buildable() -> bool:
    try:
        _controller().backend("vllm")
        return True
    except Exception:  # noqa: BLE001 - until the vLLM backend package lands on this branch
        return False


@pytest.fixture
def dashboard(app_factory):  # noqa: F811 - the fixture imported above
    """``dashboard(scenario, hub=..., docker_host=..., **MEMCTL_env)`` → AppTest of app.py after one run."""
    return lambda scenario="library_missing", **kw: app_factory(APP, scenario, **kw)


# ============================================================================ no GPU, no Docker
def test_no_gpu_page_explains_what_it_found_and_what_the_user_can_do(dashboard):
    at = dashboard("library_missing")
    page = texts(at)
    assert "🔧 Управление режимами и памятью" in [h.value for h in at.sidebar.header]
    assert "GPU NVIDIA не найден" in page and "libnvidia-ml" in page
    assert "vLLM недоступен: " in page
    assert "Что можно сделать" in page
    shown = metrics(at)
    assert set(shown) == {"Оперативная память (всего)", "Используется", "Доступно", "Утилизация"}
    assert shown["Доступно"].endswith("GiB")
    mode = at.radio(key="f_mode")
    assert "vLLM" not in mode.options and "in-memory (tests)" in mode.options  # one that cannot run is not offered
    assert "В кеше нет моделей" in page  # empty cache: says so, and where to put models
    assert buttons(at)["btn_apply"].disabled


def test_russian_page_says_what_was_found_in_russian_and_keeps_the_english_only_as_details(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    notice = next(str(i.value) for i in at.info if "Что найдено" in str(i.value))
    assert "GPU NVIDIA не найден: библиотека драйвера NVIDIA (libnvidia-ml) не найдена" in notice
    assert "vLLM недоступен: " in notice
    for english in ("no NVIDIA GPU driver", "not running", "needs an NVIDIA GPU", "cannot be built"):
        assert english not in notice  # the core's English
    assert "(англ.)" not in texts(at)  # no "English details" labels anywhere (issue 12.6)
    vllm = next(str(c.value) for c in at.sidebar.caption if str(c.value).startswith("vLLM недоступен"))
    assert vllm.isascii() is False and "no NVIDIA GPU available" not in vllm
    # the recommendation's notes, in Russian (not "fp16 is slow on the CPU: bf16 instead")
    page = texts(at)
    assert "на CPU FP16 работает медленно, поэтому BF16" in page
    assert "fp16 is slow" not in page and "free on host memory" not in page


def test_without_a_gpu_the_card_says_what_is_recommended_and_never_claims_the_fp16_band_applies(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    now = next(str(s.value) for s in at.success if "Сейчас рекомендуется" in str(s.value))
    # the band's 1024 tokens, or more up to the model's maximum where the recommendation sizes the context
    assert re.search(r"^\*\*Сейчас рекомендуется:\*\* Transformers, BF16 \(CPU\), (1024 токена|2048 токенов), батч 1 "
                     r"— потому что свободно", now), now
    assert "vLLM здесь недоступен" in now and "«При 4-6 GB свободной памяти»" in now
    assert not [s for s in at.success if "применяется сейчас" in str(s.value)]  # no band claims to apply as is
    page = texts(at)
    for band_id in ("transformers_fp16", "vllm_full", "transformers_int8", "vllm_limited"):
        assert band_id not in page
    for h in ("При 8+ GB свободной памяти", "При 6-8 GB свободной памяти", "При 4-6 GB свободной памяти",
              "При менее 4 GB"):
        assert h in page


def test_first_paint_does_not_import_torch(tmp_path, hf_cache):
    """A fresh process renders the whole dashboard with cached models and never imports torch."""
    script = (
        "import sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({APP!r}, default_timeout=60).run()\n"
        "assert not at.exception, [e.message for e in at.exception]\n"
        "assert any('tiny-llama' in o for o in at.selectbox(key='f_model').options)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    (tmp_path / "none.toml").write_text("")  # an empty user config file: only the defaults apply
    env = subprocess_env(MEMCTL_NVML_MODULE="tests.fake_pynvml", MEMCTL_FAKE_NVML="library_missing",
                         MEMCTL_DOCKER_HOST=NO_DOCKER, MEMCTL_HF_CACHE_DIR=str(hf_cache),
                         MEMCTL_STATE_DIR=str(tmp_path / "state"), HF_HUB_OFFLINE="1",
                         MEMCTL_CONFIG_FILE=str(tmp_path / "none.toml"), MEMCTL_BACKENDS=INMEM_BACKENDS)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("NO-TORCH")


# ============================================================================ colours and profiles (fake NVML)
@pytest.mark.parametrize(("scenario", "free", "badge"), [
    ("free_gib=9", "9.00 GiB", "🟢 **Зеленый** — достаточно памяти (4+ GB)"),
    (f"free_bytes={4 * GIB}", "4.00 GiB", "🟢 **Зеленый**"),  # the edge belongs to the upper band
    (f"free_bytes={4 * GIB - 1}", "4.00 GiB", "🟡 **Желтый** — мало памяти (2-4 GB)"),
    ("free_gib=3", "3.00 GiB", "🟡 **Желтый**"),
    ("free_gib=1.5", "1.50 GiB", "🔴 **Красный** — критически мало памяти (<2 GB)"),
])
def test_colour_indicator_follows_free_gpu_memory(dashboard, scenario, free, badge):
    at = dashboard(scenario)
    shown = metrics(at)
    assert shown["GPU память (всего)"] == "24.00 GiB"
    assert shown["Доступно"] == free
    assert shown["Утилизация"] == "7%"
    sidebar_md = [m.value for m in at.sidebar.markdown]
    assert any(v.startswith(badge) for v in sidebar_md), sidebar_md


def _highlighted(at: AppTest) -> str:
    cards = [s.value for s in at.success if "применяется сейчас" in str(s.value)]
    assert len(cards) == 1, cards
    return cards[0]


@pytest.mark.parametrize(("scenario", "heading", "lines"), [
    ("free_gib=5", "При 4-6 GB свободной памяти", ["🔧 **Transformers режим**", "🔧 FP16 точность",
                                                   "🔧 1024 токена", "🔧 Батч размер 1"]),
    ("free_gib=3", "При менее 4 GB", ["⚠️ **Transformers режим**", "⚠️ INT8 квантизация", "⚠️ 512 токенов",
                                      "⚠️ Батч размер 1"]),
])
def test_recommendation_card_highlights_the_transformers_profile_that_applies(dashboard, scenario, heading, lines):
    at = dashboard(scenario)
    card = _highlighted(at)
    assert card.startswith(f"**{heading}**")
    for line in lines:
        assert line in card
    # all four profiles of the guide are on the card
    page = texts(at)
    for h in ("При 8+ GB свободной памяти", "При 6-8 GB свободной памяти", "При 4-6 GB свободной памяти",
              "При менее 4 GB"):
        assert h in page


def test_without_docker_a_vllm_band_falls_back_to_transformers_and_says_why(dashboard):
    at = dashboard("free_gib=9")
    page = texts(at)
    assert not [s for s in at.success if "применяется сейчас" in str(s.value)]
    assert "**При 4-6 GB свободной памяти** — 🔧 взят за основу" in page
    assert "**При 8+ GB свободной памяти** — 📍 по свободной памяти, но здесь недоступен" in page
    assert ("по таблице подходит «При 8+ GB свободной памяти» (vLLM), но vLLM здесь недоступен, поэтому взят "
            "профиль Transformers «При 4-6 GB свободной памяти»") in page
    assert "Сейчас рекомендуется:** Transformers, FP16, 1024 токена, батч 1" in page
    assert "vLLM" not in at.radio(key="f_mode").options
    if _vllm_buildable():
        assert "vLLM недоступен: служба Docker не отвечает" in page
    else:
        assert "vLLM недоступен: " in page


@pytest.mark.docker
@pytest.mark.parametrize(("scenario", "heading", "limited"), [
    ("free_gib=9", "При 8+ GB свободной памяти", False),
    ("free_gib=7", "При 6-8 GB свободной памяти", True),
])
def test_with_docker_the_vllm_profiles_apply_and_vllm_mode_is_enabled(dashboard, docker_host, scenario, heading,
                                                                      limited):
    at = dashboard(scenario, docker_host=docker_host)
    if not _vllm_buildable():
        pytest.skip("the vLLM backend package is not on this branch")
    card = _highlighted(at)
    assert card.startswith(f"**{heading}**")
    assert ("vLLM режим (ограниченный)" in card) is limited
    mode = at.radio(key="f_mode")
    assert not mode.disabled and mode.value == "vllm"


def test_two_gpus_get_a_selector_defaulting_to_the_one_with_most_free_memory(dashboard):
    at = dashboard("two_gpus")
    sel = at.selectbox(key="device_key")
    assert sel.options == ["GPU 0: NVIDIA RTX A6000", "GPU 1: NVIDIA GeForce RTX 3060"]
    assert sel.value == "gpu:1"
    assert metrics(at)["Доступно"] == "11.00 GiB"
    sel.set_value("gpu:0").run()
    assert metrics(at)["Доступно"] == "8.00 GiB"
    assert metrics(at)["GPU память (всего)"] == "48.00 GiB"


# ============================================================================ model list and plan
def test_cached_models_show_size_and_fit_verdict_and_the_plan_before_applying(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    options = at.selectbox(key="f_model").options
    # short label (no organisation, the verdict's mark only): the sidebar cut the long one before the verdict
    short = TINY_ID.rsplit("/", 1)[-1]
    assert any(o.startswith(f"{short} · ") and o.endswith(" · ✅") for o in options), options
    # the profile is prefilled from the recommendation (CPU: bf16 instead of fp16)
    assert at.selectbox(key="f_precision").value == "bf16"
    rec = _controller().recommend(model=at.selectbox(key="f_model").value, device_key="host")
    assert at.number_input(key="f_context").value == min(rec.profile.context_tokens, 2048) >= 1024
    assert at.number_input(key="f_batch").value == 1
    page = texts(at)
    assert "📋 План" in page and "Выгрузить: ничего" in page and "Нужно:" in page
    assert "Помещается" in page
    assert "поместится наибольший контекст" in page
    assert "corrupt cache entry skipped" in page  # the broken entry is a warning, not a crash


def test_a_profile_change_is_rechecked_and_a_model_that_does_not_fit_is_refused_with_advice(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache, MEMCTL_HOST_MEMORY_BUDGET_BYTES=40 * 1024**2)
    choose_inmem(at)
    at.number_input(key="f_context").set_value(2048).run()
    page = texts(at)
    assert "Не помещается" in page
    assert any(o.endswith(" · ❌") for o in at.selectbox(key="f_model").options)
    assert "f_force" in {c.key for c in at.checkbox}
    buttons(at)["btn_apply"].click().run()
    settle(at)
    page = texts(at)
    assert "а свободно было бы только" in page  # the controller's numbers, in Russian
    assert any("would be free" in c.value for c in at.code)  # the core's own words, folded under details
    assert "Проблема: «Недостаточно памяти»" in page and "🧹 Очистить память" in page
    assert any(e.label == "Подробности" for e in at.expander)
    assert not at.exception  # never a traceback


# ============================================================================ operations
def _apply_tiny(at: AppTest) -> AppTest:
    choose_inmem(at)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    buttons(at)["btn_apply"].click().run()
    return settle(at)


def test_apply_runs_in_status_steps_then_lists_the_model_with_an_unload_button(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    _apply_tiny(at)
    done = [s for s in at.status if TINY_ID in s.label]
    assert done and done[0].state == "complete", [s.label for s in at.status]
    page = texts(at)
    assert f"Успех: {TINY_ID} загружена (in-memory (tests))" in page
    for step in ("Выгрузка текущих моделей", "Очистка памяти", "Проверка доступности ресурсов",
                 "Переключение режима", "Подготовка новой модели", "Проверка модели"):
        assert step in page
    assert "Очистка GPU памяти" not in page  # no GPU here: the step does not speak of one (issue 12.6)
    assert f"unload::{TINY_ID}" in buttons(at)
    assert f"**{TINY_ID}** · in-memory (tests) · cpu" in page
    # the same model and profile again: nothing to do, and Apply says so instead of staying enabled
    assert buttons(at)["btn_apply"].disabled
    assert any(str(c.value) == "🚫 Эта модель уже загружена с этим профилем — делать нечего."
               for c in at.sidebar.caption)
    assert any(e.label.startswith("✅") and "Переключение" in e.label for e in at.expander)  # the operation log


def test_unload_button_unloads_and_shows_freed_and_still_held(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    _apply_tiny(at)
    buttons(at)[f"unload::{TINY_ID}"].click().run()
    settle(at)
    page = texts(at)
    # a Russian headline from the report's numbers, nothing in English
    assert f"Выгружено: {TINY_ID} (Оперативная память хоста) — " in page and "вернулось" in page
    assert "удерживается" in page and "(англ.)" not in page and "rss_anon" not in page
    assert f"unload::{TINY_ID}" not in buttons(at)
    assert "Ничего не запущено." in page


def test_clear_memory_reports_used_memory_before_and_after_per_device(dashboard):
    at = dashboard("one_gpu")
    buttons(at)["btn_clear"].click().run()
    settle(at)
    page = texts(at)
    assert "Память очищена." in page
    assert "| GPU 0 (" in page and "| Оперативная память хоста |" in page  # names, not gpu:0 / host
    assert "| gpu:0 |" not in page and "| host |" not in page


def test_emergency_clear_asks_for_confirmation_before_running(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    _apply_tiny(at)
    buttons(at)["btn_emergency"].click().run()
    assert not _runner().running() and "btn_emergency_confirm" in buttons(at)
    assert "Продолжить?" in texts(at)
    buttons(at)["btn_emergency_cancel"].click().run()
    assert "btn_emergency" in buttons(at) and f"unload::{TINY_ID}" in buttons(at)  # nothing happened
    buttons(at)["btn_emergency"].click().run()
    buttons(at)["btn_emergency_confirm"].click().run()
    settle(at)
    page = texts(at)
    assert "Экстренная очистка выполнена" in page
    assert "Остановка моделей в памяти" in page
    assert f"unload::{TINY_ID}" not in buttons(at)
    # its steps measure no memory: the table has no column of dashes, the operation's figures follow it
    table = next(m.value for m in at.markdown if "| Шаг |" in m.value and "Остановка моделей в памяти" in m.value)
    assert "Память до → после" not in table.splitlines()[0]
    assert any(str(c.value).startswith("Память до → после: Оперативная память хоста: ") for c in at.caption)


def test_a_long_operation_keeps_the_page_live_and_a_second_tab_sees_it(dashboard, hf_cache):
    """While apply waits in its 'prepare' step, both sessions render at once, show it running, and
    offer no second apply; the emergency clear stays available and stops it."""
    at = dashboard("library_missing", hub=hf_cache)
    release = threading.Event()
    entered = threading.Event()

    def hold(step: str) -> None:
        if step == "prepare":
            entered.set()
            release.wait(30)

    _controller().step_hook = hold
    try:
        choose_inmem(at)
        at.selectbox(key="f_model").set_value(TINY_ID).run()
        buttons(at)["btn_apply"].click().run()
        assert entered.wait(30)
        at.run(timeout=5)  # returns while the operation is held: nothing waits for it
        other = AppTest.from_file(APP, default_timeout=30).run()
        for page_at in (at, other):
            running = [s for s in page_at.status if s.state == "running"]
            assert running and TINY_ID in running[0].label
            assert buttons(page_at)["btn_apply"].disabled and buttons(page_at)["btn_clear"].disabled
            assert not buttons(page_at)["btn_emergency"].disabled
            assert metrics(page_at)["Доступно"].endswith("GiB")  # the live panel still paints
            assert "Идет операция «Применение изменений»" in texts(page_at)
            # the busy message appears once in the sidebar (issue 12.7)
            busy = [c for c in page_at.sidebar.caption if "Идет операция — дождитесь" in str(c.value)]
            assert len(busy) == 1, [c.value for c in page_at.sidebar.caption]
    finally:
        release.set()
        _controller().step_hook = None
    settle(at)
    assert f"unload::{TINY_ID}" in buttons(at)


def test_a_failing_step_shows_message_advice_and_details_never_a_traceback(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)

    def fail(step: str) -> None:
        if step == "verify":
            raise RuntimeError("generation produced no tokens")

    _controller().step_hook = fail
    try:
        _apply_tiny(at)
    finally:
        _controller().step_hook = None
    page = texts(at)
    assert "Шаг «Проверка модели» завершился ошибкой" in page
    assert any("generation produced no tokens" in c.value for c in at.code)  # the details, folded
    assert "Проблема: «Модель не загружается»" in page
    assert any(s.state == "error" for s in at.status)
    assert any(e.label == "Подробности" for e in at.expander)
    assert "Traceback" not in page and not at.exception
    assert f"unload::{TINY_ID}" not in buttons(at)  # rolled back: nothing half-loaded


def test_freed_memory_never_reads_negative():
    from pages import ui_ops as ui

    assert ui.freed_text(-14 * 1024**2) == "не изменилось"
    assert ui.freed_text(0) == "не изменилось"
    assert ui.freed_text(5 * 1024**2).startswith("5") and ui.freed_text(None) == "—"


def test_a_finished_operation_is_shown_to_its_session_and_only_briefly_to_others(dashboard):
    at = dashboard("library_missing")
    buttons(at)["btn_clear"].click().run()
    settle(at)
    assert "Память очищена." in texts(at)
    just_after = AppTest.from_file(APP, default_timeout=30).run()
    assert "Память очищена." in texts(just_after)  # another tab sees what just ended
    op = _runner().finished(1)[0]
    op.ended_at -= 3600  # an hour later
    later = AppTest.from_file(APP, default_timeout=30).run()
    assert "Память очищена." not in texts(later) and not later.status
    at.run()
    assert "Память очищена." in texts(at)  # the session that started it still has its result


@pytest.mark.parametrize(("key", "value", "message"), [
    ("f_context", 10_000_000, "Контекст, токенов: значение 10000000 вне допустимого диапазона 16–1048576"),
    ("f_batch", 0, "Батч размер: значение 0 вне допустимого диапазона 1–256"),
])
def test_an_out_of_range_field_is_shown_and_blocks_apply_until_fixed(dashboard, hf_cache, key, value, message):
    at = dashboard("library_missing", hub=hf_cache)
    choose_inmem(at)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    assert not buttons(at)["btn_apply"].disabled
    before = at.number_input(key=key).value
    at.number_input(key=key).set_value(value).run()
    assert any(message in str(e.value) for e in at.sidebar.error), [e.value for e in at.sidebar.error]
    assert buttons(at)["btn_apply"].disabled
    assert any("исправьте поля профиля" in str(c.value) for c in at.sidebar.caption)
    at.number_input(key=key).set_value(before).run()
    assert not buttons(at)["btn_apply"].disabled and not at.sidebar.error


def test_a_context_above_the_models_maximum_is_a_russian_blocker_and_apply_is_disabled(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    choose_inmem(at)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    at.number_input(key="f_context").set_value(4096).run()
    errors = [str(e.value) for e in at.sidebar.error]
    assert any("Контекст 4096 больше максимума модели (2048 токенов)" in e for e in errors), errors
    assert buttons(at)["btn_apply"].disabled
    # the blocker is the verdict: never "✅ Помещается" next to the ⛔
    assert not [s for s in at.sidebar.success if "Помещается" in str(s.value)]
    # the user changed a field: the values are no longer "filled in by the recommendation"
    assert not [c for c in at.sidebar.caption if "Поля заполнены по рекомендации" in str(c.value)]
    # issue 20.10: the cached-models table says why a model cannot run, beside its ⛔
    table = next(m.value for m in at.markdown if "| Модель |" in m.value or f"| {TINY_ID} |" in m.value)
    row = next(line for line in table.splitlines() if line.startswith(f"| {TINY_ID} |"))
    assert "⛔ нельзя запустить: контекст 4096 больше максимума модели" in row, row


def test_the_prefilled_note_starts_its_sentences_with_a_capital_letter(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    note = next(str(c.value) for c in at.sidebar.caption if "Поля заполнены по рекомендации" in str(c.value))
    assert not re.search(r"\. [а-яa-z]", note), note


def test_the_controller_survives_streamlits_clear_cache(dashboard):
    import streamlit as st

    dashboard("library_missing")
    before = _controller()
    st.cache_resource.clear()  # the "Clear cache" menu item
    assert _controller() is before


def test_a_new_tab_preselects_the_loaded_model_not_the_first_cached_one(dashboard, hf_cache):
    at = dashboard("library_missing", hub=hf_cache)
    cached = [m.model_id for m in _controller().models().models]
    assert at.selectbox(key="f_model").value == cached[0]  # nothing loaded: the first cached model
    other = cached[1]
    choose_inmem(at)
    at.selectbox(key="f_model").set_value(other).run()
    buttons(at)["btn_apply"].click().run()
    settle(at)
    assert any(d.model_id == other for d in _controller().deployments())
    new_tab = AppTest.from_file(APP, default_timeout=30).run()
    assert new_tab.selectbox(key="f_model").value == other
    assert "уже загружена с этим профилем" in texts(new_tab)  # nothing to replace by default


def test_utilisation_says_what_it_measures_for_the_host_and_for_a_gpu(dashboard):
    host = dashboard("library_missing")
    util = next(m for m in host.metric if m.label == "Утилизация")
    assert "доля занятой памяти" in util.help
    gpu = dashboard("free_gib=5")
    util = next(m for m in gpu.metric if m.label == "Утилизация")
    assert "NVML" in util.help and "не доля памяти" in util.help


# ============================================================================ language
def test_language_switch_turns_the_page_english_and_back(dashboard):
    at = dashboard("free_gib=5")
    assert at.radio(key="_lang_widget").value == "ru"
    at.radio(key="_lang_widget").set_value("en").run()
    assert [h.value for h in at.sidebar.header] == ["🔧 Modes and memory"]
    assert set(metrics(at)) == {"GPU memory (total)", "Used", "Available", "Utilisation"}
    assert buttons(at)["btn_apply"].label == "🔄 Apply changes"
    assert "With 4-6 GB free" in _english_card(at)
    at.radio(key="_lang_widget").set_value("ru").run()
    assert buttons(at)["btn_apply"].label == "🔄 Применить изменения"


def _english_card(at: AppTest) -> str:
    return next(str(s.value) for s in at.success if "applies now" in str(s.value))


def test_language_comes_from_settings(dashboard):
    at = dashboard("free_gib=5", MEMCTL_LANGUAGE="en")
    assert buttons(at)["btn_clear"].label == "🧹 Clear memory"
    assert buttons(at)["btn_emergency"].label == "🚨 Emergency clear"


# ============================================================================ vLLM containers (real engine)
@pytest.mark.docker
def test_vllm_apply_lists_the_container_and_the_stop_button_stops_it(dashboard, hf_cache, vllm_settings):
    s = vllm_settings
    at = dashboard("free_gib=20", hub=hf_cache, docker_host=s.docker_host, MEMCTL_VLLM_IMAGE=s.vllm_image,
                   MEMCTL_VLLM_TAG=s.vllm_tag, MEMCTL_VLLM_PORT=s.vllm_port, MEMCTL_VLLM_READY_TIMEOUT_S=20,
                   MEMCTL_VLLM_STOP_TIMEOUT_S=5)
    if not _vllm_buildable():
        pytest.skip("the vLLM backend package is not on this branch")
    assert at.radio(key="f_mode").value == "vllm"
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    at.selectbox(key="f_precision").set_value("fp16").run()
    buttons(at)["btn_apply"].click().run()
    settle(at)
    page = texts(at)
    assert f"Успех: {TINY_ID} загружена (vLLM)" in page, page[-3000:]
    stop = [k for k in buttons(at) if k.startswith("unload::")]
    assert len(stop) == 1 and buttons(at)[stop[0]].label == "🛑"
    assert f"адрес: http://127.0.0.1:{s.vllm_port}/v1" in page and "✅ готов" in page
    assert not re.search(r"\bпорт", page)  # the endpoint is a base URL the IDE takes as is ("Экспорт" is no port)
    buttons(at)[stop[0]].click().run()
    settle(at)
    page = texts(at)
    assert "Выгружено: " in page
    assert not [k for k in buttons(at) if k.startswith("unload::")]
    assert "Ничего не запущено." in page


# ============================================================================ settings
def test_an_invalid_setting_stops_the_page_naming_the_field_and_value(dashboard):
    at = dashboard("library_missing", MEMCTL_POLL_INTERVAL_S="0")
    errors = [e.value for e in at.error]
    assert any("Настройки не загрузились" in e and "MEMCTL_POLL_INTERVAL_S" in e and "'0'" in e for e in errors), errors
    assert not at.metric and not at.button  # nothing else is drawn on invalid settings
    # one declared page: Streamlit does not list pages/*.py (the page parts) on its own
    assert [p["page_name"] for p in at._registered_pages.values()] == ["Ошибка настроек"]


def test_with_one_mode_that_can_run_the_mode_is_said_and_the_other_is_explained(app_factory):  # noqa: F811
    """Issue 20.10: no greyed one-option radio; the mode in words, and why the other mode cannot run."""
    at = app_factory(APP, "library_missing", MEMCTL_BACKENDS="{}")  # transformers and vLLM only; no GPU
    assert not [r for r in at.radio if r.key == "f_mode"]
    side = [str(m.value) for m in at.sidebar.markdown] + [str(c.value) for c in at.sidebar.caption]
    assert "**Режим выполнения:** Transformers" in side, side
    assert any(s.startswith("vLLM недоступен: ") for s in side), side


def test_one_recommendation_everywhere_and_the_raise_is_said_as_a_raise(dashboard, hf_cache):
    """Issue 20.5: the sidebar's fields, the card's «Сейчас рекомендуется», the diagnostic page and
    `memctl status` (the controller's status) give one profile; the caption says the context was raised
    from the table's value and what bounded it (never «не больше максимума модели», which reads as a cap)."""
    at = dashboard("library_missing", hub=hf_cache)
    model = at.selectbox(key="f_model").value
    context = at.number_input(key="f_context").value
    ctl = _controller()
    status = ctl.status()["recommendation"]
    assert status["model"] == model and status["profile"]["context_tokens"] == context
    page = texts(at)
    card = next(str(s.value) for s in at.success if "Сейчас рекомендуется" in str(s.value))
    assert f"{context} токен" in card, card
    caption = next(str(c.value) for c in at.sidebar.caption if "Поля заполнены по рекомендации" in str(c.value))
    band_ctx = next(n.args["band_ctx"] for n in ctl.recommend_in_view(device_key="host").notes
                    if n.code.startswith("rec.context_raised"))
    assert f"контекст поднят с {band_ctx} токен" in caption and f"до {context} токен" in caption, caption
    assert "предел — максимум самой модели" in caption or "помещается в свободную память" in caption, caption
    assert "не больше максимума модели" not in page
    diag = AppTest.from_file(DIAG, default_timeout=60)  # the diagnostic page's line: the same profile
    diag.run()
    diag.button(key="diag_run_recommend").click().run()
    line = "\n".join(texts(diag).splitlines())
    assert f"{context} токен" in line and "поднят с" in line, line


def test_the_profile_caption_follows_the_language_switch_both_ways(dashboard, hf_cache):
    """Issue 20.4: the caption was written once and kept: English in the Russian UI after a switch back."""
    at = dashboard("library_missing", hub=hf_cache)

    def caption() -> str:
        return next(str(c.value) for c in at.sidebar.caption
                    if "Поля заполнены" in str(c.value) or "filled in" in str(c.value).lower())

    ru = caption()
    at.radio(key="_lang_widget").set_value("en").run()
    en = caption()
    assert not re.search("[А-Яа-яЁё]", en), en
    at.radio(key="_lang_widget").set_value("ru").run()
    assert caption() == ru
    assert "The table says" not in texts(at)


def test_no_english_left_in_the_russian_page_after_an_apply(dashboard, hf_cache):
    """Issue 20.4: the steps' arguments (device «host», mode «transformers») and the device's «Host RAM»
    are said in Russian; a missing cache folder is said in Russian too."""
    at = dashboard("library_missing", hub=hf_cache)
    _apply_tiny(at)
    page = texts(at)
    assert "Host RAM" not in page and "на host" not in page and "→ inmem" not in page, page
    table = next(m.value for m in at.markdown if "| Шаг |" in m.value and "Проверка доступности" in m.value)
    assert "Оперативная память хоста: нужно" in table and "→ in-memory (tests)" in table, table
    empty = dashboard("library_missing")  # the HF cache folder does not exist
    page = texts(empty)
    assert "Папки кеша Hugging Face" in page and "does not exist yet" not in page


def test_a_host_memory_budget_is_shown_as_the_limit_not_as_unreadable_data(dashboard):
    """Issue 20.8: with MEMCTL_HOST_MEMORY_BUDGET_BYTES the sidebar said «Часть данных… не читается»."""
    at = dashboard("library_missing", MEMCTL_HOST_MEMORY_BUDGET_BYTES=str(3 * GIB))
    side = [str(c.value) for c in at.sidebar.caption]
    assert not [c for c in side if "не читается" in c], side
    assert any("ограничено бюджетом памяти для моделей: 3.00 GiB (MEMCTL_HOST_MEMORY_BUDGET_BYTES)" in c
               for c in side), side
    assert metrics(at)["Доступно"] == "3.00 GiB"


def test_a_corrupt_model_says_its_cause_and_fix_first_in_russian(app_factory, bad_hf_cache, bad_models):  # noqa: F811
    """Issue 20.3: a truncated safetensors file gave «❌ План не составлен: Ошибка.» with the cause in English
    under «Подробности», and «⚠️ неизвестно» in the table. Now the cause and the fix, in Russian, first."""
    at = app_factory(APP, "library_missing", hub=bad_hf_cache)
    choose_inmem(at)
    bad = bad_models["truncated"]
    at.selectbox(key="f_model").set_value(bad).run()
    errors = [str(e.value) for e in at.sidebar.error]
    assert any("План не составлен: Файл весов model.safetensors обрезан" in e for e in errors), errors
    assert not any(e.rstrip("*").endswith("Ошибка.") for e in errors), errors
    hints = [str(i.value) for i in at.sidebar.info]
    assert any("Удалите модель из кеша" in h for h in hints), hints
    table = next(m.value for m in at.markdown if f"| {bad} |" in m.value)
    row = next(line for line in table.splitlines() if line.startswith(f"| {bad} |"))
    assert "⚠️ неизвестно" not in row and "обрезан" in row and "Удалите модель из кеша" in row, row


def test_gb_and_gib_are_said_once(dashboard):
    """Issue 20.12: the guide's thresholds are GB but compared in GiB: the page says which, once."""
    at = dashboard("free_gib=9")
    assert texts(at).count("сравниваются здесь в GiB (1 GiB = 1024³ байт ≈ 1.07 GB)") == 1
