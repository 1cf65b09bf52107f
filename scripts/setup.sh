#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#   scripts/setup.sh          the server, Blender as a module (for the headless demo) and the core
#   scripts/setup.sh test     the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
# bpy 5.0.1 (Blender 5.0 as a Python module) exists for CPython 3.11 only.
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
mode=${1:-run}
stamp=.venv/.setup-$mode
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then
    exit 0
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first and pinned: the server extra accepts any torch >= 2.2, and an unpinned request
# would pull the newest build instead of the one this project is tested with.
"${pip[@]}" "torch==2.13.0"
extras=server,render,blender
[ "$mode" = test ] && extras=test,blender
# bpy needs NumPy 1.x but does not declare it.
"${pip[@]}" "numpy<2" -e ".[$extras]"
touch "$stamp"
