"""Documents for the engines teams run vLLM with on Kubernetes, sized by memctl's own fit.

* ``production-stack`` — Helm values for vLLM's production-stack chart (``servingEngineSpec.modelSpec[]``;
  the names are those of the chart's ``helm/values.schema.json`` and, for ``enableTool`` /
  ``toolCallParser``, which the schema lacks, of ``templates/deployment-vllm-multi.yaml``).
* ``rayservice`` — a KubeRay ``RayService`` whose ``serveConfigV2`` runs ``ray.serve.llm:build_openai_app``
  with one ``llm_configs[]`` entry (the field names of Ray Serve LLM's ``LLMConfig``).

The numbers are the workstation's: ``memory_controller.clusterfit.fit_on_gpus`` (the estimator and the
IDE-aware context rule) over the fraction of each GPU vLLM may hold (``vllm_gpu_util_max`` less the
margin), ``gpu_memory_utilization`` from :func:`.args.compute_gpu_memory_utilization` (what the model
needs over the GPU's size plus the margin), the tool-call parser of the model's family from
:func:`.args.tool_parser_for`, the image memctl runs (``vllm_image``:``vllm_tag``). Nothing is deployed.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import yaml

from memory_controller.clusterfit import (
    BadExportRequestError,
    ExportRequest,
    ExportResult,
    GpuFit,
    fit_on_gpus,
    gib,
)
from memory_controller.estimate import describe, read_model_spec
from memory_controller.types import CachedModel, Message, Precision, msg
from memory_controller.units import GIB, fmt_bytes

from .args import compute_gpu_memory_utilization, model_family, tool_parser_for
from .options import vllm_options

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

PRODUCTION_STACK = "production-stack"
RAYSERVICE = "rayservice"
FORMATS = (PRODUCTION_STACK, RAYSERVICE)

# Ray release whose ``LLMConfig`` the output was checked against (tests/data/ray_llm_config_fields.json).
RAY_VERSION = "2.60.0"
RAY_IMAGE = f"rayproject/ray-llm:{RAY_VERSION}-py311-cu128"
RAY_APP_IMPORT_PATH = "ray.serve.llm:build_openai_app"
# Ray Serve LLM's NVIDIA accelerator types (ray.llm._internal.serve.core.configs.accelerators, Ray 2.60.0),
# most specific first, so a GPU's name is matched to the longest type it contains.
RAY_NVIDIA_ACCELERATORS = ("A100-80G", "A100-40G", "RTX-PRO-6000", "GB200", "GB300", "H200", "H100", "H20",
                           "B200", "B300", "L40S", "A10G", "A100", "V100", "P100", "L4", "T4", "P4", "K80")

CPU_PER_GPU = 4  # CPU cores asked for per GPU (the chart's example asks 6 for one GPU)
HOST_MEMORY_EXTRA_GIB = 8  # host memory beyond the weight files: the engine, the tokenizer, loading buffers
_DTYPE = {Precision.BF16: "bfloat16", Precision.FP16: "float16", Precision.FP32: "float32"}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


# --------------------------------------------------------------------------- helpers
def k8s_name(model_id: str, limit: int = 30) -> str:
    """A DNS-1123 label from a model id: lower case, ``[a-z0-9-]``, at most ``limit`` characters."""
    tail = model_id.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^a-z0-9]+", "-", tail.lower()).strip("-")[:limit].strip("-")
    return name or "model"


def accelerator_for(name: str | None) -> str | None:
    """Ray's accelerator type for a GPU's name ("NVIDIA H100 80GB HBM3" -> "H100"), or None."""
    if not name:
        return None
    upper = name.upper()
    if "A100" in upper:
        return "A100-80G" if "80G" in upper else "A100-40G" if "40G" in upper else "A100"
    for acc in RAY_NVIDIA_ACCELERATORS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(acc)}(?![A-Z0-9])", upper):
            return acc
    return None


def check_accelerator(value: str) -> str:
    if value not in RAY_NVIDIA_ACCELERATORS:
        raise BadExportRequestError(f"unknown accelerator type {value[:40]!r}",
                                    f"use one of Ray's NVIDIA types: {', '.join(sorted(RAY_NVIDIA_ACCELERATORS))}",
                                    args={"accelerator": value[:40]})
    return value


def usable_fraction(settings: Settings) -> float:
    """The fraction of a GPU a model may need so that vLLM's utilisation (need + margin) stays under the cap."""
    return vllm_options(settings).gpu_util_max - vllm_options(settings).gpu_util_margin


