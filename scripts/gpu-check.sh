#!/usr/bin/env bash
# memctl's GPU acceptance check: run it first on a machine with an NVIDIA GPU.
#
# Builds its own random-weight models offline, checks memctl's memory figures against NVML and a real
# load (probe, estimate per precision, peak of a forward pass, largest context, unload, clear,
# recommendation) and prints one table: check, expected, measured, verdict.
# Exit 0: every check passed (without a GPU: it says so and runs the CPU-side checks); 1: a check fell
# short; 2: it could not start (a package is missing, no wheel folder).
#
# The Python it runs needs torch (a CUDA build on the GPU machine), transformers, accelerate,
# safetensors, huggingface_hub, psutil and nvidia-ml-py. Anything else memctl needs (pydantic,
# pydantic-settings, bitsandbytes...) is installed without network from a wheel folder
# (MEMCTL_GPU_WHEELS, default gpu-wheels/ in the checkout; fill it with scripts/gpu-wheels.sh where there
# is network) into a throwaway venv that sees the machine's own packages (so its CUDA torch is used).
#
# Usage: scripts/gpu-check.sh [--small] [--out FILE] [--keep]
# Environment: MEMCTL_GPU_PYTHON (the interpreter; default python3 if it has torch, else .venv/bin/python),
#              MEMCTL_GPU_WHEELS (the wheel folder).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHEELS="${MEMCTL_GPU_WHEELS:-$ROOT/gpu-wheels}"

has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }
if [[ -n "${MEMCTL_GPU_PYTHON:-}" ]]; then
  PY="$MEMCTL_GPU_PYTHON"
elif command -v python3 >/dev/null 2>&1 && has_torch python3; then
  PY=python3
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python3
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: no Python interpreter '$PY'; set MEMCTL_GPU_PYTHON" >&2
  exit 2
fi

# The machine's own packages: nothing to install for these, they must be there.
missing_base=$("$PY" - <<'EOF'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate",
        "safetensors": "safetensors", "huggingface_hub": "huggingface_hub", "psutil": "psutil",
        "tokenizers": "tokenizers"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing_base" ]]; then
  echo "error: $PY lacks: $missing_base" >&2
  echo "hint: install them (torch as the CUDA build for your driver), or point MEMCTL_GPU_PYTHON at a Python that has them" >&2
  exit 2
fi

# What memctl needs beyond them; bitsandbytes and the server's packages only if their wheels travelled.
needs_check() {
  "$1" - <<'EOF'
import importlib.util
out = []
try:
    import pydantic
    if int(pydantic.VERSION.split(".")[0]) < 2:
        out.append("pydantic")
except ImportError:
    out.append("pydantic")
for mod, pkg in (("pydantic_settings", "pydantic-settings"),):
    if importlib.util.find_spec(mod) is None:
        out.append(pkg)
print(" ".join(out))
EOF
}
optional_missing() {
  "$1" - <<'EOF'
import importlib.util
print(" ".join(pkg for mod, pkg in (("bitsandbytes", "bitsandbytes"), ("fastapi", "fastapi"),
                                    ("uvicorn", "uvicorn"), ("httpx", "httpx"))
               if importlib.util.find_spec(mod) is None))
EOF
}
required=$(needs_check "$PY")
optional=$(optional_missing "$PY")
installable=""
if [[ -d "$WHEELS" ]]; then
  for pkg in $required $optional; do
    stem=${pkg//-/_}
    if compgen -G "$WHEELS/${stem}-*.whl" >/dev/null; then installable+=" $pkg"; fi
  done
fi

WORK=""
cleanup() { [[ -n "$WORK" ]] && rm -rf "$WORK"; }
trap cleanup EXIT
if [[ -n "${installable// /}" ]]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/memctl-gpu-venv.XXXXXX")"
  echo "installing from $WHEELS (no network):$installable"
  # Debian's python3 may lack ensurepip: then a venv without pip, driven by the system's pip module.
  if ! "$PY" -m venv --system-site-packages "$WORK/venv" >/dev/null 2>&1; then
    rm -rf "$WORK/venv"
    if ! "$PY" -m venv --without-pip --system-site-packages "$WORK/venv"; then
      echo "error: '$PY -m venv' failed; install python3-venv, or pip install$installable by hand" >&2
      exit 2
    fi
  fi
  VPY="$WORK/venv/bin/python"
  # --system-site-packages reaches only the base interpreter's packages: when $PY is itself a venv (or
  # conda), a .pth file adds its site folders (its CUDA torch) too, after the venv's own.
  "$PY" -c 'import site, sys
for p in sys.path:
    if p.endswith(("site-packages", "dist-packages")):
        print(f"import site; site.addsitedir({p!r})")' \
    > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/memctl_parent_site.pth"
  with_deps=""; no_deps=""
  for pkg in $installable; do
    # bitsandbytes' own dependencies (torch, numpy, packaging) are the machine's: never from the folder
    if [[ "$pkg" == bitsandbytes ]]; then no_deps+=" $pkg"; else with_deps+=" $pkg"; fi
  done
  PIP=("$VPY" -m pip)
  if ! "$VPY" -m pip --version >/dev/null 2>&1; then
    # no pip anywhere: a pip wheel runs as a zip (scripts/gpu-wheels.sh fetches one)
    pip_whl=$(compgen -G "$WHEELS/pip-*.whl" | head -n1 || true)
    if [[ -z "$pip_whl" ]]; then
      echo "error: $PY has no pip, and $WHEELS holds no pip wheel" >&2
      echo "hint: install python3-pip, or refill the folder with scripts/gpu-wheels.sh" >&2
      exit 2
    fi
    PIP=("$VPY" "$pip_whl/pip")
  fi
  pip_in() { "${PIP[@]}" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" "$@"; }
  # shellcheck disable=SC2086 # the package names are single words
  if ! { [[ -z "$with_deps" ]] || pip_in $with_deps; } || ! { [[ -z "$no_deps" ]] || pip_in --no-deps $no_deps; }; then
    echo "error: installing$installable from $WHEELS failed (see above)" >&2
    echo "hint: refill the folder with scripts/gpu-wheels.sh for this Python ($("$PY" -c 'import sys; print(sys.version.split()[0])'))" >&2
    exit 2
  fi
  PY="$VPY"
  required=$(needs_check "$PY")
fi
if [[ -n "$required" ]]; then
  echo "error: memctl needs $required, which $PY lacks, and $WHEELS holds no wheel of it" >&2
  echo "hint: run scripts/gpu-wheels.sh on a machine with network and copy its folder beside the checkout" \
       "(or set MEMCTL_GPU_WHEELS)" >&2
  exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
"$PY" -m bench.gpu_check "$@"
