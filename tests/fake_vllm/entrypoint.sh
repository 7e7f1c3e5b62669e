#!/bin/sh
# Fake vLLM OpenAI server for memctl's Docker tests (busybox only, no network needed).
#
# Takes the arguments `vllm serve` takes (model first, then --flags), records them, and serves
#   /health           200 once "ready" (vLLM: the port opens only after the weights load)
#   /v1/models        {"data":[{"id": <--served-model-name>, ...}]}
#   /fake/args        the argv it got, one per line
#   /fake/env         its environment, sorted
#   /fake/last_request   the body of the last POST
#   POST /v1/chat/completions, /v1/completions   streamed or not, with a scripted tool call (serve.sh)
# Behaviour by environment:
#   FAKE_VLLM_START_DELAY_S=N   "load weights" for N seconds (log lines, port closed) first
#   FAKE_VLLM_CRASH=oom|kv|maxlen   exit 1 with the vLLM-style error line for that failure
#   FAKE_VLLM_NEVER_READY=1     serve, but /health stays 404 (never healthy)
mkdir -p /www/v1 /www/fake /tmp
: > /www/fake/last_request
: > /www/fake/args
for a in "$@"; do printf '%s\n' "$a" >> /www/fake/args; done
env | sort > /www/fake/env

model=""; port=8000; host=0.0.0.0; served=""; maxlen=2048
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --served-model-name) served=$2; shift 2 ;;
    --max-model-len) maxlen=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --*)
      # a --flag followed by a value that is not itself a flag
      if [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; then shift 2; else shift; fi ;;
    *) [ -z "$model" ] && model=$1; shift ;;
  esac
done
[ -z "$served" ] && served=$model

echo "INFO [api_server.py] vLLM API server version 0.0.0+fake"
echo "INFO [api_server.py] model=$model served_model_name=$served host=$host port=$port"

if [ -n "$FAKE_VLLM_START_DELAY_S" ]; then
  echo "INFO [gpu_model_runner.py] Starting to load model $model..."
  sleep "$FAKE_VLLM_START_DELAY_S"
  echo "INFO [gpu_model_runner.py] Model loading took 0.5 GiB and $FAKE_VLLM_START_DELAY_S seconds"
fi

case "$FAKE_VLLM_CRASH" in
  oom)
    echo "ERROR [core.py] EngineCore failed to start." >&2
    echo "Traceback (most recent call last):" >&2
    echo '  File "/usr/local/lib/python3.12/dist-packages/vllm/worker/gpu_worker.py", line 210, in load_model' >&2
    echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.64 GiB of which 1.02 GiB is free." >&2
    exit 1 ;;
  kv)
    echo "ERROR [core.py] EngineCore failed to start." >&2
    echo "ValueError: No available memory for the cache blocks. Try increasing \`gpu_memory_utilization\` when initializing the engine." >&2
    exit 1 ;;
  maxlen)
    echo "ERROR [core.py] EngineCore failed to start." >&2
    echo "ValueError: To serve at least one request with the models's max seq len ($maxlen), (4.00 GiB KV cache is needed, which is larger than the available KV cache memory (1.50 GiB). Based on the available memory, the estimated maximum model length is 1024. Try increasing \`gpu_memory_utilization\` or decreasing \`max_model_len\` when initializing the engine." >&2
    exit 1 ;;
esac

printf '{"object":"list","data":[{"id":"%s","object":"model","owned_by":"vllm","root":"%s","max_model_len":%s}]}\n' \
  "$served" "$model" "$maxlen" > /www/v1/models
if [ "$FAKE_VLLM_NEVER_READY" != "1" ]; then : > /www/health; fi
echo "INFO [launcher.py] Starting vLLM API server on http://$host:$port"
echo "INFO:     Application startup complete."
if [ "$host" = "0.0.0.0" ]; then
  # In its own network namespace (ports published on loopback by Docker): the full fake, chat included;
  # busybox nc forks serve.sh per connection (it cannot bind one address, hence only here).
  exec nc -ll -p "$port" -e /serve.sh
fi
# Host networking: listen on the one address asked for; static files only (no chat).
exec httpd -f -p "$host:$port" -h /www
