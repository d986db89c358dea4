#!/usr/bin/env bash
# Set up .venv/ if needed, then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
exec python -m pytest "$@"
