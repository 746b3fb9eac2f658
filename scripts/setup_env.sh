#!/usr/bin/env bash
# Create or reuse .venv and install aspkd-ray with its test tools. Idempotent: reinstalls only
# when pyproject.toml changed. Override the torch pins with ASPKD_TORCH_SPEC (e.g. on a GPU
# cluster with its own CUDA build): ASPKD_TORCH_SPEC="torch torchvision".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ASPKD_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.aspkd-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing aspkd-ray and its dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q ${ASPKD_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1} \
    -e ".[dev]"
  echo "$want" > "$stamp"
fi
