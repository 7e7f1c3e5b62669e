"""``memctl export``: documents for cluster engines, validated against the engines' own definitions.

The production-stack values against the chart's ``helm/values.schema.json`` and, for ``enableTool`` /
``toolCallParser`` (read by the chart's template, absent from its schema), against the names the template
reads; the RayService against KubeRay's CRD schema and Ray Serve LLM's ``LLMConfig`` field names (Ray's own
pydantic model too when it is importable). The numbers are checked against the estimator directly. The
vendored files and their commits: tests/data/SOURCES.md. The 7 B models are header-only (sparse files).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from backends.vllm import export as vexport
from backends.vllm.args import TOOL_PARSERS, build_vllm_args, compute_gpu_memory_utilization
from memctl_cli import main as cli_main
from memory_controller import estimate as est
from memory_controller.clusterfit import BadExportRequestError, DoesNotFitError
from memory_controller.controller import MemoryController
from memory_controller.settings import load_settings
from memory_controller.types import Precision, Profile
from memory_controller.units import GIB
from tests import model_factory as mf
from tests.fake_pynvml import FakeGpu, FakeNvml

DATA = Path(__file__).parent / "data"
PS_SCHEMA = json.loads((DATA / "production-stack" / "values.schema.json").read_text())
PS_TEMPLATE = (DATA / "production-stack" / "deployment-vllm-multi.yaml").read_text()
RAYSERVICE_SCHEMA = json.loads((DATA / "kuberay" / "rayservice-v1.schema.json").read_text())
RAY_FIELDS = json.loads((DATA / "ray" / "llm_config_fields.json").read_text())
VLLM_FIELDS = json.loads((DATA / "vllm" / "engine_kwargs_fields.json").read_text())

# Qwen2-7B's layout (7.6 B parameters, bf16, 131072 positions): family qwen -> vLLM's hermes parser.
QWEN7 = mf.LlamaShape(hidden_size=3584, intermediate_size=18944, layers=28, heads=28, kv_heads=4,
                      vocab_size=152064, tie=False, dtype="bfloat16", max_position_embeddings=131072)
MODEL = f"{mf.TEST_ORG}/qwen2-7b"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    hub = tmp_path_factory.mktemp("export") / "hub"
    mf.sparse_into_cache(hub, "qwen2-7b", QWEN7, config={"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    mf.sparse_into_cache(hub, "llama2-like", mf.TINY)  # a 1000-token vocabulary: no tool-call family
    return hub


@pytest.fixture()
def ctl(hub) -> MemoryController:
    return MemoryController(load_settings(hf_cache_dir=hub, local_model_dirs=[]), nvml=FakeNvml(gpus=[]).module())


def _model_spec(result) -> dict:
    return result.document["servingEngineSpec"]["modelSpec"][0]


def _llm_config(result) -> dict:
    serve = yaml.safe_load(result.document["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app" == RAY_FIELDS["build_openai_app"]
    (cfg,) = app["args"]["llm_configs"]
    return cfg


def _expected(ctl: MemoryController, gpu_gib: int, *, context: int | None = None):
    """memctl's own fit, straight from the estimator: the table's batch (4 here) halved until the largest
    context that fits the usable memory reaches ide_min_context; utilisation = need / GPU + margin."""
    s = ctl.settings
    cached = ctl.resolve(MODEL)
    usable = int(gpu_gib * GIB * (s.vllm_gpu_util_max - s.vllm_gpu_util_margin))
    for batch in (4, 2, 1):
        p = Profile(mode="vllm", precision=Precision.BF16, context_tokens=0, batch=batch, device="cuda", gpu_ids=(0,))
        if context is None:
            ctx = min(est.max_context_that_fits(cached, usable, p, s), QWEN7.max_position_embeddings)
            if ctx < s.ide_min_context and batch > 1:
                continue
        else:
            ctx = context
            if est.estimate(cached, p.with_(context_tokens=ctx), s).total_bytes > usable:
                continue
        need = est.estimate(cached, p.with_(context_tokens=ctx), s).total_bytes
        util = compute_gpu_memory_utilization(need, gpu_gib * GIB, s.vllm_gpu_util_margin, s.vllm_gpu_util_max)
        return ctx, batch, util, need, usable
    raise AssertionError("nothing fits")


# --------------------------------------------------------------------------- production-stack
@pytest.mark.parametrize("gpu_gib", [24, 80])
def test_production_stack_values_pass_the_charts_own_schema(ctl, gpu_gib):
    result = ctl.export("production-stack", MODEL, gpu_bytes=gpu_gib * GIB)
    jsonschema.Draft202012Validator(PS_SCHEMA).validate(result.document)
    assert yaml.safe_load(result.text) == result.document  # the header is comments only
    # The schema allows unknown keys: every key must also be one the chart knows (schema or template).
    item = PS_SCHEMA["properties"]["servingEngineSpec"]["properties"]["modelSpec"]["items"]
    read_by_template = set(re.findall(r"\$modelSpec\.(\w+)", PS_TEMPLATE))
    spec = _model_spec(result)
    assert set(spec) <= set(item["properties"]) | read_by_template
    assert set(spec["vllmConfig"]) <= set(item["properties"]["vllmConfig"]["properties"])
    for key in ("name", "repository", "tag", "modelURL", "requestGPU", "requestMemory", "requestCPU"):
        assert key in spec
    assert (spec["repository"], spec["tag"]) == (ctl.settings.vllm_image, ctl.settings.vllm_tag)
    assert spec["modelURL"] == MODEL and spec["vllmConfig"]["dtype"] == "bfloat16"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", spec["name"])


def test_the_schema_really_is_checked(ctl):
    doc = json.loads(json.dumps(ctl.export("production-stack", MODEL, gpu_bytes=24 * GIB).document))
    doc["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["maxModelLen"] = "32k"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(PS_SCHEMA).validate(doc)


def test_tool_fields_are_the_names_the_charts_template_reads(ctl):
    item = PS_SCHEMA["properties"]["servingEngineSpec"]["properties"]["modelSpec"]["items"]["properties"]
    assert "enableTool" not in item and "toolCallParser" not in item  # read by the template, not in the schema
    assert "{{- if $modelSpec.enableTool }}" in PS_TEMPLATE
    assert '- "--tool-call-parser"\n          - {{ $modelSpec.toolCallParser | quote }}' in PS_TEMPLATE
    spec = _model_spec(ctl.export("production-stack", MODEL, gpu_bytes=24 * GIB))
    assert spec["enableTool"] is True
    assert spec["toolCallParser"] == TOOL_PARSERS["qwen"] == "hermes"  # the workstation's parser for Qwen


def test_24_and_80_gib_give_memctls_own_fit_and_differ(ctl):
    got = {}
    for gpu_gib in (24, 80):
        result = ctl.export("production-stack", MODEL, gpu_bytes=gpu_gib * GIB)
        vc = _model_spec(result)["vllmConfig"]
        ctx, batch, util, need, usable = _expected(ctl, gpu_gib)
        assert (vc["maxModelLen"], vc["maxNumSeqs"], vc["gpuMemoryUtilization"]) == (ctx, batch, util)
        assert vc["tensorParallelSize"] == 1 and result.fit.per_gpu_bytes == need <= usable
        # the largest that fits: one more token of context does not
        p = result.fit.profile
        assert ctx == QWEN7.max_position_embeddings or \
            est.estimate(ctl.resolve(MODEL), p.with_(context_tokens=ctx + 1), ctl.settings).total_bytes > usable
        got[gpu_gib] = (ctx, batch, util)
    (c24, b24, u24), (c80, b80, u80) = got[24], got[80]
    assert ctl.settings.ide_min_context <= c24 < c80 <= QWEN7.max_position_embeddings
    assert (b24, b80) == (1, 4)  # on 24 GiB one sequence, so that the IDE's 32k context fits
    assert u24 <= ctl.settings.vllm_gpu_util_max and u80 <= ctl.settings.vllm_gpu_util_max


def test_a_given_context_claims_what_it_needs_not_a_fixed_fraction(ctl):
    result = ctl.export("production-stack", MODEL, gpu_bytes=80 * GIB, context=8192)
    vc = _model_spec(result)["vllmConfig"]
    ctx, batch, util, _need, _usable = _expected(ctl, 80, context=8192)
    assert (vc["maxModelLen"], vc["maxNumSeqs"], vc["gpuMemoryUtilization"]) == (8192, batch, util)
    assert util < 0.5  # a 7 B model at 8k tokens needs well under half of an 80 GiB GPU


def test_tensor_parallelism_splits_the_need(ctl):
    one = ctl.export("production-stack", MODEL, gpu_bytes=24 * GIB)
    two = ctl.export("production-stack", MODEL, gpu_bytes=24 * GIB, gpus=2)
    spec = _model_spec(two)
    assert spec["requestGPU"] == spec["vllmConfig"]["tensorParallelSize"] == 2
    assert spec["vllmConfig"]["maxModelLen"] > _model_spec(one)["vllmConfig"]["maxModelLen"]
    assert two.fit.per_gpu_bytes == math.ceil(two.fit.estimate.total_bytes / 2)


def test_a_model_without_a_tool_family_gets_no_parser_and_says_so(ctl):
    result = ctl.export("production-stack", f"{mf.TEST_ORG}/llama2-like", gpu_bytes=24 * GIB, batch=2)
    jsonschema.Draft202012Validator(PS_SCHEMA).validate(result.document)
    spec = _model_spec(result)
    assert "enableTool" not in spec and "toolCallParser" not in spec
    assert spec["vllmConfig"]["maxNumSeqs"] == 2 and spec["vllmConfig"]["maxModelLen"] == mf.TINY.max_position_embeddings
    assert [n.code for n in result.notes] == ["ide.model_max_below_minimum", "export.tools_not_parsed"]
    assert "tool calls are off" in result.text
    cfg = _llm_config(ctl.export("rayservice", f"{mf.TEST_ORG}/llama2-like", gpu_bytes=24 * GIB))
    assert "tool_call_parser" not in cfg["engine_kwargs"] and "accelerator_type" not in cfg


# --------------------------------------------------------------------------- RayService
@pytest.mark.parametrize("gpu_gib", [24, 80])
def test_rayservice_passes_kuberays_schema_and_rays_field_names(ctl, gpu_gib):
    result = ctl.export("rayservice", MODEL, gpu_bytes=gpu_gib * GIB, accelerator="L4" if gpu_gib == 24 else "H100")
    jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA).validate(result.document)
    assert yaml.safe_load(result.text) == result.document
    assert (result.document["apiVersion"], result.document["kind"]) == ("ray.io/v1", "RayService")
    cfg = _llm_config(result)
    assert set(cfg) <= set(RAY_FIELDS["LLMConfig"])
    assert set(cfg["model_loading_config"]) <= set(RAY_FIELDS["ModelLoadingConfig"])
    assert set(cfg["deployment_config"]["autoscaling_config"]) <= set(RAY_FIELDS["AutoscalingConfig"])
    assert cfg["accelerator_type"] in RAY_FIELDS["AcceleratorType"]
    assert cfg["model_loading_config"] == {"model_id": MODEL, "model_source": MODEL}
    # the same numbers as the Helm values, under vLLM's engine argument names
    vc = _model_spec(ctl.export("production-stack", MODEL, gpu_bytes=gpu_gib * GIB))["vllmConfig"]
    ek = cfg["engine_kwargs"]
    assert (ek["max_model_len"], ek["gpu_memory_utilization"], ek["tensor_parallel_size"], ek["max_num_seqs"],
            ek["dtype"]) == (vc["maxModelLen"], vc["gpuMemoryUtilization"], vc["tensorParallelSize"],
                             vc["maxNumSeqs"], vc["dtype"])
    assert ek["enable_auto_tool_choice"] is True and ek["tool_call_parser"] == "hermes"


def test_engine_kwargs_are_arguments_ray_hands_to_vllm(ctl):
    # Ray Serve LLM splits engine_kwargs into vLLM's FrontendArgs and AsyncEngineArgs and refuses any other key.
    known = set(VLLM_FIELDS["AsyncEngineArgs"]) | set(VLLM_FIELDS["FrontendArgs"])
    cfg = _llm_config(ctl.export("rayservice", MODEL, gpu_bytes=24 * GIB))
    assert set(cfg["engine_kwargs"]) <= known
    assert {"enable_auto_tool_choice", "tool_call_parser"} <= set(VLLM_FIELDS["FrontendArgs"])


def test_engine_kwargs_are_the_flags_memctl_passes_to_vllm(ctl):
    cfg = _llm_config(ctl.export("rayservice", MODEL, gpu_bytes=24 * GIB))
    profile = Profile(mode="vllm", precision=Precision.BF16, context_tokens=4096, batch=1)
    flags = set(build_vllm_args("m", "m", profile, 0.9, 8000, revision="r" * 40, tool_parser="hermes"))
    for key in cfg["engine_kwargs"]:
        assert "--" + key.replace("_", "-") in flags


def test_rays_own_llm_config_accepts_it(ctl):
    llm_config = pytest.importorskip("ray.llm._internal.serve.core.configs.llm_config")
    cfg = _llm_config(ctl.export("rayservice", MODEL, gpu_bytes=80 * GIB, accelerator="H100"))
    built = llm_config.LLMConfig(**cfg)
    assert built.engine_kwargs["max_model_len"] == cfg["engine_kwargs"]["max_model_len"]


def test_this_machines_gpu_is_the_default_and_names_the_accelerator(hub):
    gpu = FakeGpu(name="NVIDIA H100 80GB HBM3", total_bytes=80 * GIB, used_bytes=GIB)
    local = MemoryController(load_settings(hf_cache_dir=hub, local_model_dirs=[]), nvml=FakeNvml(gpus=[gpu]).module())
    result = local.export("rayservice", MODEL)
    assert result.fit.gpu_bytes == 80 * GIB
    assert _llm_config(result)["accelerator_type"] == "H100"


def test_accelerator_names_are_rays():
    assert set(vexport.RAY_NVIDIA_ACCELERATORS) <= set(RAY_FIELDS["AcceleratorType"])
    names = {"NVIDIA H100 80GB HBM3": "H100", "NVIDIA H200": "H200", "NVIDIA H20": "H20", "NVIDIA L4": "L4",
             "NVIDIA L40S": "L40S", "NVIDIA A100-SXM4-80GB": "A100-80G", "Tesla T4": "T4", "NVIDIA A10G": "A10G",
             "NVIDIA GeForce RTX 4090": None}
    assert {n: vexport.accelerator_for(n) for n in names} == names


# --------------------------------------------------------------------------- refusals
def test_does_not_fit_gives_the_numbers_and_the_gpus_that_would(ctl):
    with pytest.raises(DoesNotFitError) as info:
        ctl.export("production-stack", MODEL, gpu_bytes=12 * GIB)
    assert info.value.args_["gpus_that_fit"] == 2 and "--gpus 2" in info.value.hint
    assert "GiB" in info.value.message and info.value.needed_bytes > info.value.free_bytes
    with pytest.raises(DoesNotFitError) as info:
        ctl.export("production-stack", MODEL, gpu_bytes=6 * GIB)
    assert info.value.args_["gpus_that_fit"] == 4 and "--gpus 4" in info.value.hint


def test_bad_requests_say_what_to_do(ctl):
    with pytest.raises(BadExportRequestError, match="28 attention heads"):
        ctl.export("production-stack", MODEL, gpu_bytes=24 * GIB, gpus=3)
    with pytest.raises(BadExportRequestError, match="maximum of 131,072"):
        ctl.export("production-stack", MODEL, gpu_bytes=80 * GIB, context=200_000)
    with pytest.raises(BadExportRequestError, match="context must be a whole number"):
        ctl.export("production-stack", MODEL, gpu_bytes=80 * GIB, context=0)
    with pytest.raises(BadExportRequestError, match="batch must be a whole number"):
        ctl.export("production-stack", MODEL, gpu_bytes=80 * GIB, batch=-1)
    with pytest.raises(BadExportRequestError, match="unknown export format"):
        ctl.export("helmfile", MODEL, gpu_bytes=24 * GIB)
    with pytest.raises(BadExportRequestError, match="no GPU"):
        ctl.export("production-stack", MODEL)
    with pytest.raises(BadExportRequestError, match="accelerator"):
        ctl.export("rayservice", MODEL, gpu_bytes=24 * GIB, accelerator="TPU-V4; rm")


# --------------------------------------------------------------------------- the command
@pytest.fixture()
def cli_env(hub, monkeypatch):
    monkeypatch.setenv("MEMCTL_HF_CACHE_DIR", str(hub))
    monkeypatch.setenv("MEMCTL_LOCAL_MODEL_DIRS", "[]")


def test_cli_prints_the_values(cli_env, capsys):
    code = cli_main.main(["export", "production-stack", "--model", MODEL, "--gpu-memory", "24"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = yaml.safe_load(out)
    jsonschema.Draft202012Validator(PS_SCHEMA).validate(doc)
    assert doc["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["maxNumSeqs"] == 1
    assert "does not deploy" in err and "values-qwen2-7b-1x24g.yaml" in err


def test_cli_rayservice(cli_env, capsys):
    code = cli_main.main(["export", "rayservice", "--model", MODEL, "--gpu-memory", "80", "--gpus", "2",
                          "--max-replicas", "3", "--accelerator", "A100-80G"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = yaml.safe_load(out)
    jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA).validate(doc)
    worker = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["maxReplicas"] == 3
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"][0]
    assert cfg["engine_kwargs"]["tensor_parallel_size"] == 2 and cfg["accelerator_type"] == "A100-80G"


def test_cli_does_not_fit_exits_1_and_suggests_two_gpus(cli_env, capsys):
    code = cli_main.main(["export", "production-stack", "--model", MODEL, "--gpu-memory", "12"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert "does not fit 1 × 12.00 GiB GPU at any context" in err and "per GPU" in err
    assert "hint: spread it over 2 GPUs with tensor parallelism: --gpus 2" in err


def test_cli_bad_arguments_exit_2(cli_env, capsys):
    assert cli_main.main(["export", "production-stack", "--model", MODEL, "--gpu-memory", "24", "--gpus", "3"]) == 2
    assert "divides 28" in capsys.readouterr().err
    assert cli_main.main(["export", "production-stack", "--model", MODEL]) == 2  # no GPU here, no --gpu-memory
    assert "--gpu-memory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli_main.main(["export", "production-stack", "--model", MODEL, "--gpu-memory", "nan"])
    assert info.value.code == 2
