#!/usr/bin/env bash
# Debian packages the test suite needs: a Docker engine, busybox for the fake vLLM image, Chromium.
set -euo pipefail
PKGS=(docker.io busybox-static chromium chromium-driver fonts-noto-color-emoji)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
