"""The diagnostic page (``streamlit run test_memory_controller.py``) through AppTest."""

from __future__ import annotations

import re

import pytest

from tests.fixtures_models import TINY_ID
from tests.ui_harness import APP, DIAG, app_factory, buttons, controller, texts  # noqa: F401


@pytest.fixture
def diag(app_factory):  # noqa: F811 - the fixture imported above
    return lambda scenario="library_missing", **kw: app_factory(DIAG, scenario, **kw)


def result_rows(at) -> dict[str, tuple[str, str]]:
    """{check name: (mark, time)} from the results table."""
    table = next(m.value for m in at.markdown if "| Проверка |" in m.value or "| Check |" in m.value)
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[1]] = (cells[0], cells[3])
    return rows


def test_run_all_leaves_out_the_mode_switch_and_emergency_clear_unless_their_boxes_are_ticked(diag, hf_cache):
    at = diag("library_missing", hub=hf_cache)
    buttons(at)["diag_run_all"].click().run()
    rows = result_rows(at)
    assert rows["🚨 Экстренная очистка"][0] == "⏭️"  # not run: it unloads everything
    assert rows["Переключение режимов"][0] == "⏭️"  # not run: it unloads the user's loaded model
    assert rows["Текущий статус памяти"][0] == "✅"
    assert "Не запускалась из «Запустить все проверки»" in texts(at)


def test_the_emergency_check_asks_for_confirmation_first(diag):
    at = diag("library_missing")
    buttons(at)["diag_run_emergency"].click().run()
    assert result_rows(at)["🚨 Экстренная очистка"][0] == "⬜" and "Продолжить?" in texts(at)
    buttons(at)["diag_emergency_cancel"].click().run()
    assert "diag_emergency_confirm" not in buttons(at)
    assert result_rows(at)["🚨 Экстренная очистка"][0] == "⬜"
    buttons(at)["diag_run_emergency"].click().run()
    buttons(at)["diag_emergency_confirm"].click().run()
    assert result_rows(at)["🚨 Экстренная очистка"][0] in ("✅", "⚠️")


def test_each_result_is_shown_once_not_as_a_status_block_too(diag):
    at = diag("library_missing")
    buttons(at)["diag_run_memory"].click().run()
    assert not at.status  # the running check's status block is gone once it ended
    assert [e.label for e in at.expander] == ["✅ Текущий статус памяти — подробности"]
    lines = [m.value for m in at.markdown if "Оперативная память хоста" in m.value and "всего" in m.value]
    assert len(lines) == 1, lines


def test_all_checks_run_and_each_is_marked_with_its_time(diag, hf_cache):
    at = diag("library_missing", hub=hf_cache)
    assert at.title[0].value == "🧪 Тестирование системы контроля памяти"
    assert at.selectbox(key="diag_model").value == TINY_ID
    at.checkbox(key="diag_include_emergency").check().run()
    at.checkbox(key="diag_include_switch").check().run()
    buttons(at)["diag_run_all"].click().run()
    rows = result_rows(at)
    assert rows["Текущий статус памяти"][0] == "✅"
    assert rows["Рекомендации системы"][0] == "✅"
    assert rows["Переключение режимов"][0] in ("✅", "⚠️")
    assert rows["🧹 Очистить память"][0] == "✅"
    assert rows["🚨 Экстренная очистка"][0] in ("✅", "⚠️")  # ⚠️: no Docker engine to ask here
    for _mark, took in rows.values():
        assert re.fullmatch(r"\d+(\.\d)? (мс|с)", took), took  # units in Russian too
    page = texts(at)
    assert f"✅ {TINY_ID} в списке загруженных" in page
    assert f"Выгружено: {TINY_ID} (Оперативная память хоста) — " in page
    assert "Остановка моделей в памяти" in page  # the emergency clear stops every backend's models
    assert not controller().deployments()


