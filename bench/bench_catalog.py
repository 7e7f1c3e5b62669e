"""Cost of a catalog scan (``scan_models``) with 2,000 cached models vs 10, and of estimating each.

Issue 11 item 12: the dashboard's reruns with 2,000 models took 0.8-1.5 s. The models are built
in the Hugging Face cache layout (blobs, snapshots of symlinks, refs/main) with a config, a small
safetensors file, a tokenizer and a generation config each. Timed: the first scan in a process
(cold: configs read and parsed) and later scans (warm: configs cached by file signature), per model
and as a ratio; for scale, ``huggingface_hub.scan_cache_dir`` on the same cache.
Run: .venv/bin/python bench/bench_catalog.py
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memory_controller import catalog  # noqa: E402
from memory_controller import estimate as est  # noqa: E402
from memory_controller.settings import load_settings  # noqa: E402
from memory_controller.types import Precision, Profile  # noqa: E402

FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def _safetensors(n: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, "__metadata__": {"n": str(n)}})
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(64)


def build_cache(hub: Path, count: int) -> None:
    for i in range(count):
        repo = hub / f"models--bench-org--model-{i:05d}"
        blobs, refs = repo / "blobs", repo / "refs"
        commit = hashlib.sha1(f"{i}".encode()).hexdigest()
        snap = repo / "snapshots" / commit
        for d in (blobs, refs, snap):
            d.mkdir(parents=True)
        (refs / "main").write_text(commit)
        contents = {
            "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                       "hidden_size": 64, "num_hidden_layers": 2, "index": i}).encode(),
            "model.safetensors": _safetensors(i),
            "tokenizer.json": json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}, "i": i}).encode(),
            "generation_config.json": json.dumps({"max_new_tokens": 16, "i": i}).encode(),
        }
        for name, data in contents.items():
            blob = hashlib.sha256(data).hexdigest()
            (blobs / blob).write_bytes(data)
            os.symlink(f"../../blobs/{blob}", snap / name)


def estimate_all_ms(hub: Path) -> float:
    """Warm: estimate every listed model once (what a page that shows a verdict per model pays)."""
    settings = load_settings(hf_cache_dir=hub, local_model_dirs=[])
    models = catalog.scan_models(settings).models
    profile = Profile("transformers", Precision.BF16, 1024, 1, device="cpu")
    for m in models:
        est.estimate(m, profile, settings)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for m in models:
            est.estimate(m, profile, settings)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def scan_ms(hub: Path) -> tuple[float, float, int]:
    settings = load_settings(hf_cache_dir=hub, local_model_dirs=[])
    catalog._arch_cache.clear()
    catalog._repo_cache.clear()
    t0 = time.perf_counter()
    result = catalog.scan_models(settings)
    cold = (time.perf_counter() - t0) * 1000
    warm = []
    for _ in range(7):
        t0 = time.perf_counter()
        catalog.scan_models(settings)
        warm.append((time.perf_counter() - t0) * 1000)
    assert not result.warnings, result.warnings[:3]
    return cold, statistics.median(warm), len(result.models)


def hf_scan_ms(hub: Path) -> float:
    from huggingface_hub import scan_cache_dir

    t0 = time.perf_counter()
    scan_cache_dir(hub)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (10, 2000):
            hub = Path(tmp) / f"hub-{count}"
            hub.mkdir()
            build_cache(hub, count)
            cold, warm, n = scan_ms(hub)
            assert n == count
            rows[count] = (cold, warm, hf_scan_ms(hub), estimate_all_ms(hub))
    print("# bench_catalog: scan_models() over the HF cache layout (4 files per model)")
    for count, (cold, warm, hf, each) in rows.items():
        print(f"models={count:<5} first scan {cold:8.1f} ms ({cold / count:.3f} ms/model), "
              f"rescan {warm:8.1f} ms ({warm / count:.3f} ms/model); huggingface_hub.scan_cache_dir {hf:8.1f} ms; "
              f"estimate every model (warm) {each:8.1f} ms")
    print(f"ratio 2000/10: first scan {rows[2000][0] / rows[10][0]:.0f}x, rescan {rows[2000][1] / rows[10][1]:.0f}x "
          "(the work is per model; the dashboard keeps the result between reruns)")


if __name__ == "__main__":
    main()
