"""`train_on_gpu`: the deployment a GPU worker runs in its own checkout of the project (prefect.yaml sets the
working directory from QVL_GPU_PROJECT_DIR): take the dispatching run's params.yaml and dvc.lock, pull the data
stages' outputs from the DVC remote, train, push the checkpoint, and leave the train stage's lock entry and
metrics on the flow run for the pipeline (flows/dvc_remote.py)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows import dvc_remote
from flows.stage_runner import run_stage
from schemas.params import load_params

PROJECT = Path(__file__).resolve().parent.parent


@flow(name="train_on_gpu")
def train_on_gpu(
    params_yaml: str | None = None,
    dvc_lock: str | None = None,
    git_commit: str | None = None,
    project_dir: str = str(PROJECT),
) -> None:
    """Without ``params_yaml`` / ``dvc_lock`` it trains what this checkout's own files describe."""
    root = Path(project_dir)
    logger = get_run_logger()
    dvc_remote.check_same_commit(root, git_commit)
    if params_yaml is not None:
        (root / "params.yaml").write_text(params_yaml)
    if dvc_lock is not None:
        (root / "dvc.lock").write_text(dvc_lock)
    remote = load_params(root / "params.yaml").orchestration.dvc_remote
    logger.info(f"pulling {', '.join(dvc_remote.DATA_STAGES)} outputs from the DVC remote into {root}")
    dvc_remote.pull(root, remote, dvc_remote.DATA_STAGES)
    run_stage("train", root, logger.info, warn=logger.warning)  # a cancel: run_stage stops the ranks, Prefect the flow
    dvc_remote.push(root, remote, ("train",))
    dvc_remote.publish_train_record(root)
    logger.info("checkpoint pushed to the DVC remote")
