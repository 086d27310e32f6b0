#!/usr/bin/env bash
# One GPU node: train with the paper setup (or another config) through verl's trainer.
#   bash scripts/launch_single_node.sh [CONFIG_NAME] [hydra overrides...]
#   bash scripts/launch_single_node.sh visionleaf_qwen25vl_7b data.train_files=/data/deepeyes/train.parquet
set -euo pipefail
config=${1:-visionleaf_qwen25vl_7b}
shift || true
exec python -m visionleaf.train --config-name "$config" "$@"
