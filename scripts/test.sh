#!/usr/bin/env bash
# The test suite: install, lint, then pytest on pytest-xdist workers (GPU tests skip without CUDA).
#   bash scripts/test.sh          everything (what CI runs)
#   bash scripts/test.sh --fast   the fast tier: unit and model tests only (no torchrun, DVC or Prefect processes)
# Further arguments go to pytest (e.g. -k decode); QVL_TEST_WORKERS sets the worker count. The default is
# pytest-xdist's "auto" (the host's physical cores, through psutil), capped by the CPUs this process may use (its
# affinity and cgroup quota, stages/cpus.py), which a CI container may hold below the host's count.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/ruff check .
tier=()
if [ "${1:-}" = "--fast" ]; then
  shift
  tier=(-m "unit or model")
fi
workers=${QVL_TEST_WORKERS:-$(.venv/bin/python -c 'import psutil
from stages.cpus import available_cpus
print(min(filter(None, (available_cpus(), psutil.cpu_count(logical=False)))))')}
.venv/bin/python -m pytest -q -n "$workers" --dist loadgroup --durations=25 "${tier[@]}" "$@"
