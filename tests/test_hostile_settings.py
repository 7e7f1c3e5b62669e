"""Settings that validate on their face but break later are refused at load time, naming the field;
a misspelt MEMCTL_* variable gets a "did you mean"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memory_controller.errors import SettingsError
from memory_controller.settings import load_settings, settings_warnings
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("field", ["vllm_ready_timeout_s", "operation_timeout_s", "step_timeout_s",
                                   "vllm_stop_timeout_s", "poll_interval_s", "serve_idle_unload_s"])
@pytest.mark.parametrize("value", ["inf", "nan", "1e308", "-inf", "Infinity"])
def test_non_finite_or_absurd_timeouts_are_refused_naming_the_field(monkeypatch, field, value):
    env = f"MEMCTL_{field.upper()}"
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert field in info.value.message and env in info.value.message


@pytest.mark.parametrize(("field", "value"), [
    ("green_min_gib", "inf"), ("yellow_min_gib", "nan"), ("cuda_context_reserve_gib", "inf"),
    ("activation_overhead_fraction", "nan"), ("green_min_gib", "1e300"),
])
def test_non_finite_memory_figures_are_refused(monkeypatch, field, value):
    monkeypatch.setenv(f"MEMCTL_{field.upper()}", value)
    with pytest.raises(SettingsError, match=field):
        load_settings()


def test_a_timeout_from_the_toml_file_that_is_inf_is_refused(monkeypatch, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("operation_timeout_s = inf\n")  # TOML has an inf literal
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError, match="operation_timeout_s"):
        load_settings()


def test_sane_timeouts_still_load(monkeypatch):
    monkeypatch.setenv("MEMCTL_OPERATION_TIMEOUT_S", "3600")
    monkeypatch.setenv("MEMCTL_VLLM_READY_TIMEOUT_S", "86400")
    s = load_settings()
    assert (s.operation_timeout_s, s.vllm_ready_timeout_s) == (3600, 86400)


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_state_dir_is_refused_not_taken_as_the_current_folder(monkeypatch, value):
    monkeypatch.setenv("MEMCTL_STATE_DIR", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "state_dir" in info.value.message and "MEMCTL_STATE_DIR" in info.value.message
    assert "empty" in info.value.message


def test_an_empty_state_dir_in_the_toml_file_is_refused(monkeypatch, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('state_dir = ""\n')
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    monkeypatch.delenv("MEMCTL_STATE_DIR")
    with pytest.raises(SettingsError, match="state_dir"):
        load_settings()


_VLLM_ONLY = """
[[profiles]]
name = "vllm_full"
min_free_gib = 0.0
mode = "vllm"
precision = "fp16"
context_tokens = 2048
batch = 4
"""


@pytest.mark.parametrize(("toml", "words"), [
    ("profiles = []\n", ["profiles", "empty"]),
    (_VLLM_ONLY.replace('mode = "vllm"', 'mode = "transformers"').replace("min_free_gib = 0.0", "min_free_gib = inf"),
     ["min_free_gib", "finite"]),
    (_VLLM_ONLY.replace("batch = 4", "batch = 4\ncontext_token = 9"), ["context_token"]),
])
def test_a_recommendation_table_that_would_break_at_start_is_refused(monkeypatch, tmp_path, toml, words):
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml)
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError) as info:
        load_settings()
    for w in words:
        assert w in info.value.message


@pytest.mark.parametrize("toml", [
    _VLLM_ONLY,
    _VLLM_ONLY.replace('"vllm_full"', '"a"') + _VLLM_ONLY.replace('"vllm_full"', '"b"').replace("0.0", "8.0"),
])
def test_a_table_without_a_band_for_the_cpu_loads_and_falls_back_to_its_lowest_band(monkeypatch, tmp_path, toml):
    """Bands name backend ids; one that cannot serve here (no GPU) falls back generically, never breaks."""
    from memory_controller.probe.devices import DeviceProbe
    from memory_controller.recommend import recommend
    from tests.fake_pynvml import scenario

    cfg = tmp_path / "config.toml"
    cfg.write_text(toml)
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    s = load_settings()
    assert {b.mode for b in s.bands} == {"vllm"}
    snap = DeviceProbe(scenario("library_missing").module()).snapshot()
    r = recommend(snap, bands=s.bands, green_min_bytes=s.green_min_bytes, yellow_min_bytes=s.yellow_min_bytes,
                  cpu_backends={"transformers"})
    assert r.band == min(s.bands, key=lambda b: b.min_free_bytes).name and r.profile.device == "cpu"
    assert not r.preferred_available and "no NVIDIA GPU" in r.preferred_reason


def test_an_empty_table_from_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("MEMCTL_PROFILES", "[]")
    with pytest.raises(SettingsError, match="empty"):
        load_settings()


@pytest.mark.parametrize("module", ["os", "subprocess", "tests.fake_pynvml"])
def test_nvml_module_is_not_a_user_setting(monkeypatch, module):
    monkeypatch.delenv("MEMCTL_TEST_SEAMS", raising=False)
    monkeypatch.setenv("MEMCTL_NVML_MODULE", module)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "nvml_module" in info.value.message and "test-only" in info.value.message


def test_nvml_module_in_the_toml_file_is_refused_too(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMCTL_TEST_SEAMS", raising=False)
    cfg = tmp_path / "config.toml"
    cfg.write_text('nvml_module = "shutil"\n')
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError, match="nvml_module"):
        load_settings()


def test_the_test_harness_may_use_the_nvml_seam(monkeypatch):
    monkeypatch.setenv("MEMCTL_TEST_SEAMS", "1")
    monkeypatch.setenv("MEMCTL_NVML_MODULE", "tests.fake_pynvml")
    assert load_settings().nvml_module == "tests.fake_pynvml"
    monkeypatch.delenv("MEMCTL_NVML_MODULE")
    monkeypatch.delenv("MEMCTL_TEST_SEAMS")
    assert load_settings().nvml_module == "pynvml"


@pytest.mark.parametrize(("name", "suggestion"), [
    ("MEMCTL_LANGAUGE", "MEMCTL_LANGUAGE"),
    ("MEMCTL_VLLM_PROT", "MEMCTL_VLLM_PORT"),
    ("MEMCTL_STATEDIR", "MEMCTL_STATE_DIR"),
    ("MEMCTL_HF_CACHE", "MEMCTL_HF_CACHE_DIR"),
    ("MEMCTL_CONFIG", "MEMCTL_CONFIG_FILE"),
])
def test_a_misspelt_variable_gets_a_did_you_mean(name, suggestion):
    warnings = settings_warnings({name: "x", "PATH": "/bin"})
    assert len(warnings) == 1
    assert name in warnings[0] and f"did you mean {suggestion}?" in warnings[0]


def test_real_settings_and_harness_variables_give_no_warning(monkeypatch):
    env = {"MEMCTL_LANGUAGE": "en", "MEMCTL_VLLM_PORT": "9000", "MEMCTL_CONFIG_FILE": "/x",
           "MEMCTL_TEST_DOCKER_HOST": "unix:///x", "MEMCTL_FAKE_NVML": "two_gpus", "MEMCTL_TEST_SEAMS": "1",
           "memctl_language": "en", "OTHER": "1"}
    assert settings_warnings(env) == []
    assert "no memctl setting" in settings_warnings({"MEMCTL_QQQQQQQQ": "1"})[0]
    monkeypatch.setenv("MEMCTL_POLL_INTERVL_S", "1")
    assert any("MEMCTL_POLL_INTERVAL_S" in w for w in settings_warnings())  # the real environment by default
    load_settings()  # a typo never stops memctl


@pytest.mark.parametrize("env", [
    {"MEMCTL_OPERATION_TIMEOUT_S": "inf"}, {"MEMCTL_STATE_DIR": ""}, {"MEMCTL_NVML_MODULE": "os"},
    {"MEMCTL_PROFILES": "[]"},
])
def test_the_cli_exits_2_with_one_message_naming_the_field(tmp_path, env):
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    proc = subprocess.run([sys.executable, "-m", "memctl_cli", "models"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env=subprocess_env(**{"MEMCTL_CONFIG_FILE": str(cfg), "MEMCTL_STATE_DIR": str(tmp_path),
                                             "MEMCTL_TEST_SEAMS": "0", **env}))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    field = next(iter(env)).removeprefix("MEMCTL_").lower()
    assert field in proc.stderr and proc.stderr.count("error:") == 1


@pytest.mark.parametrize(("env", "value"), [
    ("MEMCTL_LOCAL_MODEL_DIRS", "[" * 20_000 + "]" * 20_000),
    ("MEMCTL_BACKENDS", '{"a": ' * 3000 + "1" + "}" * 3000),
    ("MEMCTL_PROFILES", "[" + "{" * 100 + "}" * 100 + "]"),
])
def test_json_values_nested_too_deep_are_a_settings_error_not_a_recursion_error(monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert env in info.value.message and "nested deeper" in info.value.message


def test_a_toml_file_nested_too_deep_is_a_settings_error(monkeypatch, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("local_model_dirs = " + "[" * 5000 + "]" * 5000 + "\n")
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError, match="nested deeper"):
        load_settings()
