#!/usr/bin/env bash
# Many GPU nodes: submit the training job to a running Ray cluster (start it with `ray start --head` on
# one node and `ray start --address=HEAD:6379` on the others; every node runs docker/Dockerfile's image or
# has visionleaf installed). The address comes from RAY_ADDRESS; this checkout is the job's working_dir.
#   RAY_ADDRESS=http://HEAD:8265 NNODES=4 bash scripts/launch_multinode.sh visionleaf_qwen25vl_7b data.train_files=...
#   DRY_RUN=1 RAY_ADDRESS=... bash scripts/launch_multinode.sh ...   # print the runtime env and command, submit nothing
# NNODES (default 2) and GPUS_PER_NODE (default 8) become trainer.nnodes and trainer.n_gpus_per_node.
set -euo pipefail

# quote: the arguments as one shell command line (shared with the other launcher).
source "$(dirname "$0")/quote.sh"

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address of the head node, e.g. http://HEAD:8265}"
config=${1:-visionleaf_qwen25vl_7b}
shift || true
nnodes=${NNODES:-2}
gpus=${GPUS_PER_NODE:-8}
root="$(cd "$(dirname "$0")/.." && pwd)"
root_json=${root//\\/\\\\}
root_json=${root_json//\"/\\\"}
# Uploaded with the job: the checkout without venvs, run outputs and git history. Models come from each
# node's Hugging Face cache (HF_HUB_OFFLINE=1: no download in the middle of a run).
runtime_env="{\"working_dir\": \"$root_json\", \"excludes\": [\".git\", \".venv\", \".venv-vllm\", \"outputs\"], \"env_vars\": {\"HF_HUB_OFFLINE\": \"1\"}}"
command=(ray job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env" --
  python -m visionleaf.train --config-name "$config" trainer.nnodes="$nnodes" trainer.n_gpus_per_node="$gpus" "$@")
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  printf 'runtime env: %s\n' "$runtime_env"
  printf '%s\n' "$(quote "${command[@]}")"
  exit 0
fi
exec "${command[@]}"
