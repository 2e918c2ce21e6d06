"""Orchestration overhead (issue 7): a fully cached rerun through `dvc repro` and through the Prefect flow
(`qvl run`, ephemeral Prefect), and the flow's overhead over the stages run directly.

Usage (in a project where the demo pipeline has run once): python benchmarks/orchestration_bench.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def timed(*cmd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=ENV)
    return time.perf_counter() - start


def main() -> None:
    if not Path("dvc.lock").is_file():
        sys.exit("run the demo pipeline once first (bash scripts/demo.sh)")
    dvc = min(timed(sys.executable, "-m", "dvc", "repro") for _ in range(3))
    flow = min(timed(sys.executable, "-m", "stages.cli", "run") for _ in range(2))
    status = min(timed(sys.executable, "-m", "dvc", "status") for _ in range(3))
    print(f"cached rerun through dvc repro: {dvc:.2f} s (goal < 3 s)")
    print(f"cached rerun through the Prefect flow (qvl run, ephemeral): {flow:.2f} s (goal < 15 s)")
    print(
        f"Prefect overhead over the same cached stages: {flow - dvc:.2f} s (six tasks, artifacts, temporary "
        f"server); dvc status alone: {status:.2f} s"
    )


if __name__ == "__main__":
    main()
