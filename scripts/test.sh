#!/usr/bin/env bash
# Set up the test environment if needed, then run the whole test suite: the Flamenco job
# types under Node's test runner (when Node.js is installed), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if command -v node >/dev/null; then
    node --test farm/flamenco/
else
    echo "node not found: skipping the Flamenco job type tests" >&2
fi
exec .venv/bin/python -m pytest "$@"
