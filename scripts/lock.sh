#!/usr/bin/env bash
# Re-resolve every dependency (direct and transitive) into requirements.lock: run after editing pyproject.toml's
# dependencies. A fresh venv resolves pyproject.toml with pip (torch/torchvision come from the machine's local
# wheels through pip's own configuration, which uv does not read: see ../shared/DESIGN.md), then pins what it got.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" build' EXIT  # pip builds the non-editable install in ./build
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" install -q ".[dev]"
"$tmp/venv/bin/pip" uninstall -q -y qwenvl-pipeline torchcodec 2>/dev/null || true
{
  echo "# Every dependency of qwenvl-pipeline (with the dev extra), pinned: made by scripts/lock.sh, read by"
  echo "# scripts/install.sh. tests/test_lock.py fails when pyproject.toml and this file disagree."
  "$tmp/venv/bin/pip" freeze --exclude-editable | LC_ALL=C sort -f
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
