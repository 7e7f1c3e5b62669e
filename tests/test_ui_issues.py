"""What a new user hit in the dashboard (issue 12) and the redesign's UI items (issue 9), each as a
test that failed before the fix: AppTest for what the page shows, plain calls for the chart spec."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from memory_controller.backend import Deployment, DeploymentState
from memory_controller.types import Precision, Profile
from tests import model_factory as mf
from tests.fixtures_models import TINY_ID
from tests.ui_harness import APP, GIB, app_factory, buttons, choose_inmem, settle, texts  # noqa: F401
from tests.ui_harness import controller as _controller

SHORT_ID = f"{mf.TEST_ORG}/short-llama"


@pytest.fixture
def dashboard(app_factory):  # noqa: F811 - the fixture imported above
    return lambda scenario="library_missing", **kw: choose_inmem(app_factory(APP, scenario, **kw))


@pytest.fixture(scope="module")
def short_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with one model of 512 positions (below the guide's 1024-token band)."""
    hub = tmp_path_factory.mktemp("hf_short") / "hub"
    hub.mkdir()
    mf.build_into_cache(hub, "short-llama", dataclasses.replace(mf.TINY, max_position_embeddings=512))
    return hub


def _mark(option: str) -> str:
    return option.rsplit(" · ", 1)[-1]


# ============================================================================ 12.1 widgets keep the choice
@pytest.mark.parametrize(("key", "bad", "good"), [("f_batch", 0, 1), ("f_context", 0, 1024)])
def test_an_invalid_field_never_changes_the_chosen_model(dashboard, hf_cache, key, bad, good):
    at = dashboard(hub=hf_cache)
    cached = [m.model_id for m in _controller().models().models]
    chosen = cached[1]  # not the first: a reset to the first option would show
    at.selectbox(key="f_model").set_value(chosen).run()
    at.number_input(key=key).set_value(bad).run()
    assert at.selectbox(key="f_model").value == chosen
    at.number_input(key=key).set_value(good).run()
    assert at.selectbox(key="f_model").value == chosen
    assert chosen.rsplit("/", 1)[-1] in texts(at) or chosen in texts(at)
    plan_needed = _controller().plan(at.radio(key="f_mode").value, chosen,
                                     _profile(at)).needed_bytes
    assert f"Нужно: **{_gib(plan_needed)}**" in texts(at)  # the plan is the chosen model's


def _profile(at) -> Profile:
    return Profile(mode=at.radio(key="f_mode").value, precision=Precision(at.selectbox(key="f_precision").value),
                   context_tokens=int(at.number_input(key="f_context").value),
                   batch=int(at.number_input(key="f_batch").value),
                   double_quant=Precision(at.selectbox(key="f_precision").value).is_4bit, device="cpu")


def _gib(n: int) -> str:
    from memory_controller.units import fmt_bytes

    return fmt_bytes(n)


# ============================================================================ 12.2 one verdict everywhere
def test_the_verdict_beside_a_model_is_the_plans_everywhere(dashboard, hf_cache):
    at = dashboard(hub=hf_cache, MEMCTL_HOST_MEMORY_BUDGET_BYTES=40 * 1024**2)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    at.number_input(key="f_context").set_value(2048).run()
    at.number_input(key="f_batch").set_value(64).run()
    options = at.selectbox(key="f_model").options
    table = next(m.value for m in at.markdown if "| Модель |" in m.value)
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table.splitlines()[2:]}
    ids = [m.model_id for m in _controller().models().models]
    for option, mid in zip(options, ids, strict=True):
        assert rows[mid].startswith(_mark(option)), (option, rows[mid])  # selector == table
    chosen = next(o for o in options if o.startswith(TINY_ID.rsplit("/", 1)[-1] + " · "))
    assert _mark(chosen) == "❌"
    assert "Не помещается" in texts(at)  # selector == plan


# ============================================================================ 12.4 context within the model
def test_the_preselected_context_never_exceeds_the_models_maximum_and_says_why(dashboard, short_hub):
    at = dashboard(hub=short_hub)
    assert at.selectbox(key="f_model").value == SHORT_ID
    assert at.number_input(key="f_context").value <= 512
    assert not at.sidebar.error  # the page does not open on a red error for its own preselection
    note = next(str(c.value) for c in at.sidebar.caption if "Поля заполнены по рекомендации" in str(c.value))
    # the rule that chose the number, said as what it is (issue 20.5): lowered from the table to the maximum
    assert "контекст снижен с 1024 токена по таблице до 512 токенов — это максимум самой модели" in note, note
    assert not buttons(at)["btn_apply"].disabled


# ============================================================================ 12.6 the user's language only
def test_after_apply_and_unload_a_russian_page_holds_no_english_and_no_raw_codes(dashboard, hf_cache):
    at = dashboard(hub=hf_cache)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    buttons(at)["btn_apply"].click().run()
    settle(at)
    buttons(at)[f"unload::{TINY_ID}"].click().run()
    settle(at)
    page = texts(at)
    for raw in ("(англ.)", "release.", "backend.", "stale_plan", "rss_anon", "Итог (англ.)", "nothing was loaded"):
        assert raw not in page, raw
    assert "Очистка GPU памяти" not in page  # no GPU here


def test_step_and_stage_names_say_what_they_do_and_what_takes_the_time():
    from pages import ui_common as ui

    assert ui.step_label("clear", has_gpu=True) == "Очистка GPU памяти"
    assert ui.step_label("clear", has_gpu=False) == "Очистка памяти"
    assert "torch" in ui.stage_label("config") and "несколько секунд" in ui.stage_label("config")
    assert "самая долгая" in ui.stage_label("warm-up")


