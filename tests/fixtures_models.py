"""Session fixtures: tiny random models in temporary Hugging Face caches (built offline).

Nothing here touches os.environ: fixtures return paths and a ``Settings`` pointing at them
(``load_settings(hf_cache_dir=...)``); ``model_factory.hf_env(hub)`` gives the variables
(HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE=1, MEMCTL_HF_CACHE_DIR) for a subprocess.

* ``hf_cache``: hub dir with ``memctl-test/tiny-llama`` (tied embeddings, GQA 4/2, fp32 file),
  ``memctl-test/tiny-llama-untied`` (untied, 1 KV head, explicit head_dim 32, bf16 file) and a
  corrupt entry ``models--memctl-test--broken`` (no snapshots: a catalog warning).
* ``hf_settings``: Settings for ``hf_cache``.
* ``bad_hf_cache`` / ``bad_models``: a separate hub with models that must fail cleanly
  (see ``model_factory.build_bad_cache``) and ``{kind: model_id}``.
* ``big_model``: ``memctl-test/big-llama`` (~62.6 M parameters, 125 MB bf16 file, 250 MB in fp32)
  in its own hub, as a ``model_factory.BuiltModel``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memory_controller.settings import Settings, load_settings
from tests import model_factory as mf

TINY_ID = f"{mf.TEST_ORG}/tiny-llama"
TINY_UNTIED_ID = f"{mf.TEST_ORG}/tiny-llama-untied"
BIG_ID = f"{mf.TEST_ORG}/big-llama"


def _settings(hub: Path) -> Settings:
    return load_settings(hf_cache_dir=hub, local_model_dirs=[])


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hub = tmp_path_factory.mktemp("hf_home") / "hub"
    hub.mkdir()
    mf.build_into_cache(hub, "tiny-llama", mf.TINY)
    mf.build_into_cache(hub, "tiny-llama-untied", mf.TINY_UNTIED, seed=1)
    mf.add_broken_entry(hub, "broken")
    return hub


@pytest.fixture(scope="session")
def hf_settings(hf_cache: Path) -> Settings:
    return _settings(hf_cache)


@pytest.fixture(scope="session")
def bad_hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hub = tmp_path_factory.mktemp("hf_home_bad") / "hub"
    hub.mkdir()
    ids = mf.build_bad_cache(hub)
    (hub.parent / "ids.json").write_text(json.dumps(ids))  # beside the hub: scan_cache_dir sees no stray file
    return hub


@pytest.fixture(scope="session")
def bad_models(bad_hf_cache: Path) -> dict[str, str]:
    return json.loads((bad_hf_cache.parent / "ids.json").read_text())


@pytest.fixture(scope="session")
def bad_settings(bad_hf_cache: Path) -> Settings:
    return _settings(bad_hf_cache)


@pytest.fixture(scope="session")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> mf.BuiltModel:
    hub = tmp_path_factory.mktemp("hf_home_big") / "hub"
    hub.mkdir()
    snap = mf.build_into_cache(hub, "big-llama", mf.BIG, seed=7)
    return mf.BuiltModel(BIG_ID, hub, snap, mf.weight_bytes(snap), _settings(hub))


@pytest.fixture(scope="session")
def chat_hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub with tiny chat models of the three tool-call families and a model without tokenizer files
    (``model_factory.build_chat_cache``); ``{name: model_id}`` in ids.json beside it."""
    hub = tmp_path_factory.mktemp("hf_home_chat") / "hub"
    ids = mf.build_chat_cache(hub)
    (hub.parent / "ids.json").write_text(json.dumps(ids))
    return hub


@pytest.fixture(scope="session")
def chat_models(chat_hf_cache: Path) -> dict[str, str]:
    return json.loads((chat_hf_cache.parent / "ids.json").read_text())


@pytest.fixture(scope="session")
def chat_settings(chat_hf_cache: Path) -> Settings:
    return _settings(chat_hf_cache)
