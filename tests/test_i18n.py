"""UI string catalogs (config/strings.*.toml) and the translator (memory_controller/i18n.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memory_controller.backend import Availability, DeploymentState
from memory_controller.i18n import LANGUAGES, Translator, catalog, plural_form, render
from memory_controller.planning import APPLY_STEPS
from memory_controller.settings import load_settings
from memory_controller.types import Level, Message, NvmlStatus, Precision, msg

ROOT = Path(__file__).resolve().parent.parent
UI_FILES = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")), ROOT / "test_memory_controller.py"]


def _literal_keys() -> set[str]:
    keys: set[str] = set()
    for path in UI_FILES:
        text = path.read_text(encoding="utf-8")
        keys |= set(re.findall(r"""\bt\(\s*["']([a-z_]+\.[a-z_.]+)["']""", text))
        keys |= set(re.findall(r"""\b(?:count|plural|raw)\(\s*["']([a-z_]+\.[a-z_.]+)["']""", text))
        keys |= set(re.findall(r"""tr\(\)\(\s*["']([a-z_]+\.[a-z_.]+)["']""", text))
    return keys


def _dynamic_keys() -> set[str]:
    keys = {f"level.{lv.value}" for lv in Level}
    keys |= {f"step.{s}" for s in (*APPLY_STEPS, "rollback", "restore", "noop", "cancel", "clear_host",
                                   "stop_backend", "stop_inmem", "stop_transformers", "stop_vllm")}
    keys |= {f"state.{s.value}" for s in DeploymentState}
    keys |= {f"msg.{c}" for c in MESSAGE_CODES} | {f"err.{c}" for c in ERROR_CODES}
    keys |= {f"stage.{s}" for s in ("config", "weights", "placing", "warm-up", "ready",  # Transformers
                                    "checking", "pulling", "creating", "waiting")}  # vLLM
    keys |= {f"rule.{r}" for r in ("model_max", "memory")}
    backend_ids = set(load_settings().backends)
    keys |= {f"precision.{p.value}" for p in Precision} | {f"mode.{m}" for m in backend_ids}
    keys |= {f"rec.mode_{m}" for m in backend_ids}
    keys |= {f"ops.{k}" for k in ("apply", "unload")}
    keys |= {f"opkind.{k}" for k in ("apply", "unload", "clear_memory", "emergency_clear")}
    keys |= {f"diag.check_{c}" for c in ("memory", "recommend", "switch", "clear", "emergency")}
    keys |= {f"diag.status_{s}" for s in ("passed", "warning", "failed", "skipped")}
    for a in ("out_of_memory", "model_not_loading", "container_not_stopping"):
        keys |= {f"advice.{a}.problem", f"advice.{a}.steps"}
    keys |= {f"nvml.{s.value}" for s in NvmlStatus}
    keys |= {f"errors.{cls.__name__}" for cls in _error_classes()}
    return keys


# Every Message code the core and the backends give (memory_controller/, backends/): the UI renders each.
MESSAGE_CODES = (
    "backend.precision_unsupported", "backend.device_unsupported", "backend.unavailable", "backend.import_failed",
    "backend.no_gpu", "backend.docker_unavailable", "backend.gpu_missing", "backend.gpu_memory_unknown",
    "backend.model_missing", "backend.over_util_cap", "backend.bad_settings", "backend.tools_not_parsed",
    "plan.context_over_model_max", "plan.suggest_smaller_model", "plan.suggest_profile", "fit.precision",
    "fit.context", "rec.backend_unavailable_fallback", "rec.cpu_half_precision", "rec.model_does_not_fit",
    "rec.context_rule", "rec.context_raised_model_max", "rec.context_raised_memory", "rec.context_capped",
    "emergency.nothing_running", "emergency.cut_streams", "emergency.op_stopped", "emergency.no_gpu_backend",
    "emergency.nothing_loaded", "emergency.stopped", "emergency.ollama_silent",
    "emergency.ollama_empty", "emergency.ollama_unloaded", "emergency.cleared", "ide.window_model_max",
    "ide.window_memory", "release.freed", "release.already_gone", "release.partial", "release.failed",
    "release.unmeasured", "deployment.unreadable_labels", "model.no_tokenizer", "model.no_chat_template",
    "quant.bitsandbytes_missing",
)
# Error codes the controller raises with (MemctlError.code).
ERROR_CODES = ("busy", "busy.generating", "cancelled", "timeout", "stop_failed", "step_failed", "stale_plan",
               "stale_plan.deployments", "stale_plan.memory", "not_loaded", "no_model", "insufficient_memory",
               "backend.unknown", "backend.import_failed", "corrupt_data")


def _error_classes() -> list[type]:
    import memory_controller.errors as errors

    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.MemctlError)]


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_key_the_ui_uses_is_in_each_catalog(lang):
    used = _literal_keys() | _dynamic_keys()
    assert len(used) > 100  # the scan found the UI's calls
    missing = sorted(k for k in used if k not in catalog(lang))
    assert not missing, f"strings.{lang}.toml lacks {missing}"


def test_both_catalogs_have_the_same_keys():
    assert set(catalog("ru")) == set(catalog("en"))


