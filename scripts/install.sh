#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Idempotent: a second run only checks.
# Versions come from requirements.lock (every dependency, pinned); torch/torchvision resolve from the machine's
# local wheels at those versions (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.qvl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  # Every dependency at its locked version (scripts/lock.sh re-resolves), then the project itself.
  .venv/bin/pip install -q -r requirements.lock
  .venv/bin/pip install -q --no-deps -e ".[dev]"
  # torchcodec (if something pulled it in) is CUDA-linked and breaks qwen-vl-utils' reader choice.
  .venv/bin/pip uninstall -q -y torchcodec 2>/dev/null || true
  touch "$stamp"
fi
