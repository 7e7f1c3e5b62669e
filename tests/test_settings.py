"""Settings: env over user TOML over defaults; invalid values name field, value and what is allowed."""

from __future__ import annotations

import pytest

from memory_controller.errors import SettingsError
from memory_controller.settings import load_settings


def test_defaults_carry_the_guides_table_and_thresholds():
    s = load_settings()
    assert [b.name for b in s.bands] == ["vllm_full", "vllm_limited", "transformers_fp16", "transformers_int8"]
    assert s.green_min_gib == 4.0 and s.yellow_min_gib == 2.0
    assert s.language == "ru"
    assert s.bind_address == "127.0.0.1"
    assert s.vllm_image_ref == "vllm/vllm-openai:v0.33.0"


def test_env_overrides_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMCTL_LANGUAGE", "en")
    monkeypatch.setenv("MEMCTL_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MEMCTL_POLL_INTERVAL_S", "0.5")
    s = load_settings()
    assert (s.language, s.state_dir, s.poll_interval_s) == ("en", tmp_path, 0.5)


def test_user_file_overrides_defaults_and_env_overrides_the_file(monkeypatch, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('language = "en"\nvllm_port = 9001\ngreen_min_gib = 5.0\n')
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    s = load_settings()
    assert (s.language, s.vllm_port, s.green_min_gib) == ("en", 9001, 5.0)
    monkeypatch.setenv("MEMCTL_VLLM_PORT", "9002")
    assert load_settings().vllm_port == 9002


def test_hf_cache_defaults_to_huggingface_hubs_own(monkeypatch, tmp_path):
    from huggingface_hub import constants

    assert load_settings().resolved_hf_cache_dir.as_posix() == str(constants.HF_HUB_CACHE)
    monkeypatch.setenv("MEMCTL_HF_CACHE_DIR", str(tmp_path))
    assert load_settings().resolved_hf_cache_dir == tmp_path


@pytest.mark.parametrize(
    ("env", "value", "words"),
    [
        ("MEMCTL_LANGUAGE", "de", ["language", "'de'", "'ru' or 'en'"]),
        ("MEMCTL_POLL_INTERVAL_S", "fast", ["poll_interval_s", "'fast'", "number"]),
        ("MEMCTL_POLL_INTERVAL_S", "0", ["poll_interval_s", "greater than or equal to 0.2"]),
        ("MEMCTL_VLLM_PORT", "70000", ["vllm_port", "70000", "65535"]),
        ("MEMCTL_BIND_ADDRESS", "localhost; rm -rf", ["bind_address", "IP address"]),
        ("MEMCTL_VLLM_TAG", "bad tag!", ["vllm_tag", "pattern"]),
    ],
)
def test_invalid_values_name_the_field_the_value_and_what_is_allowed(monkeypatch, env, value, words):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = str(info.value)
    for w in words:
        assert w in text
    assert env in text


def test_inconsistent_thresholds_are_refused():
    with pytest.raises(SettingsError, match="yellow_min_gib"):
        load_settings(green_min_gib=1.0, yellow_min_gib=3.0)


def test_broken_user_toml_is_a_settings_error(monkeypatch, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("language = \n")
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError):
        load_settings()


def test_unknown_key_in_user_file_is_refused(monkeypatch, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("langauge = 'en'\n")
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError, match="langauge"):
        load_settings()


def test_non_json_list_value_names_the_field_and_the_value(monkeypatch):
    monkeypatch.setenv("MEMCTL_LOCAL_MODEL_DIRS", "notjson")
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = str(info.value)
    assert "local_model_dirs" in text and "'notjson'" in text and "JSON" in text
    assert "TOML" not in text


def test_non_loopback_bind_needs_an_explicit_opt_in(monkeypatch):
    monkeypatch.setenv("MEMCTL_BIND_ADDRESS", "0.0.0.0")
    with pytest.raises(SettingsError, match="allow_non_loopback_bind"):
        load_settings()
    monkeypatch.setenv("MEMCTL_ALLOW_NON_LOOPBACK_BIND", "true")
    assert load_settings().bind_address == "0.0.0.0"


def test_a_named_config_file_that_does_not_exist_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings()


def test_a_bad_value_from_the_file_is_not_blamed_on_the_environment(monkeypatch, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('language = "de"\n')
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    with pytest.raises(SettingsError, match="MEMCTL_LANGUAGE or the config file"):
        load_settings()


def test_a_backends_options_are_its_own_model_under_its_table_and_the_old_variables_are_aliases(monkeypatch, tmp_path):
    from backends.vllm.options import VllmOptions, vllm_options
    from memory_controller.settings import settings_warnings

    cfg = tmp_path / "config.toml"
    cfg.write_text('[backends.vllm]\nfactory = "backends.vllm:create"\nport = 9100\ntag = "v0.27.1"\n')
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    s = load_settings()
    opts = vllm_options(s)
    assert isinstance(opts, VllmOptions) and (opts.port, opts.tag, opts.image) == (9100, "v0.27.1", "vllm/vllm-openai")
    assert s.backends["vllm"].factory == "backends.vllm:create" and s.vllm_port == 9100  # the old name still reads
    monkeypatch.setenv("MEMCTL_VLLM_PORT", "9200")  # the old variable overrides the table
    assert vllm_options(load_settings()).port == 9200
    assert settings_warnings({"MEMCTL_VLLM_PORT": "1", "MEMCTL_VLLM_READY_TIMEOUT_S": "5"}) == []
    assert "MEMCTL_VLLM_PROT" in settings_warnings({"MEMCTL_VLLM_PROT": "1"})[0]
    monkeypatch.setenv("MEMCTL_VLLM_PROT", "9300")  # an option the backend's model does not have
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "backends.vllm.prot" in info.value.message and "MEMCTL_VLLM_PROT" in info.value.message
