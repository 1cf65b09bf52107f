#!/usr/bin/env bash
# Set up if needed, then serve the demo head with the preview backend on 127.0.0.1:7865.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/portrait-rig-server --model demo --backend preview "$@"