def test_a_deployment_row_gives_its_endpoint_as_a_base_url_never_a_port():
    from pages.deployments import deployment_row

    profile = Profile("vllm", Precision.FP16, 4096, 1)
    dep = Deployment("vllm", "abc123", "org/model", profile, DeploymentState.READY, {"gpu:0": 20 * GIB},
                     endpoint="http://127.0.0.1:8000/v1", started_at=1.0, name="memctl-vllm", device="cuda:0")
    row = deployment_row(None, dep)
    assert "адрес: http://127.0.0.1:8000/v1" in row and "порт" not in row
    assert "vLLM" in row and "✅ готов" in row and "4096 токенов" in row


def test_a_memory_mapped_model_shows_its_mapped_pages_and_private_bytes_each_named():
    """Issue 20.2: «Оперативная память хоста: 128 B» for a bf16 model that maps 940 MiB of weights."""
    from memory_controller.backend import ReleaseReport
    from memory_controller.types import Outcome, msg
    from pages.deployments import deployment_row
    from pages.ui_ops import release_text

    profile = Profile("transformers", Precision.BF16, 1024, 1, device="cpu")
    dep = Deployment("transformers", "org/m", "org/m", profile, DeploymentState.READY, {"host": 128},
                     started_at=1.0, device="cpu", detail={"mapped_bytes": 940 * 2**20})
    row = deployment_row(None, dep)
    assert "940 MiB отображённых файлов весов (в памяти) + 128 B собственной" in row, row
    rep = ReleaseReport("transformers", "org/m", "org/m", "cpu", 128, 128, 0, "rss_anon", Outcome.SUCCESS,
                        msg("release.freed", "unloaded"), mapped_bytes=940 * 2**20, mapped_freed_bytes=940 * 2**20)
    text = release_text(rep)
    assert "Отображённые файлы весов: освобождено" in text and "ещё отображено 0" in text, text


# ============================================================================ 9.3 the plan shown is the plan applied
def test_apply_after_what_runs_changed_shows_the_stale_plan_and_touches_nothing(dashboard, hf_cache):
    at = dashboard(hub=hf_cache)
    at.selectbox(key="f_model").set_value(TINY_ID).run()
    assert "Выгрузить: ничего" in texts(at)  # the plan on screen: nothing to stop
    ctl = _controller()
    other = next(m.model_id for m in ctl.models().models if m.model_id != TINY_ID)
    ctl.apply("inmem", other)  # behind the page's back (another tab, the CLI)
    buttons(at)["btn_apply"].click().run()  # applies the plan it showed
    settle(at)
    page = texts(at)
    assert "Пока вы смотрели на план, изменилось то, что запущено" in page
    assert "Посмотрите на новый план" in page
    assert [d.model_id for d in ctl.deployments()] == [other]  # nothing was touched
    assert f"Выгрузить: {other}" in page  # the page planned again, visibly


# ============================================================================ 9.10 a failed log write is shown
def test_a_failed_operation_log_write_is_shown_until_a_write_succeeds(dashboard):
    at = dashboard()
    path = Path(_controller()._log.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    path.mkdir()  # where the log file should be: every write fails, as on a full or read-only disk
    try:
        buttons(at)["btn_clear"].click().run()
        settle(at)
        assert "Журнал операций не записывается" in texts(at)
        at.run()
        assert "Журнал операций не записывается" in texts(at)  # still there on the next run
    finally:
        path.rmdir()
    buttons(at)["btn_clear"].click().run()
    settle(at)
    assert "Журнал операций не записывается" not in texts(at)


def test_a_failed_log_write_is_acknowledged_with_ok(dashboard):
    at = dashboard()
    path = Path(_controller()._log.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    path.mkdir()
    try:
        buttons(at)["btn_clear"].click().run()
        settle(at)
        assert "Журнал операций не записывается" in texts(at)
        assert _controller().log_write_errors()
        buttons(at)["log_ack"].click().run()  # the user has read it
        assert "Журнал операций не записывается" not in texts(at) and "log_ack" not in buttons(at)
        assert _controller().log_write_errors() == []
    finally:
        path.rmdir()


# ============================================================================ 12.8 the chart
def test_the_chart_is_never_handed_an_empty_or_non_finite_series():
    from pages.memory_panel import chart_rows, chart_spec

    assert chart_spec([], 24 * GIB, "used") is None
    assert chart_spec(chart_rows([(1.0, (GIB, GIB))]), 24 * GIB, "used") is None
    assert chart_spec(chart_rows([(1.0, (GIB, 0)), (1.0, (GIB, 0))]), 24 * GIB, "used") is None  # one instant
    assert chart_spec(chart_rows([(1.0, (None, None)), (2.0, (None, None))]), 24 * GIB, "used") is None
    rows = chart_rows([(float("nan"), (GIB, 0)), (1.0, (GIB, 0)), (2.0, (None, 0)), (3.0, (2 * GIB, 0))])
    spec = chart_spec(rows, None, "used")
    assert spec is not None and [r["t"] for r in rows] == [1000.0, 3000.0]
    json.dumps(spec, allow_nan=False)  # every number finite


def test_a_three_quarter_gib_change_on_a_24_gib_device_fills_a_good_part_of_the_chart():
    from pages.memory_panel import chart_rows, chart_spec

    samples = [(float(i), (int(10 * GIB + (0.75 * GIB if i >= 30 else 0)), 0)) for i in range(60)]
    spec = chart_spec(chart_rows(samples), 24 * GIB, "used")
    lo, hi = spec["layer"][0]["encoding"]["y"]["scale"]["domain"]
    assert math.isfinite(lo) and math.isfinite(hi) and lo < 10 and hi > 10.75
    assert 0.75 / (hi - lo) > 0.4  # the step spans most of the height, not 3% of a 0-24 GiB axis
