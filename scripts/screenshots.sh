#!/usr/bin/env bash
# Refresh the pictures in docs/: a real Prefect server on loopback (its own PREFECT_HOME in a temp dir), a process
# work pool, the pipeline deployed as `qwen_vl_pipeline/demo` from a temp clone of this checkout's committed HEAD
# (so the checkout's data/, dvc.lock and metrics are untouched; uncommitted edits are not in it), a worker,
# `prefect deployment run ... --watch`, then headless Chromium (Debian's `chromium`) on the flow-run page, the
# loss-curve artifact page and the `dvc plots show` page.
# Writes docs/prefect_flow_run.png, docs/prefect_loss_curve.png and docs/dvc_plots.png.
# A docs tool, not tested: run it and look at the pictures. Usage: bash scripts/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=$repo/.venv/bin
if ! command -v chromium >/dev/null; then
    echo "screenshots.sh needs Debian's chromium (apt-get install chromium)" >&2
    exit 1
fi
export PATH="$bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

tmp=$(mktemp -d)
pids=()
cleanup() {
    # SIGINT to each process group we started (a Prefect worker may hang on SIGTERM), SIGKILL after 30 s.
    for pid in "${pids[@]}"; do
        kill -INT -- "-$pid" 2>/dev/null || continue
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== clone and demo data in $tmp/project"
git clone -q "$repo" "$tmp/project"
project=$tmp/project
git -C "$project" config user.email docs@example.invalid
git -C "$project" config user.name docs
(cd "$project" && qvl setup-demo >/dev/null)

echo "== Prefect server"
export PREFECT_HOME=$tmp/home
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL=http://127.0.0.1:$port/api
mkdir -p "$PREFECT_HOME"
setsid prefect server start --host 127.0.0.1 --port "$port" >"$tmp/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 180); do
    curl -sf "$PREFECT_API_URL/health" >/dev/null && break
    kill -0 "${pids[0]}" 2>/dev/null || { cat "$tmp/server.log" >&2; exit 1; }
    sleep 0.5
done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "the Prefect server did not start" >&2; exit 1; }

echo "== work pool, deployment, worker"
prefect work-pool create local-pool --type process >/dev/null
(cd "$project" && python - "$project" <<'EOF'
import sys

from flows.pipeline import qwen_vl_pipeline

project = sys.argv[1]
qwen_vl_pipeline.from_source(project, entrypoint="flows/pipeline.py:qwen_vl_pipeline").deploy(
    name="demo", work_pool_name="local-pool", build=False, push=False, parameters={"project_dir": project}
)
EOF
) >/dev/null
(cd "$project" && exec setsid prefect worker start --pool local-pool >"$tmp/worker.log" 2>&1) &
pids+=($!)

echo "== prefect deployment run qwen_vl_pipeline/demo --watch"
(cd "$project" && prefect deployment run qwen_vl_pipeline/demo --watch --watch-timeout 1200) | tail -n 3
(cd "$project" && dvc plots show >/dev/null)

echo "== screenshots"
read -r flow_run artifact < <(python "$repo/scripts/screenshots.py" ids)
ui=http://127.0.0.1:$port
python "$repo/scripts/screenshots.py" shoot "$ui/runs/flow-run/$flow_run" "$repo/docs/prefect_flow_run.png"
python "$repo/scripts/screenshots.py" shoot "$ui/artifacts/artifact/$artifact" "$repo/docs/prefect_loss_curve.png"
python "$repo/scripts/screenshots.py" shoot "file://$project/dvc_plots/index.html" "$repo/docs/dvc_plots.png"
ls -l "$repo"/docs/*.png
