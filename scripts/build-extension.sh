#!/usr/bin/env bash
# Build the extension zip that users drag onto Blender 4.2 or newer (Edit > Preferences >
# Get Extensions > Install from Disk): dist/portrait_rig-<version>.zip, or into the folder
# given. Blender's own extension tool (from the bpy wheel) validates the manifest and packs
# the entry point, blender_rig/ and portrait_rig/ (blender_manifest.toml, [build]).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m portrait_rig_cli.extension --out "${1:-dist}"
