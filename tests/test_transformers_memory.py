"""Host memory of in-process models, measured: one accounting for private and memory-mapped weights.

A bf16 load of a bf16 file memory-maps the weights: those pages are page cache (the kernel may drop
them and read them again), so they are neither memory a plan may promise twice nor memory a stop gives
back. The deployment's ``host`` bytes are private memory only, the ReleaseReport measures the same
quantity (RssAnon), and this process's own private memory moves by that much — checked here on real loads.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends.transformers import TransformersBackend
from backends.transformers.memory import process_private_bytes, process_resident_bytes
from memory_controller.catalog import resolve_model
from memory_controller.types import Outcome, Precision, Profile
from memory_controller.units import MIB
from tests.fixtures_models import BIG_ID

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
# The load/stop cycle is measured in this process's own private memory (the kernel's per-mapping sum of
# anonymous pages, /proc/self/smaps_rollup "Anonymous"; RssAnon of /proc/self/status where that file is
# missing), not in the host's or the cgroup's available memory: on the shared 2-core test machine those
# move by 100-450 MB within a second with other jobs' work, which says nothing about this backend. A
# systematic error (e.g. counting the 125 MB mapped file as private memory, or a stop that keeps the
# weights) fails every cycle; allocator and collector noise is absorbed by up to ATTEMPTS cycles, one of
# which must agree. Each comparison allows max(40 MiB, 10 %).
AVAILABLE_TOLERANCE_BYTES = 40 * MIB
ATTEMPTS = 5


def _profile(precision: Precision = Precision.BF16, device: str = "cpu") -> Profile:
    return Profile("transformers", precision, 256, 1, device=device)


def _own_private_bytes() -> int:
    """Anonymous (private) resident bytes of this process, summed over its mappings by the kernel."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process_private_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP32])
def test_footprint_freed_bytes_and_private_memory_agree(big_model, precision):
    """bf16: the file is mapped, host bytes ~0; fp32: a private copy, host bytes = 2 x the file."""
    backend = TransformersBackend(big_model.settings)
    model = resolve_model(BIG_ID, big_model.settings)
    profile = _profile(precision)
    backend.start(model, profile, None)  # one-time private overhead (kernels, thread pools) measured apart
    backend.stop(BIG_ID)
    results = []
    for _ in range(ATTEMPTS):
        own0 = _own_private_bytes()
        dep = backend.start(model, profile, None)
        own1 = _own_private_bytes()
        report = backend.stop(BIG_ID)
        own2 = _own_private_bytes()
        taken, given_back = own1 - own0, own1 - own2
        tol = max(AVAILABLE_TOLERANCE_BYTES, int(0.1 * dep.footprint_bytes))
        agree = (abs(taken - dep.footprint_bytes) <= tol and abs(given_back - report.freed_bytes) <= tol
                 and abs(report.freed_bytes - dep.footprint_bytes) <= tol)
        results.append({"footprint": dep.footprint_bytes, "mapped": dep.detail["mapped_bytes"],
                        "taken": taken, "given_back": given_back, "freed": report.freed_bytes})
        assert report.measure == "rss_anon" and report.verdict is Outcome.SUCCESS
        if precision is Precision.BF16:
            assert dep.detail["mapped_bytes"] >= 0.9 * dep.detail["tensor_bytes"] >= 0.9 * 120 * MB
            assert dep.footprint_bytes < AVAILABLE_TOLERANCE_BYTES  # page cache is not host memory
        else:
            assert dep.detail["mapped_bytes"] == 0 and dep.footprint_bytes >= 240 * MB
        if agree:
            break
    assert agree, results


@pytest.mark.slow
def test_stop_gives_private_memory_back_on_a_100mb_model(big_model):
    backend = TransformersBackend(big_model.settings)
    model = resolve_model(BIG_ID, big_model.settings)
    profile = _profile(Precision.FP32)  # bf16 file -> fp32 copies: every byte is private memory
    start = process_private_bytes()
    backend.start(model, profile, None)
    backend.stop(BIG_ID)
    first_load_overhead = process_private_bytes() - start  # imports, kernels, thread pools: measured apart

    before = process_private_bytes()
    dep = backend.start(model, profile, None)
    during = process_private_bytes()
    report = backend.stop(BIG_ID)
    after = process_private_bytes()

    model_bytes = dep.footprint_bytes
    tolerance = max(50 * MB, 0.05 * model_bytes)
    assert model_bytes >= 100 * MB
    assert during - before >= 0.5 * model_bytes  # the weights really were private memory
    assert after - before <= tolerance, (after - before, first_load_overhead)
    assert report.measure == "rss_anon" and report.verdict is Outcome.SUCCESS
    assert report.expected_bytes == model_bytes and report.freed_bytes >= model_bytes - tolerance
    assert "came back" in report.message.text


