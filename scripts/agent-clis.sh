#!/usr/bin/env bash
# Install the coding-agent CLIs the real-client test tier drives (pytest -m agents), pinned, into a
# project-local folder (never global): .cache/agent-clis/node_modules/.bin/{cn,kilo}. Idempotent.
# Kilo 7.8.1 did not install (its linux-x64 binary package was missing); 7.7.7 does.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${MEMCTL_AGENT_CLIS_DIR:-.cache/agent-clis}"
PKGS=("@continuedev/cli@1.5.47" "@kilocode/cli@7.7.7")
if ! command -v npm >/dev/null; then
  echo "npm not found: the real-client tier (pytest -m agents) will skip" >&2
  exit 0
fi
if [ -x "$DIR/node_modules/.bin/cn" ] && [ -x "$DIR/node_modules/.bin/kilo" ] \
   && grep -q '"version": "1.5.47"' "$DIR/node_modules/@continuedev/cli/package.json" 2>/dev/null \
   && grep -q '"version": "7.7.7"' "$DIR/node_modules/@kilocode/cli/package.json" 2>/dev/null; then
  exit 0
fi
mkdir -p "$DIR"
[ -f "$DIR/package.json" ] || echo '{"name": "memctl-agent-clis", "private": true}' > "$DIR/package.json"
npm install --prefix "$DIR" --no-audit --no-fund --save-exact "${PKGS[@]}" >&2
