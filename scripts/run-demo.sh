#!/usr/bin/env bash
# Set up if needed, then render the demo performance headless into renders/ (or the folder given).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/portrait-rig demo --out "${1:-renders/}"
