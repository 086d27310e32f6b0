#!/usr/bin/env bash
# One GPU node: train with the paper setup (or another config) through verl's trainer.
#   bash scripts/launch_single_node.sh [CONFIG_NAME] [hydra overrides...]
#   bash scripts/launch_single_node.sh visionleaf_qwen25vl_7b data.train_files=/data/deepeyes/train.parquet
#   DRY_RUN=1 bash scripts/launch_single_node.sh ...   # print the command, run nothing
# PYTHON names the interpreter (default: python on PATH).
set -euo pipefail

# quote: the arguments as one shell command line (shared with the other launcher).
source "$(dirname "$0")/quote.sh"

config=${1:-visionleaf_qwen25vl_7b}
shift || true
command=("${PYTHON:-python}" -m visionleaf.train --config-name "$config" "$@")
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  printf '%s\n' "$(quote "${command[@]}")"
  exit 0
fi
exec "${command[@]}"
