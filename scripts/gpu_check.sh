#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU: run from the repository root, under eight minutes.
#   scripts/gpu_check.sh [OUT_DIR]        (default runs/gpu-check; writes gpu_check.json and gpu_check.md there)
# It installs the project (with its test tools and triton) if this Python lacks it, and the siglip-kernel package to
# compare against (the check goes on without it: its rows then say why), then runs `siglip bench gpu`:
# the GPU tests, `siglip bench loss` in bfloat16 at d = 768 from n = 8192 up, and 100 training steps of the small
# preset with bfloat16 autocast. See src/siglip/bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
if ! "$PYTHON" -c "import siglip, pytest, triton" 2>/dev/null; then
    "$PYTHON" -m pip install -q -e '.[dev]'
fi
"$PYTHON" -m pip install -q siglip-kernel==0.1.2 \
    || echo "gpu_check: siglip-kernel could not be installed; its rows will say so" >&2
exec "$PYTHON" -m siglip bench gpu --out "${1:-runs/gpu-check}" "${@:2}"