def test_recommendation_check_walks_the_guides_table_at_its_edges(diag):
    at = diag("library_missing")
    buttons(at)["diag_run_recommend"].click().run()
    assert result_rows(at)["Рекомендации системы"][0] == "✅"
    table = next(m.value for m in at.markdown if "| Свободно |" in m.value)
    expect = {
        "1.99 GiB": ("🔴", "При менее 4 GB"),
        "2 GiB": ("🟡", "При менее 4 GB"),
        "3.99 GiB": ("🟡", "При менее 4 GB"),
        "4 GiB": ("🟢", "При 4-6 GB свободной памяти"),
        "7.99 GiB": ("🟢", "При 6-8 GB свободной памяти"),
        "8 GiB": ("🟢", "При 8+ GB свободной памяти"),
    }
    for free, (level, band) in expect.items():
        assert f"| {free} | {level} | {band} |" in table, free
    assert "| 8 GiB (без GPU) | 🟢 | При 4-6 GB свободной памяти | Transformers | BF16 точность |" in table
    assert "transformers_" not in texts(at) and "vllm_full" not in texts(at)  # no internal band ids


def test_without_cached_models_the_switch_check_is_skipped_not_failed(diag):
    at = diag("library_missing")
    assert "В кеше нет моделей" in texts(at)
    buttons(at)["diag_run_switch"].click().run()
    assert result_rows(at)["Переключение режимов"][0] == "⏭️"


def test_a_failing_switch_is_marked_failed_with_the_guides_advice(diag, hf_cache):
    at = diag("library_missing", hub=hf_cache)

    def fail(step: str) -> None:
        if step == "prepare":
            raise RuntimeError("weights are unreadable")

    controller().step_hook = fail
    buttons(at)["diag_run_switch"].click().run()
    assert result_rows(at)["Переключение режимов"][0] == "❌"
    page = texts(at)
    assert "Шаг «Подготовка новой модели» завершился ошибкой" in page
    assert any("weights are unreadable" in c.value for c in at.code)  # the details, folded away
    assert "Проблема: «Модель не загружается»" in page
    assert not at.exception


def test_memory_check_lists_every_gpu_and_the_host(diag):
    at = diag("two_gpus")
    buttons(at)["diag_run_memory"].click().run()
    page = texts(at)
    assert "GPU 0: NVIDIA RTX A6000: всего 48.00 GiB, используется 40.00 GiB, доступно 8.00 GiB" in page
    assert "GPU 1: NVIDIA GeForce RTX 3060: всего 12.00 GiB" in page
    assert "Оперативная память хоста" in page
    assert result_rows(at)["Текущий статус памяти"][0] == "✅"


def test_diagnostic_page_speaks_english_too(diag):
    at = diag("library_missing", MEMCTL_LANGUAGE="en")
    assert at.title[0].value == "🧪 Memory control self-test"
    buttons(at)["diag_run_memory"].click().run()
    assert result_rows(at)["Current memory status"][0] == "✅"


def test_diagnostic_page_is_a_page_of_the_dashboard(app_factory):  # noqa: F811
    at = app_factory(APP, "library_missing")
    pages = {info.get("page_name"): info for info in at._registered_pages.values()}
    assert set(pages) == {"Панель управления", "Тестирование"}
    diag_page = pages["Тестирование"]
    assert str(diag_page["script_path"]).endswith("test_memory_controller.py")
    assert diag_page["url_pathname"] == "diagnostics"
    # AppTest (Streamlit 1.67) renders nothing after switch_page() to a page registered with its own
    # url_path here; the page itself is exercised by the tests above through its own entry point.


def test_without_a_gpu_the_holders_section_lists_the_hosts_processes_with_advice(diag):
    """Issue 20.9: the page said «GPU нет: процессов… не показать» while the dashboard listed the host's
    processes; now it lists them too, this memctl process named as such, each with what to do."""
    at = diag("library_missing")
    page = texts(at)
    assert "не показать" not in page
    assert "GPU нет: ниже процессы, занимающие оперативную память этого компьютера." in page
    table = next(m.value for m in at.markdown if m.value.startswith("| PID |") and "| Что делать |" in m.value)
    assert "этот процесс memctl" in table  # this test process is the page's memctl