@pytest.mark.slow
def test_stop_of_a_memory_mapped_model_drops_the_mapped_pages_and_counts_them_apart(big_model):
    backend = TransformersBackend(big_model.settings)
    model = resolve_model(BIG_ID, big_model.settings)
    anon0, file0 = process_resident_bytes()
    dep = backend.start(model, _profile(Precision.BF16), None)  # same dtype as the file: weights stay mapped
    anon1, file1 = process_resident_bytes()
    mapped = dep.detail["mapped_bytes"]
    assert mapped >= 0.9 * dep.detail["tensor_bytes"]
    assert file1 - file0 >= 0.9 * mapped  # touched during warm-up: resident now
    assert anon1 - anon0 < 0.5 * mapped
    assert dep.footprint_bytes < 0.1 * mapped  # the host key holds private memory only
    report = backend.stop(BIG_ID)
    anon2, file2 = process_resident_bytes()
    assert report.measure == "rss_anon" and report.verdict is Outcome.SUCCESS
    assert report.expected_bytes == dep.footprint_bytes and report.message.args["mapped_bytes"] == mapped
    assert file1 - file2 >= 0.9 * mapped  # the mapping is gone


@pytest.mark.slow
def test_out_of_memory_during_load_frees_partial_state_and_says_needed_vs_free(big_model):
    """A real allocation failure: the load runs under RLIMIT_DATA in a child process."""
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import torch, transformers  # imported before the limit: only the load itself is starved
from transformers import AutoConfig, AutoModelForCausalLM
from backends.transformers import TransformersBackend
from backends.transformers.memory import process_private_bytes
from memory_controller.catalog import resolve_model
from memory_controller.errors import InsufficientMemoryError
from memory_controller.settings import load_settings
from memory_controller.types import Precision, Profile
s = load_settings(hf_cache_dir=Path({str(big_model.hub_dir)!r}))
be = TransformersBackend(s)
m = resolve_model({BIG_ID!r}, s)
profile = Profile("transformers", Precision.FP32, 256, 1, device="cpu")
be.start(m, profile, None)  # the first load's one-time overhead (imports, thread pools) is measured apart
be.stop(m.model_id)
before = process_private_bytes()
data = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData")][0]
resource.setrlimit(resource.RLIMIT_DATA, (data + 100 * 2**20, resource.RLIM_INFINITY))
out = {{}}
try:
    be.start(m, profile, None)
    out["error"] = None
except InsufficientMemoryError as exc:
    out.update(error=type(exc).__name__, message=exc.message, needed=exc.needed_bytes, free=exc.free_bytes,
               context=exc.__context__ is not None)
