"""One corrupt cache entry never hides the catalog: each is one warning, the good models still show,
in the library, in `memctl models` and in resolving an id."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from memory_controller import catalog
from memory_controller.catalog import resolve_model, scan_models
from memory_controller.errors import ModelLoadError, ModelNotFoundError
from memory_controller.settings import load_settings
from tests import model_factory as mf
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "c" * 40


def _repo(hub: Path, name: str) -> Path:
    repo = hub / f"models--{mf.TEST_ORG}--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


def _snapshot_with_config(hub: Path, name: str, config: str | bytes) -> Path:
    snap = _repo(hub, name) / "snapshots" / COMMIT
    snap.mkdir()
    (snap / "config.json").write_bytes(config.encode() if isinstance(config, str) else config)
    (snap / "model.safetensors").write_bytes(b"\x00" * 16)
    return snap


def _snapshot_loop(hub: Path) -> str:
    repo = _repo(hub, "snapshot-loop")
    os.symlink(COMMIT, repo / "snapshots" / COMMIT)  # points at itself
    return "snapshot-loop"


def _snapshots_folder_loop(hub: Path) -> str:
    repo = hub / f"models--{mf.TEST_ORG}--snapshots-loop"
    (repo / "refs").mkdir(parents=True)
    os.symlink("snapshots", repo / "snapshots")
    return "snapshots-loop"


def _snapshot_is_a_file(hub: Path) -> str:
    repo = _repo(hub, "snapshot-file")
    (repo / "snapshots" / COMMIT).write_text("not a folder")
    return "snapshot-file"


def _repo_is_a_file(hub: Path) -> str:
    (hub / f"models--{mf.TEST_ORG}--repo-file").write_text("not a folder")
    return "repo-file"


def _repo_is_a_dangling_link(hub: Path) -> str:
    os.symlink(hub / "nowhere", hub / f"models--{mf.TEST_ORG}--dangling")
    return "dangling"


def _repo_name_with_control_characters(hub: Path) -> str:
    (hub / f"models--{mf.TEST_ORG}--evil\nwarning: forged").mkdir()
    return "evil"


# corrupt entries that are still models: listed, with one warning about their config
def _config_nested_deep(hub: Path) -> str:
    _snapshot_with_config(hub, "deep-config", "[" * 100_000 + "]" * 100_000)
    return "deep-config"


def _config_object_nested_deep(hub: Path) -> str:
    _snapshot_with_config(hub, "deep-object", '{"architectures": ' + '{"a": ' * 5000 + "1" + "}" * 5001)
    return "deep-object"


def _config_huge(hub: Path) -> str:
    _snapshot_with_config(hub, "huge-config", '{"pad": "' + "x" * (5 * 1024 * 1024) + '"}')
    return "huge-config"


def _config_a_fifo(hub: Path) -> str:
    snap = _snapshot_with_config(hub, "fifo-config", "{}")
    (snap / "config.json").unlink()
    os.mkfifo(snap / "config.json")
    return "fifo-config"


def _config_a_symlink_loop(hub: Path) -> str:
    snap = _snapshot_with_config(hub, "loop-config", "{}")
    (snap / "config.json").unlink()
    os.symlink("config.json", snap / "config.json")
    return "loop-config"


def _config_not_utf8(hub: Path) -> str:
    _snapshot_with_config(hub, "binary-config", b"\xff\xfe{\x00")
    return "binary-config"


UNLISTABLE = [_snapshot_loop, _snapshots_folder_loop, _snapshot_is_a_file, _repo_is_a_file, _repo_is_a_dangling_link,
              _repo_name_with_control_characters]
BAD_CONFIG = [_config_nested_deep, _config_object_nested_deep, _config_huge, _config_a_fifo, _config_a_symlink_loop,
              _config_not_utf8]


@pytest.fixture
def good_hub(tmp_path, hf_cache) -> Path:
    hub = tmp_path / "hub"
    hub.mkdir()
    for model_id in (TINY_ID, TINY_UNTIED_ID):
        folder = "models--" + model_id.replace("/", "--")
        shutil.copytree(hf_cache / folder, hub / folder, symlinks=True)
    return hub


def _settings(hub: Path):
    return load_settings(hf_cache_dir=hub, local_model_dirs=[])


@pytest.mark.parametrize("make", UNLISTABLE, ids=lambda f: f.__name__.strip("_"))
def test_an_unlistable_entry_is_one_warning_and_the_good_models_still_show(good_hub, make):
    name = make(good_hub)
    result = scan_models(_settings(good_hub))
    assert [m.model_id for m in result.models] == [TINY_ID, TINY_UNTIED_ID]
    assert len(result.warnings) == 1 and name in result.warnings[0]
    assert "\n" not in result.warnings[0]  # a folder name cannot forge a line


@pytest.mark.parametrize("make", BAD_CONFIG, ids=lambda f: f.__name__.strip("_"))
def test_an_unreadable_config_is_one_warning_and_the_model_is_listed_without_it(good_hub, make):
    name = make(good_hub)
    result = scan_models(_settings(good_hub))
    by_id = {m.model_id: m for m in result.models}
    assert {TINY_ID, TINY_UNTIED_ID} <= set(by_id) and by_id[TINY_ID].architecture == "LlamaForCausalLM"
    bad = by_id[f"{mf.TEST_ORG}/{name}"]
    assert bad.has_config is False and bad.architecture is None
    assert len(result.warnings) == 1 and name in result.warnings[0] and "config.json" in result.warnings[0]


def test_all_hostile_entries_together_still_list_the_good_models(good_hub):
    done = threading.Event()
    names = [make(good_hub) for make in UNLISTABLE + BAD_CONFIG]
    result: list = []
    worker = threading.Thread(target=lambda: (result.append(scan_models(_settings(good_hub))), done.set()))
    worker.start()
    assert done.wait(30), "the scan hung (a FIFO read?)"
    warnings = result[0].warnings
    assert len(warnings) == len(names)
    for n in names:
        assert sum(n in w for w in warnings) >= 1
    assert TINY_ID in [m.model_id for m in result[0].models]


def test_a_snapshot_loop_beside_a_good_snapshot_uses_the_good_one(good_hub):
    repo = good_hub / ("models--" + TINY_ID.replace("/", "--"))
    good = (repo / "refs" / "main").read_text()
    (repo / "refs" / "main").write_text("d" * 40)
    os.symlink("d" * 40, repo / "snapshots" / ("d" * 40))
    result = scan_models(_settings(good_hub))
    tiny = next(m for m in result.models if m.model_id == TINY_ID)
    assert tiny.revision == good and tiny.architecture == "LlamaForCausalLM"
    assert len(result.warnings) == 1 and "not a readable folder" in result.warnings[0]


def test_resolving_a_corrupt_entry_is_a_load_error_not_an_os_error(good_hub):
    settings = _settings(good_hub)
    for make in (_snapshot_loop, _snapshots_folder_loop, _snapshot_is_a_file, _repo_is_a_file):
        name = make(good_hub)
        with pytest.raises(ModelLoadError, match="corrupt"):
            resolve_model(f"{mf.TEST_ORG}/{name}", settings)
    assert resolve_model(TINY_ID, settings).architecture == "LlamaForCausalLM"


@pytest.mark.parametrize(("typo", "expected"), [
    (f"{mf.TEST_ORG}/tiny-lama", TINY_ID), (f"{mf.TEST_ORG}/tiny-llama-untie", TINY_UNTIED_ID),
    (f"{mf.TEST_ORG}/tny-llama", TINY_ID),
])
def test_an_unknown_id_gets_the_closest_cached_ids(good_hub, typo, expected):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(typo, _settings(good_hub))
    assert f"did you mean {expected}" in info.value.hint
    assert expected in info.value.args_["suggestions"]


def test_an_unrelated_unknown_id_gets_no_suggestion(good_hub):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("someone/else-entirely", _settings(good_hub))
    assert "did you mean" not in info.value.hint and "never downloads" in info.value.hint


def test_a_rescan_notices_a_new_model_and_a_changed_config(good_hub, hf_cache):
    settings = _settings(good_hub)
    assert len(scan_models(settings).models) == 2
    folder = "models--" + TINY_ID.replace("/", "--")
    shutil.copytree(hf_cache / folder, good_hub / (folder + "-copy"), symlinks=True)
    assert len(scan_models(settings).models) == 3
    snap = Path(resolve_model(TINY_UNTIED_ID, settings).path)
    cfg = json.loads((snap / "config.json").read_text())
    (snap / "config.json").unlink()
    cfg["architectures"] = ["MemctlRenamedForCausalLM"]
    (snap / "config.json").write_text(json.dumps(cfg))
    again = {m.model_id: m for m in scan_models(settings).models}
    assert again[TINY_UNTIED_ID].architecture == "MemctlRenamedForCausalLM"


def test_a_local_dir_with_a_looping_child_still_lists_its_models(tmp_path, hf_settings):
    root = tmp_path / "models"
    shutil.copytree(resolve_model(TINY_ID, hf_settings).path, root / "good")
    os.symlink("loop", root / "loop")
    (root / "file-not-dir").write_text("x")
    result = scan_models(load_settings(hf_cache_dir=tmp_path / "none", local_model_dirs=[root]))
    assert [m.model_id for m in result.models] == [str(root / "good")]


def test_memctl_models_lists_the_good_models_beside_corrupt_entries(good_hub):
    for make in UNLISTABLE + BAD_CONFIG:
        make(good_hub)
    env = {**os.environ, **mf.hf_env(good_hub), "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if k != "MEMCTL_STATE_DIR"}
    proc = subprocess.run([sys.executable, "-m", "memctl_cli", "models"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "No models found" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert TINY_ID in proc.stdout
    assert sum(line.startswith("warning:") for line in lines) == len(UNLISTABLE + BAD_CONFIG)
    assert not any(line.startswith("warning: forged") for line in lines)  # the escaped name stays on its line


def test_the_caches_do_not_grow_without_bound(good_hub):
    scan_models(_settings(good_hub))
    assert len(catalog._repo_cache) <= 100_000 and len(catalog._arch_cache) <= 100_000


@pytest.mark.parametrize("field", ["architectures", "model_type"])
def test_a_config_cannot_forge_lines_in_the_listing(good_hub, field):
    value = ["Llama\nwarning: forged\x1b[31m"] if field == "architectures" else "llama\r\nwarning: forged"
    _snapshot_with_config(good_hub, "forger", json.dumps({field: value}))
    result = scan_models(_settings(good_hub))
    forger = next(m for m in result.models if m.model_id == f"{mf.TEST_ORG}/forger")
    assert forger.architecture is not None and "forged" in forger.architecture
    assert not any(ord(c) < 32 for c in forger.architecture)
    assert result.warnings == ()
