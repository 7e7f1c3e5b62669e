#!/usr/bin/env bash
# Create .venv and install memctl into it. Idempotent: re-runs only when pyproject.toml changed.
# Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=""
[[ "${1:-}" == "--dev" ]] && EXTRA="[dev]"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
STAMP=".venv/.memctl-installed${EXTRA:+-dev}"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
# an install with the dev extra also satisfies a plain one
if [[ -z "$EXTRA" && -f .venv/.memctl-installed-dev && "$(cat .venv/.memctl-installed-dev)" == "$WANT" ]]; then
  exit 0
fi
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first, pinned: anything else would fetch a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRA}"
  echo "$WANT" > "$STAMP"
fi
