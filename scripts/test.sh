#!/usr/bin/env bash
# Set up the test environments if needed, then run the Flamenco job type tests (Node's test
# runner) and the test suite on every supported Blender:
# the whole suite once with Blender 5.0 (.venv), then the Blender tests (marker `blender`)
# again with Blender 4.2 LTS and 4.5 LTS (.venv-blender-4.2, .venv-blender-4.5). Arguments go
# to every pytest run. On a busy two-core machine the whole suite took 9.5 minutes and each
# further Blender (72 tests) about 2.2 more: under 15 minutes in all, plus the first set-up's
# downloads (a bpy wheel is 300-400 MB).
#   BLENDERS="4.5" scripts/test.sh ...   only these extra Blender versions ("" for none)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
blenders=${BLENDERS-4.2 4.5}
for line in $blenders; do
    bash scripts/setup.sh "blender-$line"
done
status=0
if command -v node >/dev/null; then
    echo "=== the Flamenco job types (node --test)"
    node --test farm/flamenco/ || status=$?
else
    echo "node not found: skipping the Flamenco job type tests" >&2
fi
echo "=== Blender 5.0 (.venv): the whole suite"
.venv/bin/python -m pytest "$@" || status=$?
for line in $blenders; do
    echo "=== Blender $line (.venv-blender-$line): the Blender tests"
    ".venv-blender-$line/bin/python" -m pytest -m blender "$@" || status=$?
done
exit "$status"
