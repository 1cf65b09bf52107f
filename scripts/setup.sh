#!/usr/bin/env bash
# Create (or update) the project's virtual environments.
#   scripts/setup.sh              .venv: the server, Blender 5.0 as a module (the headless demo)
#                                 and the core
#   scripts/setup.sh test         .venv as above plus the test tools
#   scripts/setup.sh blender-4.2  .venv-blender-4.2: the test environment with Blender 4.2 LTS
#   scripts/setup.sh blender-4.5  .venv-blender-4.5: the same with Blender 4.5 LTS
#
# A Blender environment holds only its bpy wheel; a .pth file puts the test environment's
# packages (torch, the server, pytest ...) behind it, so the same tests and the same render
# server subprocesses run against another Blender. It needs `setup.sh test` first.
set -euo pipefail
cd "$(dirname "$0")/.."
# Blender as a module exists for CPython 3.11 only (Blender 4.2 to 5.0 bundle 3.11).
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
# The newest patch release of each supported Blender line on PyPI; 5.0 is pinned in
# pyproject.toml (the `blender` extra). Each wheel is 300-400 MB, installed once.
declare -A BPY=([4.2]=4.2.23 [4.5]=4.5.15)
mode=${1:-run}

if [[ $mode == blender-* ]]; then
    line=${mode#blender-}
    pin=${BPY[$line]:-}
    if [ -z "$pin" ]; then
        echo "setup.sh: no Blender $line environment (known: ${!BPY[*]}; 5.0 is .venv)" >&2
        exit 2
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "setup.sh: $mode layers on .venv: run 'scripts/setup.sh test' first" >&2
        exit 2
    fi
    env=.venv-$mode
    stamp=$env/.setup-$pin
    if [ -f "$stamp" ] && [ "$stamp" -nt "$0" ]; then
        exit 0
    fi
    [ -x "$env/bin/python" ] || .venv/bin/python -m venv "$env"
    rm -f "$env"/.setup-* "$env"/lib/python3*/site-packages/portrait_rig_base.pth
    # No dependencies: numpy, requests and zstandard come from .venv (the bpy wheels
    # declare no NumPy bound, and bpy fails to import under NumPy 2).
    "$env/bin/python" -m pip install --disable-pip-version-check -q --no-deps "bpy==$pin"
    base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # addsitedir also runs .venv's own .pth files (the editable install of this project);
    # the directory goes after this environment's own, so its bpy wins.
    echo "import site; site.addsitedir('$base')" > "$site/portrait_rig_base.pth"
    "$env/bin/python" -c "import bpy, sys; assert bpy.app.version_string.startswith('$line'), \
bpy.app.version_string; print('Blender', bpy.app.version_string, 'in $env')"
    touch "$stamp"
    exit 0
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
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
