#!/usr/bin/env bash
# Start or stop a local Ray head for aspkd-ray. Ray 2.59+ enables token auth for local clusters;
# `ray start --head` writes the token and clients on this machine pick it up.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=".venv/bin/ray"
case "${1:-start}" in
  start) "$RAY" start --head --include-dashboard=false "${@:2}" ;;
  stop) "$RAY" stop ;;
  status) "$RAY" status ;;
  *) echo "usage: $0 start|stop|status [ray start options]" >&2; exit 2 ;;
esac
