#!/usr/bin/env bash
# Many GPU nodes: submit the training job to a running Ray cluster (start it with `ray start --head` on
# one node and `ray start --address=HEAD:6379` on the others). The address comes from RAY_ADDRESS.
#   RAY_ADDRESS=http://HEAD:8265 NNODES=4 bash scripts/launch_multinode.sh visionleaf_qwen25vl_7b data.train_files=...
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address of the head node, e.g. http://HEAD:8265}"
config=${1:-visionleaf_qwen25vl_7b}
shift || true
nnodes=${NNODES:-2}
gpus=${GPUS_PER_NODE:-8}
root="$(cd "$(dirname "$0")/.." && pwd)"
exec ray job submit --address "$RAY_ADDRESS" \
  --runtime-env-json "{\"working_dir\": \"$root\", \"excludes\": [\".venv\", \".venv-vllm\", \"outputs\"], \"env_vars\": {\"HF_HUB_OFFLINE\": \"1\"}}" \
  -- python -m visionleaf.train --config-name "$config" trainer.nnodes="$nnodes" trainer.n_gpus_per_node="$gpus" "$@"
