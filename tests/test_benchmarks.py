"""The GPU training benchmark stays runnable: its --smoke mode runs the whole script (data through the real
stages, both paths, the longest-row search) with the tiny model on whatever device this machine has."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_benchmark_smoke_run_writes_its_figures(tmp_path):
    out = tmp_path / "train_gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(REPO / "benchmarks/train_gpu.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for path in ("full_path", "baseline"):
        assert result[path]["tokens_per_s"] > 0 and result[path]["steps"] == 2
    assert result["longest_row_with_liger"] >= result["packing_length"] // 2
    assert result["longest_row_without_liger"] >= result["packing_length"] // 2
