#!/usr/bin/env bash
# The main job on the bundled demo data: install, build the demo data and tiny models, run the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/qvl setup-demo
PATH="$PWD/.venv/bin:$PATH" .venv/bin/qvl run
