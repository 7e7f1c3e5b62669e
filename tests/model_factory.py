"""Build tiny random-weight Llama-style models offline, in the Hugging Face cache layout.

No hub is reachable (FACTS.md): models are made with ``LlamaConfig`` + ``save_pretrained``, a BPE
tokenizer is trained with ``tokenizers`` and wrapped in ``PreTrainedTokenizerFast``, and the files
are placed as the hub would place them: ``<hub>/models--ORG--NAME/blobs/<hash>``, symlinks from
``snapshots/<40-hex>/`` and ``refs/main`` holding that hash. ``scan_cache_dir()`` and
``from_pretrained`` (offline) then treat them as downloaded models.

Used by ``tests/fixtures_models.py`` (session fixtures) and by ``bench/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEST_ORG = "memctl-test"


@dataclass(frozen=True)
class LlamaShape:
    """A Llama config in a few numbers. ``head_dim=None`` means hidden / heads."""

    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 1000
    head_dim: int | None = None
    tie: bool = True
    dtype: str = "float32"  # stored dtype: float32 | bfloat16 | float16
    max_position_embeddings: int = 2048


TINY = LlamaShape()  # tied embeddings, GQA 4 query heads / 2 KV heads, fp32 file
TINY_UNTIED = LlamaShape(kv_heads=1, head_dim=32, tie=False, dtype="bfloat16")  # explicit head_dim
BIG = LlamaShape(hidden_size=768, intermediate_size=2048, layers=8, heads=12, kv_heads=4, vocab_size=16000,
                 dtype="bfloat16")  # ~62.6 M parameters, ~125 MB file, ~250 MB loaded in fp32
BENCH_05B = LlamaShape(hidden_size=1024, intermediate_size=2816, layers=38, heads=16, kv_heads=8,
                       vocab_size=32000, dtype="bfloat16", max_position_embeddings=4096)  # ~0.48 B


@dataclass(frozen=True)
class BuiltModel:
    """A model placed in a temporary HF cache, with the settings that point at that cache."""

    model_id: str
    hub_dir: Path  # HF_HUB_CACHE (= HF_HOME/hub)
    snapshot_dir: Path
    file_bytes: int  # size of the weight files
    settings: Any  # memory_controller.settings.Settings with hf_cache_dir=hub_dir

    @property
    def hf_home(self) -> Path:
        return self.hub_dir.parent

    def env(self) -> dict[str, str]:
        return hf_env(self.hub_dir)


def hf_env(hub_dir: Path) -> dict[str, str]:
    """Environment for a subprocess that must see only ``hub_dir`` and never go online."""
    return {
        "HF_HOME": str(Path(hub_dir).parent),
        "HF_HUB_CACHE": str(hub_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MEMCTL_HF_CACHE_DIR": str(hub_dir),
    }


_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.getcwd())\n",
    "for i in range(10):\n    print(i * i)\n",
]
_tokenizer_cache: dict[int, Any] = {}


def train_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in ~30 ms, as a ``PreTrainedTokenizerFast``.

    Special tokens: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3 (matching the config's ids).
    """
    if vocab_size in _tokenizer_cache:
        return _tokenizer_cache[vocab_size]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    _tokenizer_cache[vocab_size] = fast
    return fast


