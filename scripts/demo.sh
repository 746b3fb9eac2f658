#!/usr/bin/env bash
# The README's main command: set up (or reuse) the environment, then run the main job on the
# embedded default scenario (digits). Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if .venv/bin/aspkd demo --help >/dev/null 2>&1; then
  exec .venv/bin/aspkd demo --config tune_configs/digits.yaml "$@"
fi
exec .venv/bin/aspkd train-teacher --config tune_configs/digits.yaml "$@"
