"""``memctl export production-stack|rayservice --model M``: a model sized for cluster GPUs, written in the
engine's own format (Helm values for vLLM production-stack, a KubeRay RayService running Ray Serve LLM).

The numbers come from the controller (``MemoryController.export``: the workstation's estimator and fit);
the document goes to stdout, a one-line summary to stderr. Nothing is deployed. Exit codes: 0 written,
1 the model does not fit (the message has the numbers, the hint the ``--gpus`` that would fit), 2 a bad
argument (unknown format, a GPU count that does not divide the heads, a context over the model's maximum,
no GPU here and no ``--gpu-memory``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

from memctl_cli.output import print_error
from memory_controller.clusterfit import BadExportRequestError
from memory_controller.errors import MemctlError
from memory_controller.units import GIB, fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

FORMATS_HELP = ("production-stack (Helm values for vLLM's production-stack chart) or rayservice "
                "(a KubeRay RayService running ray.serve.llm:build_openai_app)")
MAX_GPU_GIB = 4096.0


def _gpu_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} must be a positive number of GiB (24 for an L4, 80 for an H100)")
    if value > MAX_GPU_GIB:
        raise argparse.ArgumentTypeError(f"{value:g} GiB is more than any GPU has (limit {MAX_GPU_GIB:g})")
    return value


def _whole(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high:,}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a model's fitted profile for a cluster engine (Helm values / RayService)",
        description="Print a document for a cluster engine, sized by memctl's estimator for the given GPUs. "
                    "memctl writes it; it does not deploy it.")
    p.add_argument("format", metavar="FORMAT", help=FORMATS_HELP)
    p.add_argument("--model", required=True, help="Hugging Face id (org/name) of a cached model")
    p.add_argument("--gpu-memory", type=_gpu_gib, default=None, metavar="GIB",
                   help="memory of one cluster GPU in GiB (default: this machine's GPU)")
    p.add_argument("--gpus", type=_whole(1, 64), default=1, help="GPUs per replica: tensor parallelism (default 1)")
    p.add_argument("--context", type=_whole(1, 10_000_000), default=None,
                   help="context tokens to serve (default: the largest that fits, up to the model's maximum)")
    p.add_argument("--max-num-seqs", type=_whole(1, 1024), default=None, dest="batch",
                   help="sequences at once (default: the recommendation table's, fewer when the IDE context needs it)")
    p.add_argument("--accelerator", default=None, help="Ray's accelerator type, e.g. H100, L4 (rayservice)")
    p.add_argument("--max-replicas", type=_whole(1, 1000), default=2, help="autoscaling upper bound (rayservice)")
    p.add_argument("--json", action="store_true", help="the numbers and the document as JSON instead of YAML")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from server.connect import controller_for

    gpu_bytes = None if args.gpu_memory is None else int(args.gpu_memory * GIB)
    ctl = controller_for(settings)
    try:
        result = ctl.export(args.format, args.model, gpu_bytes=gpu_bytes, gpus=args.gpus, context=args.context,
                            batch=args.batch, accelerator=args.accelerator, max_replicas=args.max_replicas)
    except BadExportRequestError as exc:
        return _error(args, exc, 2)
    finally:
        ctl.close()
    f = result.fit
    if args.json:
        print(json.dumps({"format": result.fmt, "file_name": result.file_name, "model": f.model_id,
                          "gpus": f.gpus, "gpu_bytes": f.gpu_bytes, "context_tokens": f.context_tokens,
                          "max_num_seqs": f.profile.batch, "precision": f.profile.precision.value,
                          "gpu_memory_utilization": result.gpu_util, "per_gpu_bytes": f.per_gpu_bytes,
                          "notes": [n.text for n in result.notes], "document": result.document},
                         ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(result.text)
    print(f"memctl: {f.model_id} on {f.gpus} × {fmt_bytes(f.gpu_bytes)}: context {f.context_tokens:,} tokens, "
          f"{f.profile.batch} sequence(s), gpu_memory_utilization {result.gpu_util:.2f} "
          f"({fmt_bytes(f.per_gpu_bytes)} per GPU). Save as {result.file_name}; memctl does not deploy it.",
          file=sys.stderr)
    return 0


def _error(args: argparse.Namespace, exc: MemctlError, code: int) -> int:
    print_error(exc, bool(args.json))
    return code
