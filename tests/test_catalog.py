"""Catalog: the HF cache through scan_cache_dir, local model dirs, id validation, resolution."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from memory_controller.catalog import resolve_model, scan_models, validate_model_id
from memory_controller.errors import InvalidModelIdError, ModelLoadError, ModelNotFoundError
from memory_controller.settings import load_settings
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID

# Fixtures hf_cache, hf_settings, bad_hf_cache, bad_models, bad_settings, big_model come from
# tests/fixtures_models.py, registered as a plugin in tests/conftest.py.


def test_catalog_lists_cached_models_with_revision_size_weights_and_architecture(hf_settings, hf_cache):
    result = scan_models(hf_settings)
    by_id = {m.model_id: m for m in result.models}
    assert {TINY_ID, TINY_UNTIED_ID} <= set(by_id)
    tiny = by_id[TINY_ID]
    ref = (hf_cache / "models--memctl-test--tiny-llama" / "refs" / "main").read_text()
    assert tiny.revision == ref
    assert tiny.path == str(hf_cache / "models--memctl-test--tiny-llama" / "snapshots" / ref)
    assert tiny.has_safetensors and tiny.has_config
    assert tiny.architecture == "LlamaForCausalLM"
    assert tiny.source == "hf_cache"
    weights = (Path(tiny.path) / "model.safetensors").stat().st_size
    assert weights < tiny.size_on_disk_bytes < weights + 200_000  # weights + config + tokenizer
    assert result.cache_dir == str(hf_cache)


def test_corrupt_cache_entry_comes_back_as_a_warning_beside_the_list(hf_settings):
    result = scan_models(hf_settings)
    assert any("models--memctl-test--broken" in w for w in result.warnings)
    assert all("broken" not in m.model_id for m in result.models)
    assert len(result.models) >= 2


def test_unreadable_config_is_listed_with_a_warning(bad_settings, bad_models):
    result = scan_models(bad_settings)
    entry = next(m for m in result.models if m.model_id == bad_models["bad_config"])
    assert entry.has_config is False and entry.architecture is None
    assert any(bad_models["bad_config"] in w and "config.json" in w for w in result.warnings)
    no_weights = next(m for m in result.models if m.model_id == bad_models["no_weights"])
    assert no_weights.has_safetensors is False and no_weights.has_config is True


def test_missing_cache_is_an_empty_list_with_a_warning(tmp_path):
    settings = load_settings(hf_cache_dir=tmp_path / "does-not-exist", local_model_dirs=[])
    result = scan_models(settings)
    assert result.models == ()
    assert len(result.warnings) == 1 and "does not exist" in result.warnings[0]


def test_local_model_dirs_are_listed_by_absolute_path(tmp_path, hf_settings):
    tiny = resolve_model(TINY_ID, hf_settings)
    local_root = tmp_path / "models"
    shutil.copytree(tiny.path, local_root / "my-tiny")  # copies the files the symlinks point to
    (local_root / "not-a-model").mkdir()
    settings = load_settings(hf_cache_dir=tmp_path / "no-cache", local_model_dirs=[local_root, tmp_path / "gone"])
    result = scan_models(settings)
    assert [m.model_id for m in result.models] == [str(local_root / "my-tiny")]
    m = result.models[0]
    assert m.source == "local_dir" and m.revision is None and m.has_safetensors and m.architecture
    assert any(str(tmp_path / "gone") in w for w in result.warnings)
    assert resolve_model(str(local_root / "my-tiny"), settings) == m


@pytest.mark.parametrize("model_id", ["Qwen/Qwen2.5-Coder-1.5B-Instruct", "gpt2", "memctl-test/tiny-llama",
                                      " org/name "])
def test_valid_hf_ids_are_accepted(model_id, hf_settings):
    assert validate_model_id(model_id, hf_settings) == model_id.strip()


@pytest.mark.parametrize("model_id", [
    "", "   ", "../etc/passwd", "org/../../etc", "org/..", "./model", "org/name/extra", "org name",
    "org/na me", "org--name", "org/name.", "org/\x00name", "org\\name", "-org/name", "org/name;rm",
])
def test_malformed_or_tricky_ids_are_rejected_with_a_hint(model_id, hf_settings):
    with pytest.raises(InvalidModelIdError) as info:
        validate_model_id(model_id, hf_settings)
    assert info.value.hint


def test_absolute_paths_outside_the_local_model_dirs_are_rejected(tmp_path):
    inside = tmp_path / "models"
    inside.mkdir()
    settings = load_settings(hf_cache_dir=tmp_path, local_model_dirs=[inside])
    assert validate_model_id(str(inside / "a"), settings) == str(inside / "a")
    for bad in ["/etc", str(tmp_path / "elsewhere"), str(inside / ".." / "elsewhere"), str(inside) + "-evil/x"]:
        with pytest.raises(InvalidModelIdError):
            validate_model_id(bad, settings)


def test_resolving_an_unknown_id_says_where_we_looked(hf_settings, hf_cache):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("memctl-test/not-there", hf_settings)
    msg = str(info.value)
    assert str(hf_cache) in msg and "models--memctl-test--not-there" in msg and "local model dirs" in msg
    assert "never downloads" in info.value.hint


def test_resolving_an_id_differing_in_case_suggests_the_cached_one(hf_settings):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("memctl-test/TINY-llama", hf_settings)
    assert TINY_ID in info.value.hint


def test_resolving_a_corrupt_cache_entry_says_it_is_corrupt(hf_settings):
    with pytest.raises(ModelLoadError) as info:
        resolve_model("memctl-test/broken", hf_settings)
    assert "corrupt" in info.value.message


def test_resolving_returns_the_catalog_entry(hf_settings):
    m = resolve_model(TINY_UNTIED_ID, hf_settings)
    assert m == next(x for x in scan_models(hf_settings).models if x.model_id == TINY_UNTIED_ID)


def test_a_snapshot_of_regular_files_counts_their_bytes(tmp_path, hf_cache, capsys):
    """A copied cache or a ``local_dir`` download keeps real files in snapshots/ (no links into blobs/):
    the model list, the table, `memctl models` all show size_on_disk_bytes, which must count them."""
    import argparse

    from memctl_cli.models import cmd_models
    from memory_controller.units import fmt_bytes

    hub = tmp_path / "hub"
    src = hf_cache / "models--memctl-test--tiny-llama"
    dst = hub / "models--memctl-test--copied-llama"
    shutil.copytree(src, dst, symlinks=False)  # links resolved: regular files in the snapshot
    shutil.rmtree(dst / "blobs")
    (dst / "blobs").mkdir()
    snap = next((dst / "snapshots").iterdir())
    (snap / "extra").mkdir()
    (snap / "extra" / "notes.txt").write_bytes(b"x" * 1000)  # nested regular files count too
    files = [p for p in snap.rglob("*") if p.is_file()]
    assert files and not any(p.is_symlink() for p in files)
    want = sum(p.stat().st_size for p in files)
    (model,) = scan_models(load_settings(hf_cache_dir=hub, local_model_dirs=[])).models
    assert model.model_id == "memctl-test/copied-llama"
    assert model.size_on_disk_bytes == want > 0
    settings = load_settings(hf_cache_dir=hub, local_model_dirs=[])
    assert cmd_models(argparse.Namespace(json=False), settings) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "copied-llama" in line)
    assert fmt_bytes(want) in row and " 0 B " not in row
    # a mixed snapshot: links into blobs/ count once (as blobs), regular files beside them count too
    link_repo = hub / "models--memctl-test--tiny-llama"
    shutil.copytree(src, link_repo, symlinks=True)
    link_snap = next((link_repo / "snapshots").iterdir())
    (link_snap / "README.md").write_bytes(b"y" * 5000)
    by_id = {m.model_id: m for m in scan_models(load_settings(hf_cache_dir=hub, local_model_dirs=[])).models}
    blobs = sum(p.stat().st_size for p in (link_repo / "blobs").iterdir())
    assert by_id[TINY_ID].size_on_disk_bytes == blobs + 5000
