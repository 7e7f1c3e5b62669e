#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv + deps, Debian packages, a private dockerd,
# ruff, pytest (unit, backend, Docker-engine and real-browser tests). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/apt-deps.sh
scripts/setup.sh --dev
.venv/bin/ruff check .
scripts/agent-clis.sh || echo "WARNING: the agent CLIs did not install; pytest -m agents will fail" >&2
D=$(mktemp -d /tmp/memctl-dockerd.XXXXXX)
trap 'scripts/dockerd.sh stop "$D"' EXIT
if DH=$(scripts/dockerd.sh start "$D"); then
  export MEMCTL_TEST_DOCKER_HOST="$DH"
else
  echo "WARNING: no private Docker engine could be started; Docker tests will skip" >&2
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest "$@"
