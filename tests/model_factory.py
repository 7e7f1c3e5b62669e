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


# --------------------------------------------------------------------------- chat models (three tool-call families)
# Templates modelled on the real ones (Qwen2.5-Instruct, Llama-3.1-Instruct, Mistral-7B-Instruct-v0.3),
# kept to what a tiny model needs: tools in the prompt, assistant tool calls, tool results.

QWEN_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" }}
{{- system_message }}{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\n\n' }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}{{- raise_exception("This model only supports single tool-calls at once!") }}{%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}{{- message.content }}{{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

MISTRAL_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- '{"type": "function", "function": ' + tool.function|tojson + '}' }}
                {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""


@dataclass(frozen=True)
class ChatFamily:
    """A tiny chat model's architecture, special tokens and template."""

    arch: str  # "qwen2" | "llama" | "mistral"
    template: str
    specials: tuple[str, ...]  # special tokens; the first four are unk, bos, eos, pad
    extra_tokens: tuple[str, ...] = ()  # added (not special) tokens, e.g. <tool_call>


CHAT_FAMILIES = {
    "qwen": ChatFamily("qwen2", QWEN_TEMPLATE, ("<unk>", "<|endoftext|>", "<|im_end|>", "<|pad|>", "<|im_start|>"),
                       ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")),
    "llama3": ChatFamily("llama", LLAMA3_TEMPLATE, ("<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|pad|>",
                                                    "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>")),
    "mistral": ChatFamily("mistral", MISTRAL_TEMPLATE, ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]",
                                                        "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                                        "[TOOL_RESULTS]", "[/TOOL_RESULTS]")),
}
_CHAT_CORPUS = _CORPUS + [
    "Hello! How can I help you today? Read the file and list the functions.",
    '{"name": "read_file", "arguments": {"path": "src/main.py"}}',
    "You are a helpful assistant. The user asks about code.",
]


def chat_tokenizer(family: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer with ``family``'s special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = CHAT_FAMILIES[family]
    tok = Tokenizer(models.BPE(unk_token=fam.specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fam.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CHAT_CORPUS * 20, trainer)
    unk, bos, eos, pad = fam.specials[:4]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                                   additional_special_tokens=list(fam.specials[4:]))
    if fam.extra_tokens:
        fast.add_tokens(list(fam.extra_tokens))
    fast.chat_template = fam.template
    return fast


def build_chat_model(out_dir: Path, family: str, *, seed: int = 0, max_position_embeddings: int = 2048) -> Path:
    """A tiny random-weight chat model of ``family`` ("qwen", "llama3", "mistral") with its template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = CHAT_FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = chat_tokenizer(family)
    ids = tok.convert_tokens_to_ids(list(fam.specials[1:4]))
    cfg = AutoConfig.for_model(fam.arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                               max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                               bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = ids[1]
    model.generation_config.pad_token_id = ids[2]
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_chat_cache(hub_dir: Path) -> dict[str, str]:
    """``{name: model_id}``: ``qwen``, ``llama3``, ``mistral`` (chat models with tool templates) and
    ``no_tokenizer`` (a model whose snapshot has no tokenizer files)."""
    hub_dir.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    for i, family in enumerate(CHAT_FAMILIES):
        with tempfile.TemporaryDirectory(dir=hub_dir.parent) as tmp:
            build_chat_model(Path(tmp), family, seed=10 + i)
            add_to_hf_cache(Path(tmp), hub_dir, f"{TEST_ORG}/tiny-{family}-chat")
        ids[family] = f"{TEST_ORG}/tiny-{family}-chat"
    build_into_cache(hub_dir, "no-tokenizer", TINY, seed=20, tokenizer=False)
    ids["no_tokenizer"] = f"{TEST_ORG}/no-tokenizer"
    return ids


def sparse_into_cache(hub_dir: Path, name: str, shape: LlamaShape, *, config: dict[str, Any] | None = None) -> Path:
    """A header-only model of any size (``write_sparse_llama``: exact safetensors header, sparse data) placed
    in ``hub_dir`` as ``memctl-test/<name>``, its config updated with ``config``; no file is hashed (a 7 B
    layout costs nothing to create). Returns the snapshot dir."""
    repo_id = f"{TEST_ORG}/{name}"
    repo_dir = Path(hub_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    blobs, snap = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=blobs) as tmp:
        src = write_sparse_llama(Path(tmp), shape)
        if config:
            cfg = json.loads((src / "config.json").read_text())
            cfg.update(config)
            (src / "config.json").write_text(json.dumps(cfg, indent=2))
        for p in sorted(src.iterdir()):
            blob = blobs / hashlib.sha256(f"{repo_id}/{p.name}".encode()).hexdigest()
            os.replace(p, blob)
            (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


TOOL_CALL_TEXT = '<tool_call>\n{"name": "read_file", "arguments": {"path": "README.md"}}\n</tool_call>'
TOOL_ANSWER_TEXT = "The file says hello."


def build_tool_model(out_dir: Path, *, seed: int = 50, max_position_embeddings: int = 32768,
                     call_text: str = TOOL_CALL_TEXT, answer_text: str = TOOL_ANSWER_TEXT) -> Path:
    """A tiny Qwen-style chat model (real weights, real template) whose generation is deterministic: its
    ``generation_config.json`` carries a ``sequence_bias`` (a transformers logits processor) that, right after
    ``<|im_start|>assistant\\n``, writes ``call_text`` (a ``<tool_call>``) then ``<|im_end|>`` — or, when the
    turn before is a tool result (``</tool_response><|im_end|>\\n<|im_start|>assistant\\n``), ``answer_text``.
    Each token of a chain is biased by the whole chain so far, so no token of one chain leaks into the other.
    """
    import json as _json

    build_chat_model(out_dir, "qwen", seed=seed, max_position_embeddings=max_position_embeddings)
    tok = chat_tokenizer("qwen")

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    end = tok.convert_tokens_to_ids("<|im_end|>")
    anchor = ids("<|im_start|>assistant\n")
    after_tool = ids("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    bias: list[list[Any]] = []
    for prefix, text, weight in ((anchor, call_text, 100.0), (after_tool, answer_text, 200.0)):
        chain = ids(text) + [end]
        for k in range(len(chain)):
            bias.append([prefix + chain[:k + 1], weight])
    cfg_path = Path(out_dir) / "generation_config.json"
    cfg = _json.loads(cfg_path.read_text())
    cfg["sequence_bias"] = bias
    cfg_path.write_text(_json.dumps(cfg))
    return Path(out_dir)
