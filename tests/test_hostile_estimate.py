"""Hostile model files: malformed safetensors headers, configs and shard indexes are corrupt data
(CorruptDataError, also a ModelLoadError), never a RecursionError, never negative parameters."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from memory_controller import estimate as est
from memory_controller.errors import CorruptDataError, ModelLoadError
from memory_controller.settings import load_settings
from memory_controller.types import CachedModel, Precision, Profile
from tests import model_factory as mf

ROOT = Path(__file__).resolve().parent.parent
SMALL = mf.LlamaShape(hidden_size=32, intermediate_size=64, layers=1, heads=2, kv_heads=1, vocab_size=64)


def _model(path: Path) -> CachedModel:
    return CachedModel(str(path), None, 0, True, True, "LlamaForCausalLM", str(path), "local_dir")


def _profile() -> Profile:
    return Profile("transformers", Precision.BF16, 1024, 1, device="cpu")


def _write_safetensors(path: Path, header: str | bytes, data_bytes: int = 64, header_len: int | None = None) -> None:
    raw = header.encode() if isinstance(header, str) else header
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        fh.write(raw)
        fh.write(b"\x00" * data_bytes)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return mf.write_sparse_llama(tmp_path / "m", SMALL)


def _entry(dtype="F32", shape=(4, 4), offsets=(0, 64)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


HOSTILE_ENTRIES = {
    "negative dimension": _entry(shape=(-4, 4), offsets=(64, 0)),
    "negative dimension, zero bytes": _entry(shape=(-1, 0), offsets=(0, 0)),
    "fractional dimension": _entry(shape=[2.5, 4], offsets=(0, 40)),
    "boolean dimension": _entry(shape=[True, 16], offsets=(0, 64)),
    "text dimension": _entry(shape=["4", 4]),
    "absurd dimension": _entry(shape=(1 << 60, 1 << 60)),
    "rank 100": _entry(shape=tuple([1] * 100), offsets=(0, 4)),
    "shape not a list": _entry(shape={"a": 4}),
    "shape a string": _entry(shape="4x4"),
    "unknown dtype": _entry(dtype="Q4_K"),
    "dtype a number": _entry(dtype=32),
    "offsets reversed": _entry(offsets=(64, 0)),
    "offsets negative": _entry(offsets=(-64, 0)),
    "offsets of three": _entry(offsets=(0, 32, 64)),
    "offsets not matching the shape": _entry(offsets=(0, 60)),
    "offsets text": _entry(offsets=("0", "64")),
    "entry a list": [1, 2, 3],
    "entry a string": "tensor",
}


@pytest.mark.parametrize("kind", list(HOSTILE_ENTRIES))
def test_a_malformed_tensor_entry_makes_the_file_corrupt(model_dir, kind):
    _write_safetensors(model_dir / "model.safetensors", json.dumps({"w": HOSTILE_ENTRIES[kind]}))
    est.clear_spec_cache()
    with pytest.raises(CorruptDataError) as info:
        est.estimate(_model(model_dir), _profile(), load_settings())
    assert isinstance(info.value, ModelLoadError)  # callers that catch load errors still do
    assert "model.safetensors" in info.value.message and info.value.hint


HOSTILE_HEADERS = {
    "a list": "[1, 2]",
    "a string": '"header"',
    "nested thousands deep": '{"w": ' + "[" * 10_000 + "]" * 10_000 + "}",
    "an object nested deep": '{"w": ' + '{"a": ' * 5000 + "1" + "}" * 5001,
    "NaN in offsets": '{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, NaN]}}',
    "1e400 in shape": '{"w": {"dtype": "F32", "shape": [1e400, 4], "data_offsets": [0, 64]}}',
    "not UTF-8": b'{"w": "\xff\xfe"}',
    "not JSON": "{this is not json",
}


@pytest.mark.parametrize("kind", list(HOSTILE_HEADERS))
def test_a_malformed_header_makes_the_file_corrupt_never_a_recursion_error(model_dir, kind):
    _write_safetensors(model_dir / "model.safetensors", HOSTILE_HEADERS[kind])
    est.clear_spec_cache()
    with pytest.raises(CorruptDataError):
        est.read_model_spec(model_dir)
    with pytest.raises(CorruptDataError):  # the plan's side: the largest context that fits
        est.max_context_that_fits(_model(model_dir), 1 << 40, _profile(), load_settings())


@pytest.mark.parametrize(("header_len", "data_bytes"), [(1 << 40, 64), (0, 0), (200 * 1024 * 1024, 64)])
def test_a_header_length_that_does_not_fit_the_file_is_corrupt(model_dir, header_len, data_bytes):
    _write_safetensors(model_dir / "model.safetensors", "{}", data_bytes, header_len=header_len)
    est.clear_spec_cache()
    with pytest.raises(CorruptDataError):
        est.read_model_spec(model_dir)


def test_a_tensor_past_the_end_of_the_file_is_truncated(model_dir):
    _write_safetensors(model_dir / "model.safetensors", json.dumps({"w": _entry(offsets=(64, 128))}), data_bytes=64)
    est.clear_spec_cache()
    with pytest.raises(ModelLoadError, match="truncated"):
        est.read_model_spec(model_dir)


def test_a_valid_hand_written_header_still_counts_its_parameters(model_dir):
    header = {"model.embed_tokens.weight": _entry(shape=(4, 4)), "__metadata__": {"format": "pt"},
              "model.norm.weight": _entry(dtype="BF16", shape=(0,), offsets=(64, 64))}
    _write_safetensors(model_dir / "model.safetensors", json.dumps(header))
    est.clear_spec_cache()
    spec = est.read_model_spec(model_dir)
    assert sum(t.numel for t in spec.tensors) == 16
    assert est.estimate(_model(model_dir), _profile(), load_settings()).parameters == 16


HOSTILE_CONFIGS = {
    "nested thousands deep": "[" * 50_000 + "]" * 50_000,
    "a list": "[1, 2, 3]",
    "absurd layer count": json.dumps({"num_hidden_layers": 10**30, "hidden_size": 64, "num_attention_heads": 4}),
    "NaN": '{"hidden_size": NaN}',
    "over the size limit": '{"pad": "' + "x" * (17 * 1024 * 1024) + '"}',
}


@pytest.mark.parametrize("kind", list(HOSTILE_CONFIGS))
def test_a_hostile_config_is_corrupt_data(model_dir, kind):
    (model_dir / "config.json").write_text(HOSTILE_CONFIGS[kind])
    est.clear_spec_cache()
    with pytest.raises(CorruptDataError) as info:
        est.estimate(_model(model_dir), _profile(), load_settings())
    assert "config.json" in info.value.message


def test_a_config_that_is_a_fifo_does_not_hang(model_dir):
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")
    est.clear_spec_cache()
    with pytest.raises(ModelLoadError):
        est.read_model_spec(model_dir)


@pytest.mark.parametrize(("weight_map", "error"), [
    ([1, 2], CorruptDataError), ({"w": 5}, CorruptDataError), ({"w": "../../../etc/passwd"}, ModelLoadError),
    ({"w": "/etc/passwd"}, ModelLoadError),
])
def test_a_hostile_shard_index_is_refused(model_dir, weight_map, error):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    est.clear_spec_cache()
    with pytest.raises(error):
        est.read_model_spec(model_dir)


def test_a_looping_model_directory_is_a_load_error(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(ModelLoadError):
        est.read_model_spec(tmp_path / "loop")


def test_memctl_estimate_of_a_negative_shape_fails_cleanly(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    src = mf.write_sparse_llama(tmp_path / "src", SMALL)
    _write_safetensors(src / "model.safetensors", json.dumps({"w": HOSTILE_ENTRIES["negative dimension"]}))
    mf.add_to_hf_cache(src, hub, f"{mf.TEST_ORG}/bad-shape")
    env = {**os.environ, **mf.hf_env(hub), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "memctl_cli", "estimate", f"{mf.TEST_ORG}/bad-shape",
                           "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "parameters" not in proc.stdout and "negative" in proc.stderr
    assert "error:" in proc.stderr and "hint:" in proc.stderr
