#!/usr/bin/env bash
# One command for a CUDA machine; installs nothing. Runs the GPU tests, a 1-GPU `qvl train` of the demo through
# torchrun and the training benchmark (Qwen2.5-VL-3B architecture, 16k packs) in at most 8 minutes on one
# H100/H200, and writes every result as JSON under one folder (see benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh [OUT_DIR]            # default: $OUT, else ./gpu_check_results
#   benchmarks/gpu_check.sh --smoke [OUT_DIR]    # any machine, tiny models (CPU: under 3 minutes; CI runs it)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec "$python" "$repo/benchmarks/gpu_check.py" "$@"
