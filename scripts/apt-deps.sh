#!/usr/bin/env bash
# System tools the test suite needs: a Docker engine (dockerd + docker CLI), busybox for the fake vLLM
# image, Chromium for the browser test, Node.js + npm for the Node client test. Each is checked by what it
# provides, not by a package name: a machine with Docker Engine (docker-ce), Chrome-less Chromium builds or
# a Node from elsewhere is left alone; only what is missing is installed, with Debian's packages.
set -euo pipefail
missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have dockerd && have docker || missing+=(docker.io)
static_busybox() {  # the fake vLLM image needs a statically linked busybox
  local b out
  for b in /bin/busybox /usr/bin/busybox "$(command -v busybox 2>/dev/null || true)"; do
    [[ -n "$b" && -x "$b" ]] || continue
    out=$(LC_ALL=C ldd "$b" 2>&1 || true)  # ldd exits 1 for a static binary
    [[ "$out" == *"not a dynamic executable"* ]] && return 0
  done
  return 1
}
static_busybox || missing+=(busybox-static)
have chromium || missing+=(chromium chromium-driver)
fc-list 2>/dev/null | grep -qi "color emoji" || missing+=(fonts-noto-color-emoji)
have node && have npm || missing+=(nodejs npm)
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
