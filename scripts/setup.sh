#!/usr/bin/env bash
# Create .venv and install visionleaf (CPU torch, dev tools). Idempotent: does nothing when the venv is
# already up to date with pyproject.toml and constraints-cpu.txt. Takes ~2 minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.visionleaf-install"
want=$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "[setup] creating $venv and installing visionleaf (CPU torch 2.13.0, verl 0.9.1)..."
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first, pinned: the CPU build on disk. An unpinned torch pulls several GB of CUDA wheels.
"$venv/bin/pip" install -q -c constraints-cpu.txt torch
"$venv/bin/pip" install -q -c constraints-cpu.txt -e ".[dev]"
echo "$want" > "$stamp"
echo "[setup] done"