def test_russian_labels_are_worded_as_in_the_users_guide():
    t = Translator("ru")
    assert t("sidebar.title") == "🔧 Управление режимами и памятью"
    assert [t(f"metrics.{k}") for k in ("total_gpu", "used", "free", "util")] == [
        "GPU память (всего)", "Используется", "Доступно", "Утилизация"]
    assert t("controls.apply") == "🔄 Применить изменения"
    assert t("controls.clear") == "🧹 Очистить память"
    assert t("controls.emergency") == "🚨 Экстренная очистка"
    assert t("level.green", green="4", yellow="2") == "🟢 **Зеленый** — достаточно памяти (4+ GB)"
    assert t("advice.out_of_memory.problem") == "Недостаточно памяти"
    assert t.raw("advice.model_not_loading.steps") == [
        "Проверьте, что модель есть в кеше", "Убедитесь, что достаточно памяти", "Попробуйте экстренную очистку",
        "Перезапустите приложение"]
    assert t.raw("advice.container_not_stopping.steps")[1:] == ["Проверьте Docker статус вручную",
                                                                "Перезапустите Docker службу"]


@pytest.mark.parametrize(("n", "word"), [(1, "токен"), (2, "токена"), (4, "токена"), (5, "токенов"),
                                         (11, "токенов"), (12, "токенов"), (21, "токен"), (512, "токенов"),
                                         (1024, "токена"), (2048, "токенов")])
def test_russian_token_counts_read_as_in_the_guide(n, word):
    assert Translator("ru").count("unit.tokens", n) == f"{n} {word}"


def test_english_plural_is_one_or_many():
    t = Translator("en")
    assert (t.count("unit.tokens", 1), t.count("unit.tokens", 2), t.count("unit.tokens", 21)) == (
        "1 token", "2 tokens", "21 tokens")
    assert plural_form(3, "en") == "many"


def test_a_missing_key_falls_back_to_russian_then_to_the_key(tmp_path):
    (tmp_path / "strings.ru.toml").write_text('[a]\nonly_ru = "по-русски"\nboth = "оба"\n', encoding="utf-8")
    (tmp_path / "strings.en.toml").write_text('[a]\nboth = "both"\n', encoding="utf-8")
    t = Translator("en", tmp_path)
    assert (t("a.both"), t("a.only_ru"), t("a.nowhere")) == ("both", "по-русски", "a.nowhere")
    assert Translator("de", tmp_path).language == "ru"  # unknown language: the default


def test_a_missing_format_field_leaves_the_text_readable():
    t = Translator("ru")
    assert t("plan.frees") == "освободит {freed}"
    assert t("plan.frees", other=1) == "освободит {freed}"
    assert t("plan.frees", freed="1 GiB") == "освободит 1 GiB"


def _gpu_snapshot(free_gib: float):
    from memory_controller.types import DeviceKind, DeviceSnapshot, SystemSnapshot

    gib = 1024**3
    gpu = DeviceSnapshot(DeviceKind.GPU, 0, "GPU", None, 24 * gib, 24 * gib - int(free_gib * gib), int(free_gib * gib), 0.0)
    host = DeviceSnapshot(DeviceKind.HOST, None, "host", None, 32 * gib, 16 * gib, 16 * gib, None)
    return SystemSnapshot(gpus=(gpu,), host=host, nvml_status=NvmlStatus.OK)


def test_recommendation_notes_are_message_codes_the_catalogs_translate():
    from memory_controller.recommend import recommend
    from memory_controller.settings import load_settings

    s = load_settings()
    snap = _gpu_snapshot(9)
    no_docker = recommend(snap, bands=s.bands, green_min_bytes=s.green_min_bytes, yellow_min_bytes=s.yellow_min_bytes,
                          availability={"vllm": Availability(False), "transformers": Availability(True)})
    assert [n.code for n in no_docker.notes] == ["rec.backend_unavailable_fallback"]
    assert dict(no_docker.notes[0].args) == {"table": "vllm_full", "used": no_docker.band, "backend": "vllm",
                                              "used_backend": "transformers"}
    on_cpu = recommend(snap, bands=s.bands, green_min_bytes=s.green_min_bytes, yellow_min_bytes=s.yellow_min_bytes,
                       device_key="host", cpu_half_precision="bf16")
    cpu_note = next(n for n in on_cpu.notes if n.code == "rec.cpu_half_precision")
    assert render(cpu_note, "ru") == "на CPU FP16 работает медленно, поэтому bf16"
    assert render(cpu_note, "en") == "FP16 is slow on the CPU, so bf16"


def test_render_formats_a_message_by_its_code_and_falls_back_to_its_english_text():
    m = msg("plan.context_over_model_max", "context 4096 exceeds the model's maximum 2048", tokens=4096, max=2048)
    assert render(m, "ru") == "контекст 4096 больше максимума модели (2048 токенов): уменьшите контекст"
    assert render(m, "en") == "context 4096 exceeds the model's maximum (2048 tokens): lower the context"
    unknown = msg("some.new_code", "a backend's own words")
    assert render(unknown, "ru") == "a backend's own words"  # never the bare code while there is text
    missing_arg = Message("plan.suggest_profile", {"precision": "nf4"}, "would fit with nf4")
    assert render(missing_arg, "ru") == "would fit with nf4"
    sized = msg("backend.over_util_cap", "x", needed_bytes=3 * 1024**3, cap=0.95, total_bytes=1)
    assert "3.00 GiB" in render(sized, "ru")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_message_and_error_code_reads_as_a_sentence_of_that_language(lang):
    cat = catalog(lang)
    for code in MESSAGE_CODES:
        assert cat[f"msg.{code}"].strip(), code
    if lang == "ru":
        for code in (*MESSAGE_CODES, *ERROR_CODES):
            key = f"msg.{code}" if code in MESSAGE_CODES else f"err.{code}"
            assert re.search("[а-яё]", cat[key]), key