class _Block(str):
    """A string written as a YAML block literal (``|``)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Block, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", str(s), style="|"))


def dump_yaml(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=120)


# --------------------------------------------------------------------------- the shared sizing
class _Sized:
    """The fit and everything both documents say about it."""

    def __init__(self, settings: Settings, model: CachedModel, request: ExportRequest, backend_id: str) -> None:
        self.settings = settings
        self.model = model
        self.request = request
        self.fit: GpuFit = fit_on_gpus(model, settings, mode=backend_id, gpu_bytes=request.gpu_bytes,
                                       gpus=request.gpus, usable_fraction=usable_fraction(settings),
                                       context=request.context, batch=request.batch)
        self.gpu_util = compute_gpu_memory_utilization(self.fit.per_gpu_bytes, request.gpu_bytes,
                                                       vllm_options(settings).gpu_util_margin, vllm_options(settings).gpu_util_max)
        self.family = model_family(model)
        self.tool_parser = tool_parser_for(self.family)
        spec = read_model_spec(model.path)
        self.host_memory_gib = math.ceil(spec.weight_file_bytes / GIB) + HOST_MEMORY_EXTRA_GIB
        self.revision = model.revision if model.revision and _HEX40.match(model.revision) else None
        notes: list[Message] = list(self.fit.notes)
        if self.tool_parser is None:
            notes.append(msg("export.tools_not_parsed",
                             f"{model.model_id}: no tool-call parser is known for its family; tool calls are off",
                             model=model.model_id))
        if model.source != "hf_cache":
            notes.append(msg("export.local_model",
                             f"{model.model_id} is a local directory: put it where the cluster can read it and "
                             "change the model's URL/source", model=model.model_id))
        if self.fit.gpus > 1 and spec.num_kv_heads and spec.num_kv_heads < self.fit.gpus:
            notes.append(msg("export.kv_replicated",
                             f"{spec.num_kv_heads} KV heads over {self.fit.gpus} GPUs: vLLM replicates them, so each "
                             "GPU holds more KV cache than this estimate splits to it",
                             kv_heads=spec.num_kv_heads, gpus=self.fit.gpus))
        self.notes = tuple(notes)

    @property
    def dtype(self) -> str:
        return _DTYPE.get(self.fit.profile.precision, "auto")

    def header(self, fmt: str, apply: str) -> str:
        f, r = self.fit, self.request
        e = f.estimate
        lines = [
            f"memctl export {fmt} — {self.model.model_id}" + (f" @ {self.revision[:12]}" if self.revision else ""),
            f"Sized by memctl for {f.gpus} × {fmt_bytes(r.gpu_bytes)} GPU{'s' if f.gpus > 1 else ''}"
            + (f" ({r.gpu_name})" if r.gpu_name else "") + ":",
            f"  {f.profile.precision.value}, context {f.context_tokens:,} tokens, {f.profile.batch} sequence(s) at once",
            f"  needs {describe(e)}",
            f"  = {fmt_bytes(f.per_gpu_bytes)} per GPU; gpu_memory_utilization {self.gpu_util:.2f} = "
            f"{fmt_bytes(f.per_gpu_bytes)} / {fmt_bytes(r.gpu_bytes)} + margin {vllm_options(self.settings).gpu_util_margin:.2f}",
        ]
        if f.model_max_context:
            lines.append(f"  the model's own maximum context: {f.model_max_context:,} tokens")
        lines += [f"  note: {n.text}" for n in self.notes]
        lines += ["memctl writes this file; it does not deploy anything.", f"Apply: {apply}"]
        return "".join(f"# {line}\n" for line in lines)


# --------------------------------------------------------------------------- production-stack
def production_stack_values(s: _Sized) -> dict[str, Any]:
    f = s.fit
    spec: dict[str, Any] = {
        "name": k8s_name(s.model.model_id),
        "repository": vllm_options(s.settings).image,
        "tag": vllm_options(s.settings).tag,
        "modelURL": s.model.model_id,
    }
    if s.revision:
        spec["modelRevision"] = s.revision
    spec.update({
        "replicaCount": 1,
        "requestCPU": CPU_PER_GPU * f.gpus,
        "requestMemory": f"{s.host_memory_gib}Gi",
        "requestGPU": f.gpus,
    })
    if s.tool_parser:
        spec["enableTool"] = True
        spec["toolCallParser"] = s.tool_parser
    spec["vllmConfig"] = {
        "dtype": s.dtype,
        "maxModelLen": f.context_tokens,
        "gpuMemoryUtilization": s.gpu_util,
        "tensorParallelSize": f.gpus,
        "maxNumSeqs": f.profile.batch,
    }
    return {"servingEngineSpec": {"modelSpec": [spec]}}


# --------------------------------------------------------------------------- RayService
def llm_config(s: _Sized) -> dict[str, Any]:
    f, r = s.fit, s.request
    engine: dict[str, Any] = {
        "dtype": s.dtype,
        "max_model_len": f.context_tokens,
        "gpu_memory_utilization": s.gpu_util,
        "tensor_parallel_size": f.gpus,
        "max_num_seqs": f.profile.batch,
    }
    if s.revision:
        engine["revision"] = s.revision
    if s.tool_parser:
        engine["enable_auto_tool_choice"] = True
        engine["tool_call_parser"] = s.tool_parser
    cfg: dict[str, Any] = {
        "model_loading_config": {"model_id": s.model.model_id, "model_source": s.model.model_id},
        "engine_kwargs": engine,
    }
    accelerator = check_accelerator(r.accelerator) if r.accelerator else accelerator_for(r.gpu_name)
    if accelerator:
        cfg["accelerator_type"] = accelerator
    cfg["deployment_config"] = {"autoscaling_config": {"min_replicas": 1, "max_replicas": r.max_replicas}}
    return cfg


def rayservice(s: _Sized) -> dict[str, Any]:
    f, r = s.fit, s.request
    serve = {"applications": [{"name": "llms", "import_path": RAY_APP_IMPORT_PATH, "route_prefix": "/",
                               "args": {"llm_configs": [llm_config(s)]}}]}
    gpus = str(f.gpus)
    worker_resources = {"cpu": str(CPU_PER_GPU * f.gpus), "memory": f"{s.host_memory_gib}Gi", "nvidia.com/gpu": gpus}
    ports = [{"containerPort": p, "name": n} for p, n in
             ((6379, "gcs"), (8265, "dashboard"), (10001, "client"), (8000, "serve"))]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": k8s_name(s.model.model_id, 40)},
        "spec": {
            "serveConfigV2": _Block(dump_yaml(serve)),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": r.max_replicas > 1,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "num-gpus": "0"},
                    "template": {"spec": {"containers": [{
                        "name": "ray-head", "image": RAY_IMAGE, "ports": ports,
                        "resources": {"requests": {"cpu": "2", "memory": "8Gi"},
                                      "limits": {"cpu": "2", "memory": "8Gi"}},
                    }]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu-group",
                    "replicas": 1,
                    "minReplicas": 1,
                    "maxReplicas": r.max_replicas,
                    "rayStartParams": {"num-gpus": gpus},
                    "template": {"spec": {"containers": [{
                        "name": "ray-worker", "image": RAY_IMAGE,
                        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                            "name": "hf-token", "key": "hf_token", "optional": True}}}],
                        "resources": {"requests": dict(worker_resources), "limits": dict(worker_resources)},
                    }]}},
                }],
            },
        },
    }


# --------------------------------------------------------------------------- entry point
def export(settings: Settings, backend_id: str, fmt: str, model: CachedModel, request: ExportRequest) -> ExportResult:
    """The document ``fmt`` ("production-stack" | "rayservice") for ``model``; raises the fit's errors
    (DoesNotFitError, BadExportRequestError) and BadExportRequestError for an unknown format."""
    if fmt not in FORMATS:
        raise BadExportRequestError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}",
                                    "choose one of the known formats", args={"format": fmt})
    if request.accelerator:
        check_accelerator(request.accelerator)
    sized = _Sized(settings, model, request, backend_id)
    slug = f"{k8s_name(model.model_id)}-{sized.fit.gpus}x{gib(request.gpu_bytes)}g"
    if fmt == PRODUCTION_STACK:
        doc = production_stack_values(sized)
        file_name = f"values-{slug}.yaml"
        apply = f"helm install vllm vllm/vllm-stack -f {file_name}   (repo: https://vllm-project.github.io/production-stack)"
    else:
        doc = rayservice(sized)
        file_name = f"rayservice-{slug}.yaml"
        apply = f"kubectl apply -f {file_name}   (needs the KubeRay operator)"
    text = sized.header(fmt, apply) + dump_yaml(doc)
    return ExportResult(fmt=fmt, file_name=file_name, text=text, document=doc, fit=sized.fit,
                        gpu_util=sized.gpu_util, notes=sized.notes)