def build_llama(out_dir: Path, shape: LlamaShape = TINY, *, seed: int = 0, tokenizer: bool = True,
                weights_format: str = "safetensors") -> Path:
    """Save a random-weight ``LlamaForCausalLM`` of ``shape`` (and a tokenizer) into ``out_dir``.

    ``weights_format="bin"`` writes ``pytorch_model.bin`` (torch.save) instead of safetensors.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if shape.head_dim is not None:
        kwargs["head_dim"] = shape.head_dim
    cfg = LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **kwargs,
    )
    dtype = getattr(torch, shape.dtype)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    if weights_format == "bin":
        model.config.save_pretrained(out_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if shape.tie:
            state.pop("lm_head.weight", None)
        torch.save(state, out_dir / "pytorch_model.bin")
    else:
        model.save_pretrained(out_dir)
    del model
    if tokenizer:
        train_tokenizer().save_pretrained(out_dir)
    return out_dir


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def add_to_hf_cache(src_dir: Path, hub_dir: Path, repo_id: str, *, move: bool = True) -> Path:
    """Place the files of ``src_dir`` in ``hub_dir`` as the hub would; return the snapshot dir.

    Blobs are named by content hash, the snapshot holds relative symlinks to them, and
    ``refs/main`` names the snapshot's (deterministic) 40-hex commit hash.
    """
    src_dir, hub_dir = Path(src_dir), Path(hub_dir)
    repo_dir = hub_dir / ("models--" + repo_id.replace("/", "--"))
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src_dir.rglob("*") if p.is_file())
    hashes = {p: _file_hash(p) for p in files}
    commit = hashlib.sha1((repo_id + "".join(hashes[p] for p in files)).encode()).hexdigest()
    snap = repo_dir / "snapshots" / commit
    for p in files:
        rel = p.relative_to(src_dir)
        blob = blobs / hashes[p]
        if not blob.exists():
            (shutil.move if move else shutil.copy2)(str(p), str(blob))
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def build_into_cache(hub_dir: Path, name: str, shape: LlamaShape = TINY, **kwargs: Any) -> Path:
    """``build_llama`` into a scratch dir, then ``add_to_hf_cache`` as ``memctl-test/<name>``."""
    with tempfile.TemporaryDirectory(dir=hub_dir.parent) as tmp:
        build_llama(Path(tmp), shape, **kwargs)
        return add_to_hf_cache(Path(tmp), hub_dir, f"{TEST_ORG}/{name}")


def weight_bytes(snapshot_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(snapshot_dir).iterdir()
               if p.name.endswith((".safetensors", ".bin")))


def add_broken_entry(hub_dir: Path, name: str = "broken") -> Path:
    """A repo folder with refs but no snapshots: ``scan_cache_dir`` reports it as corrupt."""
    repo_dir = hub_dir / f"models--{TEST_ORG}--{name}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text("0" * 40)
    return repo_dir


def _writable(snapshot: Path, name: str) -> Path:
    """Replace the snapshot symlink ``name`` by a private copy we may damage."""
    link = snapshot / name
    data = link.read_bytes()
    link.unlink()
    link.write_bytes(data)
    return link


def build_bad_cache(hub_dir: Path) -> dict[str, str]:
    """Models that must fail cleanly; returns ``{kind: model_id}``.

    ``no-weights`` (config, no weight file), ``truncated`` (safetensors cut short),
    ``corrupt-header`` (garbage where the header should be), ``unknown-arch`` (model_type no
    Transformers knows), ``bad-config`` (config.json is not JSON), ``bin-only`` (pytorch_model.bin,
    no safetensors: loads, and the estimator falls back to file sizes).
    """
    hub_dir.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}

    snap = build_into_cache(hub_dir, "no-weights", TINY)
    (snap / "model.safetensors").unlink()
    ids["no_weights"] = f"{TEST_ORG}/no-weights"

    snap = build_into_cache(hub_dir, "truncated", TINY, seed=1)
    f = _writable(snap, "model.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    ids["truncated"] = f"{TEST_ORG}/truncated"

    snap = build_into_cache(hub_dir, "corrupt-header", TINY, seed=2)
    f = _writable(snap, "model.safetensors")
    size = f.stat().st_size
    f.write_bytes((1 << 40).to_bytes(8, "little") + b"\x00garbage" * ((size - 8) // 8))
    ids["corrupt_header"] = f"{TEST_ORG}/corrupt-header"

    snap = build_into_cache(hub_dir, "unknown-arch", TINY, seed=3)
    f = _writable(snap, "config.json")
    cfg = json.loads(f.read_text())
    cfg["model_type"] = "memctl-unknown"
    cfg["architectures"] = ["MemctlUnknownForCausalLM"]
    f.write_text(json.dumps(cfg))
    ids["unknown_arch"] = f"{TEST_ORG}/unknown-arch"

    snap = build_into_cache(hub_dir, "bad-config", TINY, seed=4)
    f = _writable(snap, "config.json")
    f.write_text('{"model_type": "llama", ')
    ids["bad_config"] = f"{TEST_ORG}/bad-config"

    build_into_cache(hub_dir, "bin-only", TINY, seed=5, weights_format="bin")
    ids["bin_only"] = f"{TEST_ORG}/bin-only"
    return ids


def llama_tensor_shapes(shape: LlamaShape, *, store_tied_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes ``LlamaForCausalLM.save_pretrained`` writes for ``shape``."""
    hd = shape.head_dim or shape.hidden_size // shape.heads
    h, i = shape.hidden_size, shape.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (shape.heads * hd, h)
        out[p + "self_attn.k_proj.weight"] = (shape.kv_heads * hd, h)
        out[p + "self_attn.v_proj.weight"] = (shape.kv_heads * hd, h)
        out[p + "self_attn.o_proj.weight"] = (h, shape.heads * hd)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
    out["model.norm.weight"] = (h,)
    if not shape.tie or store_tied_head:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def llama_config_dict(shape: LlamaShape) -> dict[str, Any]:
    """A ``config.json`` for ``shape`` written by hand (no transformers import)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim or shape.hidden_size // shape.heads,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.tie,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "dtype": shape.dtype,
    }


def write_sparse_llama(out_dir: Path, shape: LlamaShape, *, store_tied_head: bool = False) -> Path:
    """A header-complete model whose weight bytes are a sparse hole: for estimator tests and timing.

    The safetensors header is exact; the data region is allocated with ``truncate`` (no disk used),
    so a 0.5 B-parameter layout costs nothing to create. Not loadable as a real model (zeros).
    """
    import struct

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st_dtype, bpe = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}[shape.dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in llama_tensor_shapes(shape, store_tied_head=store_tied_head).items():
        n = 1
        for d in dims:
            n *= d
        header[name] = {"dtype": st_dtype, "shape": list(dims), "data_offsets": [offset, offset + n * bpe]}
        offset += n * bpe
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out_dir / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    (out_dir / "config.json").write_text(json.dumps(llama_config_dict(shape), indent=2))
    return out_dir
