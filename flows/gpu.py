"""`train_on_gpu`: the deployment a GPU worker runs: pull the inputs from the DVC remote, train, push back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from flows.stage_runner import run_stage

PROJECT = Path(__file__).resolve().parent.parent


@flow(name="train_on_gpu")
def train_on_gpu(project_dir: str = str(PROJECT)) -> None:
    logger = get_run_logger()
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "pull", "pack", "decode", "validate"], cwd=project_dir, check=True)
    run_stage("train", Path(project_dir), logger.info)
    subprocess.run([*dvc, "push", "train"], cwd=project_dir, check=True)