finally:
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
out["loaded"] = len(be.deployments())
out["held"] = process_private_bytes() - before
print(json.dumps(out))
"""
    env = {**os.environ, **big_model.env()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] == "InsufficientMemoryError", out
    assert "needs about" in out["message"] and "was free" in out["message"]
    assert out["needed"] >= 250 * MB and out["free"] is not None and out["free"] < out["needed"]
    assert out["context"] is False  # raised outside the except block: no traceback keeps the partial model
    assert out["loaded"] == 0
    assert out["held"] < 50 * MB, out




@pytest.mark.slow
@pytest.mark.parametrize("precision", [Precision.INT8, Precision.NF4])
def test_a_quantised_cpu_load_holds_its_estimate_not_the_whole_mapped_file(big_model, precision):
    """bitsandbytes leaves embeddings, norms and lm_head as views into the mapped 16-bit file, which kept
    the whole file mapped and resident (int8 +73-123 % over the estimate); an nf4 verify pass then left
    its temporaries in the heap (+24-42 %). Once loaded and verified, the process holds the estimate."""
    pytest.importorskip("bitsandbytes")
    from backends.transformers.memory import malloc_trim, mapped_ranges
    from memory_controller.estimate import estimate

    backend = TransformersBackend(big_model.settings)
    model = resolve_model(BIG_ID, big_model.settings)
    profile = _profile(precision)
    backend.verify(backend.start(model, profile, None))  # one-time overhead (kernels, thread pools) apart
    backend.stop(BIG_ID)
    weights = estimate(model, profile, big_model.settings).weights_bytes
    gc.collect()  # garbage and freed pages of earlier tests must not be reused and counted as nothing here
    malloc_trim()
    anon0, file0 = process_resident_bytes()
    dep = backend.start(model, profile, None)
    backend.verify(dep)  # as apply() does after the load
    anon1, file1 = process_resident_bytes()
    weight_files = sorted(Path(model.path).glob("*.safetensors"))
    try:
        assert weight_files and mapped_ranges(weight_files) == []  # the 16-bit file is no longer mapped
        assert dep.detail["mapped_bytes"] == 0 and dep.footprint_bytes == dep.detail["tensor_bytes"]
        assert abs(dep.footprint_bytes - weights) <= 0.01 * weights  # the backend's count = the estimate
        # An upper bound only: inside a pytest process a load reuses pages that earlier loads left resident
        # but free (measured here: nf4 after int8 took 50 % of the estimate; 0-2 % off in a fresh process,
        # which bench/gpu_check's CPU rows check both ways).
        held = (anon1 + file1) - (anon0 + file0)
        assert held <= 1.03 * weights, (held, weights, anon1 - anon0, file1 - file0)
    finally:
        report = backend.stop(BIG_ID)
    # The release is measured on a heap earlier tests warmed: what comes back at once varies (allocator
    # fragmentation; the unload tests above and the GPU check's fresh-process rows measure it), but the report
    # must account for the whole footprint and stay within its tolerance.
    assert report.verdict is Outcome.SUCCESS and report.expected_bytes == dep.footprint_bytes
    assert report.freed_bytes + report.still_held_bytes >= 0.99 * dep.footprint_bytes


def test_a_memory_mapped_model_names_its_mapped_pages_and_private_bytes_everywhere(hf_settings):
    """Issue 20.2: a bf16 model read from a bf16 file stays memory-mapped; "128 B" (its private bytes
    alone) was shown as its size. The deployment, the step message, `memctl ps` and the release name
    both parts, and the release measures the mapping going away."""
    from backends.transformers.memory import _smaps_rss, mapped_resident_bytes
    from memory_controller.api import InProcessController
    from memory_controller.backend import describe_memory
    from memory_controller.controller import MemoryController
    from server.served import ps_rows
    from tests.fake_pynvml import scenario
    from tests.fixtures_models import TINY_UNTIED_ID

    ctl = MemoryController(hf_settings, nvml=scenario("library_missing").module())
    record = ctl.apply("transformers", TINY_UNTIED_ID, _profile(Precision.BF16))
    (dep,) = ctl.deployments()
    snapshot = Path(resolve_model(TINY_UNTIED_ID, hf_settings).path)
    files = [p for p in snapshot.iterdir() if p.name.endswith(".safetensors")]
    weights = sum(p.stat().st_size for p in files)
    assert dep.mapped_bytes >= 0.9 * weights  # the whole file is resident (touched)
    assert dep.mapped_bytes == mapped_resident_bytes(files)
    assert abs(_smaps_rss(files) - dep.mapped_bytes) <= 2 * 4096  # mincore agrees with the kernel's Rss
    assert dep.memory_bytes["host"] < 0.5 * weights  # private bytes: counted apart
    prepare = next(s for s in record.steps if s.name == "prepare")
    assert prepare.code == "step.prepare_mapped" and prepare.args["mapped_bytes"] == dep.mapped_bytes
    assert "mapped weight files" in prepare.message and "private" in prepare.message
    (row,) = ps_rows(InProcessController(ctl))  # the CLI reads the ControllerAPI
    assert row["mapped_bytes"] == dep.mapped_bytes
    shown = describe_memory(row["memory_bytes"], row["mapped_bytes"])
    assert "private" in shown and "mapped weight files" in shown
    report = ctl.unload(TINY_UNTIED_ID)
    assert report.mapped_bytes == dep.mapped_bytes
    assert report.mapped_freed_bytes == report.mapped_bytes  # measured: the mapping is gone
    assert mapped_resident_bytes(files) == 0
    assert "mapped weight files" in report.message.text and "private" in report.message.text
    assert report.verdict is Outcome.SUCCESS


def test_collections_skip_what_was_frozen_with_no_model_loaded_and_the_users_clear_sweeps_it(hf_settings):
    """Issue 20, apply got slower: each full collection walked ~380 k objects (~0.2 s, three per apply).
    With no model loaded the backend freezes what survives; a cycle frozen that way waits for the
    user's "clear memory", which sweeps everything."""
    import weakref

    from memory_controller.controller import MemoryController
    from tests.fake_pynvml import scenario
    from tests.fixtures_models import TINY_UNTIED_ID

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    ctl = MemoryController(hf_settings, nvml=scenario("library_missing").module())
    backend = ctl.backend("transformers")
    gc.unfreeze()
    try:
        frozen_cycle = cycle()  # alive while the backend clears with no model loaded: frozen
        keep = frozen_cycle()
        backend.clear_caches()
        assert gc.get_freeze_count() > 0
        del keep
        backend.clear_caches()
        assert frozen_cycle() is not None  # frozen: the backend's collections no longer walk it
        ctl.apply("transformers", TINY_UNTIED_ID, _profile(Precision.BF16))
        count = gc.get_freeze_count()
        new_cycle = cycle()  # garbage made while a model is loaded: collected, never frozen
        backend.clear_caches()
        assert new_cycle() is None and gc.get_freeze_count() == count
        ctl.unload(TINY_UNTIED_ID)
        assert frozen_cycle() is not None
        ctl.services.maintenance.clear_caches()  # the user's clear: unfreeze, collect everything
        assert frozen_cycle() is None
    finally:
        gc.unfreeze()
