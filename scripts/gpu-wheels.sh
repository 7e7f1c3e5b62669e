#!/usr/bin/env bash
# Fetch the wheels scripts/gpu-check.sh installs on a GPU machine that has no network.
#
# Run it where there is network; it fills a folder (default: gpu-wheels/ in the checkout, or
# MEMCTL_GPU_WHEELS) with what memctl needs beyond torch, transformers, accelerate, safetensors,
# huggingface_hub, psutil and nvidia-ml-py: pydantic, pydantic-settings and their dependencies,
# the server's fastapi/uvicorn/httpx (for the streamed-chat row), and bitsandbytes (py3-none, one
# wheel for every CUDA) when the folder stays within MEMCTL_GPU_WHEELS_MAX_MIB (default 60).
# Then it prints the folder's size. Copy the folder beside the checkout on the GPU machine.
#
# Environment:
#   MEMCTL_GPU_WHEELS                folder to fill (default <checkout>/gpu-wheels)
#   MEMCTL_GPU_PYTHON_VERSIONS       target Python versions (default "3.11 3.12 3.13")
#   MEMCTL_GPU_ARCH                  x86_64 (default) or aarch64
#   MEMCTL_GPU_WHEELS_MAX_MIB        size limit in MiB (default 60)
#   PYTHON                           the Python whose pip downloads (default python3)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${MEMCTL_GPU_WHEELS:-$ROOT/gpu-wheels}"
VERSIONS="${MEMCTL_GPU_PYTHON_VERSIONS:-3.11 3.12 3.13}"
ARCH="${MEMCTL_GPU_ARCH:-x86_64}"
MAX_MIB="${MEMCTL_GPU_WHEELS_MAX_MIB:-60}"
PY="${PYTHON:-python3}"
case "$ARCH" in x86_64|aarch64) ;; *) echo "error: MEMCTL_GPU_ARCH must be x86_64 or aarch64, not '$ARCH'" >&2; exit 2 ;; esac
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "error: '$PY -m pip' does not work; set PYTHON to a Python with pip" >&2
  exit 2
fi
mkdir -p "$DEST"
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_24 manylinux_2_17 manylinux2014; do
  PLATFORMS+=(--platform "${tag}_${ARCH}")
done
# Versions as in pyproject.toml. Pure-Python wheels are shared; pydantic-core is one per version.
# pip itself too: gpu-check.sh runs it from its wheel when the machine's Python has no pip.
REQS=("pydantic>=2.10" "pydantic-settings>=2.10" "fastapi>=0.115" "uvicorn>=0.30" "httpx>=0.27" "pip")
for v in $VERSIONS; do
  echo "== wheels for Python $v ($ARCH)"
  "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version "$v" --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${REQS[@]}"
done

size_bytes() { du -sb "$1" | cut -f1; }
rm -f "$DEST"/bitsandbytes-*.whl  # a refill decides afresh whether it fits
before=$(size_bytes "$DEST")
echo "== bitsandbytes (one py3-none wheel for all CUDA versions)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# --no-deps: its dependencies (torch, numpy, packaging) are already on the GPU machine.
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$TMP" "bitsandbytes>=0.45"
bnb_bytes=$(size_bytes "$TMP")
limit=$((MAX_MIB * 1024 * 1024))
if (( before + bnb_bytes <= limit )); then
  mv "$TMP"/*.whl "$DEST"/
  echo "bitsandbytes added ($((bnb_bytes / 1048576)) MiB)"
else
  echo "bitsandbytes left out: $(( (before + bnb_bytes) / 1048576 )) MiB would exceed ${MAX_MIB} MiB;" \
       "the 8/4-bit rows will say 'not run: bitsandbytes not installed'"
fi
total=$(size_bytes "$DEST")
echo "== $DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $total bytes ($(( total / 1048576 )) MiB; limit ${MAX_MIB} MiB)"
ls -1 "$DEST"
