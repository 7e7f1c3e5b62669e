"""UI string catalogs (config/strings.*.toml) and the translator (memory_controller/i18n.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memory_controller.controller import APPLY_STEPS
from memory_controller.i18n import LANGUAGES, Translator, catalog, plural_form
from memory_controller.types import Level, Mode, NvmlStatus, Precision

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
    keys |= {f"step.{s}" for s in (*APPLY_STEPS, "rollback", "restore", "noop", "cancel", "unload_transformers",
                                   "stop_containers", "stop")}
    keys |= {f"precision.{p.value}" for p in Precision} | {f"mode.{m.value}" for m in Mode}
    keys |= {f"rec.mode_{m.value}" for m in Mode}
    keys |= {f"ops.{k}" for k in ("apply", "unload", "stop", "clear", "emergency")}
    keys |= {f"health.{h}" for h in ("ready", "starting", "unhealthy", "stopped", "unknown")}
    keys |= {f"diag.check_{c}" for c in ("memory", "recommend", "switch", "clear", "emergency")}
    keys |= {f"diag.status_{s}" for s in ("passed", "warning", "failed", "skipped")}
    for a in ("out_of_memory", "model_not_loading", "container_not_stopping"):
        keys |= {f"advice.{a}.problem", f"advice.{a}.steps"}
    keys |= {f"nvml.{s.value}" for s in NvmlStatus}
    keys |= {f"note.{c}" for c in NOTE_CODES}
    keys |= {f"errors.{cls.__name__}" for cls in _error_classes()}
    return keys


NOTE_CODES = ("vllm_unavailable_fallback", "cpu_half_precision", "fit_precision", "fit_context", "model_does_not_fit")


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


def test_recommendation_notes_come_with_codes_the_catalogs_translate():
    from memory_controller.recommend import recommend
    from memory_controller.settings import load_settings

    s = load_settings()
    snap = _gpu_snapshot(9)
    no_docker = recommend(snap, bands=s.bands, green_min_bytes=s.green_min_bytes, yellow_min_bytes=s.yellow_min_bytes,
                          docker_available=False)
    assert no_docker.note_codes == (f"vllm_unavailable_fallback:vllm_full:{no_docker.band}",)
    assert len(no_docker.notes) == 1  # the English note stays for the CLI and JSON
    on_cpu = recommend(snap, bands=s.bands, green_min_bytes=s.green_min_bytes, yellow_min_bytes=s.yellow_min_bytes,
                       device_key="host", cpu_half_precision="bf16")
    assert "cpu_half_precision:bf16" in on_cpu.note_codes
    fitted = recommend(snap, bands=s.bands, green_min_bytes=s.green_min_bytes, yellow_min_bytes=s.yellow_min_bytes,
                       fit=lambda p, _free: (p.with_(precision=Precision.INT8, context_tokens=512), ("x",)))
    assert fitted.note_codes == ("fit_precision:fp16:int8", "fit_context:512")
    for code in NOTE_CODES:
        assert not Translator("ru")(f"note.{code}").isascii()
