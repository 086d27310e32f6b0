#!/usr/bin/env bash
# The embedded default: verl's trainer on CPU with the tiny Qwen2.5-VL (set up first with scripts/setup.sh).
#   bash scripts/train_tiny_cpu.sh [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m visionleaf.train --config-name tiny_cpu "$@"
