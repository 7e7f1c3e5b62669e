#!/usr/bin/env bash
# Start/stop a private Docker engine for the tests (own data root, exec root, socket, pidfile;
# no iptables, no bridge forwarding). A stub nvidia-container-runtime-hook on its PATH makes it
# register its nvidia driver, so GPU DeviceRequests are accepted on a machine with no GPU.
#   scripts/dockerd.sh start DIR   -> prints the DOCKER_HOST to use
#   scripts/dockerd.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}; D=${2:?directory}
case "$cmd" in
start)
  mkdir -p "$D/hook"
  printf '#!/bin/sh\ncat >/dev/null; exit 0\n' > "$D/hook/nvidia-container-runtime-hook"
  chmod +x "$D/hook/nvidia-container-runtime-hook"
  start_daemon() {
    PATH="$D/hook:$PATH" dockerd --data-root "$D/data" --exec-root "$D/exec" -H "unix://$D/docker.sock" \
      --pidfile "$D/dockerd.pid" --iptables=false --ip-forward=false --bridge=none \
      --storage-driver="$1" >"$D/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
      if docker -H "unix://$D/docker.sock" info >/dev/null 2>&1; then return 0; fi
      if ! kill -0 $! 2>/dev/null; then return 1; fi
      sleep 0.5
    done
    return 1
  }
  # vfs always works on this kind of machine; overlay2 is faster where the kernel allows it.
  if ! start_daemon "${MEMCTL_TEST_STORAGE_DRIVER:-vfs}"; then
    echo "dockerd failed to start; log:" >&2; tail -20 "$D/dockerd.log" >&2; exit 1
  fi
  echo "unix://$D/docker.sock"
  ;;
stop)
  if [[ -f "$D/dockerd.pid" ]]; then
    pid=$(cat "$D/dockerd.pid")
    # remove whatever containers are left (tests should have), then stop the daemon
    docker -H "unix://$D/docker.sock" ps -aq 2>/dev/null | xargs -r docker -H "unix://$D/docker.sock" rm -f >/dev/null 2>&1 || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  { grep -o " $D/[^ ]*" /proc/mounts 2>/dev/null || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$D"
  ;;
esac
