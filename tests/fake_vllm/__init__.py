"""A fake vLLM image (busybox rootfs + entrypoint.sh) and a private Docker engine for the tests and bench."""
