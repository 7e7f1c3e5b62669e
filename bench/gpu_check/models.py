"""The check's models: random weights, real architectures, placed in a Hugging Face cache offline.

``QWEN2_1_5B`` has Qwen2.5-1.5B's shape (GQA 12/2 heads, q/k/v biases, tied embeddings, 151,936-token
vocabulary); ``LLAMA_3B`` has Llama-3.2-3B's shape with untied embeddings (~3.6 B parameters).
``*_SMALL`` are the same architectures at ~0.1 B parameters for the CPU-side rows.

Each model is built in a child process (``python -m bench.gpu_check.models``) so that the process that
measures starts with no CUDA context and no allocator state of its own; the child builds on the GPU
when there is one (random init of 3.6 B parameters on a CPU takes minutes), saves bf16 safetensors
and a small trained tokenizer, and exits. Files are laid out as the hub lays them out
(``tests/model_factory.add_to_hf_cache``), so the catalog and ``from_pretrained`` see a download.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ORG = "memctl-gpucheck"
# A ChatML template (Qwen's shape), so the chat endpoint can render messages for the random models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ArchShape:
    name: str  # repo name under ORG
    arch: str  # "qwen2" | "llama"
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    vocab_size: int
    tie: bool
    max_position_embeddings: int

    @property
    def model_id(self) -> str:
        return f"{ORG}/{self.name}"


QWEN2_1_5B = ArchShape("qwen2-1.5b-random", "qwen2", 1536, 8960, 28, 12, 2, 151936, True, 32768)
LLAMA_3B = ArchShape("llama-3b-untied-random", "llama", 3072, 8192, 28, 24, 8, 128256, False, 131072)
QWEN2_SMALL = ArchShape("qwen2-small-random", "qwen2", 768, 2048, 12, 12, 2, 32000, True, 32768)
LLAMA_SMALL = ArchShape("llama-small-untied-random", "llama", 768, 2048, 8, 12, 4, 32000, False, 131072)


def _config(shape: ArchShape):
    common = dict(
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
    )
    if shape.arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def build(shape: ArchShape, hub_dir: Path, device: str) -> Path:
    """Build ``shape`` with random bf16 weights on ``device`` and add it to ``hub_dir``; return the snapshot."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.model_factory import add_to_hf_cache, train_tokenizer

    cfg = _config(shape)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=hub_dir.parent) as tmp, torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.eval()
        model.save_pretrained(tmp)
        del model
        tok = train_tokenizer()
        tok.chat_template = CHAT_TEMPLATE  # the server's chat endpoint renders messages with it
        tok.save_pretrained(tmp)
        return add_to_hf_cache(Path(tmp), hub_dir, shape.model_id)


def build_in_child(shapes: list[ArchShape], hub_dir: Path, device: str, timeout_s: float = 1800) -> None:
    """Build ``shapes`` in one child process (no CUDA state left in this one). Raises RuntimeError on failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "bench.gpu_check.models", "--hub", str(hub_dir), "--device", device,
           "--shapes", json.dumps([asdict(s) for s in shapes])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"building the check's models failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="build the GPU check's random-weight models into an HF cache")
    p.add_argument("--hub", required=True, type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", required=True, help="JSON list of ArchShape fields")
    args = p.parse_args(argv)
    args.hub.mkdir(parents=True, exist_ok=True)
    for fields in json.loads(args.shapes):
        shape = ArchShape(**fields)
        snap = build(shape, args.hub, args.device)
        print(f"built {shape.model_id} in {snap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
