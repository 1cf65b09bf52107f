#!/usr/bin/env bash
# The device benchmark in one command, from a copy of the working tree (no network needed):
#
#   bash bench/device_suite.sh [--out DIR] [--official-stylegan3 DIR] [...]   # ~7-8 min
#   bash bench/device_suite.sh --quick                                       # CPU, seconds
#
# Uses the machine's python3 with torch (CUDA) as it is. Pure-Python packages the machine
# lacks (smplx for the face model, ...) can travel as wheels in .whl/ (git-ignored): they are
# installed into a scratch folder first. Results: DIR/device_suite.json and device_suite.md
# (default bench/results, or $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/portrait-rig-site .whl/*.whl
    export PYTHONPATH=/tmp/portrait-rig-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "numpy", "numba", "smplx", "safetensors", "PIL")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"device_suite: missing Python packages: {', '.join(missing)} "
             "(put their wheels in .whl/, see bench/device_suite.sh)")
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu only'}")
PY
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1
out=${OUT:-bench/results}
exec "$PYTHON" bench/device_suite.py --out "$out" "$@"
