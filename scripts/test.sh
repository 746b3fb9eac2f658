#!/usr/bin/env bash
# The README's test command: set up (or reuse) the environment, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
