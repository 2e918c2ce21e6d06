"""`qwen_vl_pipeline`: the Prefect flow that runs the DVC stages in order and publishes their artifacts.

Run it in-process (`qvl run`, ephemeral Prefect), or deploy it (prefect.yaml) to a process work pool. With
`orchestration.gpu_deployment` set, training is dispatched to that deployment on the GPU pool (run_deployment):
the data stages' outputs are pushed to the DVC remote (`orchestration.dvc_remote`), the GPU flow pulls them, trains
and pushes the checkpoint, which is pulled back here before register (flows/gpu.py, flows/dvc_remote.py).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect._internal.control_listener import get_intent
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled, Completed, State

from flows import artifacts, dvc_remote
from flows.stage_runner import StageFailed, StagePlan, run_stage
from schemas.params import load_params
from stages.register import newest_registered

PROJECT = Path(__file__).resolve().parent.parent
STEP = re.compile(r"^step (\d+)/(\d+) loss")


def _stage(
    stage: str, project_dir: str, on_line: Callable[[str], None] | None = None, force: bool = False
) -> State | None:
    """Run ``stage`` through DVC; a flow-run cancellation (Prefect's SIGTERM, after the worker told this process
    it means "cancel") ends the task Cancelled instead of Crashed, once run_stage has stopped the stage's processes.
    The flow re-raises the signal (see `qwen_vl_pipeline`) so that Prefect finishes cancelling the flow run."""
    logger = get_run_logger()
    try:
        run_stage(stage, Path(project_dir), logger.info, on_line, warn=logger.warning, force=force)
    except TerminationSignal:
        if get_intent() != "cancel":
            raise
        logger.info(f"stage {stage}: cancelled, its processes are stopped")
        return Cancelled(message=f"stage {stage} cancelled with the flow run; its processes are stopped")
    return None


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=5)
def io_stage(stage: str, project_dir: str) -> State | None:
    """validate and decode read many files: transient I/O errors are retried (DVC skips finished work)."""
    return _stage(stage, project_dir)


@task(task_run_name="{stage}")
def compute_stage(stage: str, project_dir: str, force: bool = False) -> State | None:
    return _stage(stage, project_dir, force=force)


@task(task_run_name="{stage}")
def skipped_stage(stage: str) -> State:
    """A stage DVC would not run (unchanged since dvc.lock): still a task run, so the flow-run graph always
    reads validate -> decode -> tokenize -> pack -> train -> evaluate -> register."""
    message = f"stage {stage} skipped: up to date (unchanged since dvc.lock)"
    get_run_logger().info(message)
    return Completed(message=message)


@task(task_run_name="train")
def train_stage(project_dir: str) -> State | None:
    """Training with a live progress artifact (percent of steps done)."""
    progress = create_progress_artifact(progress=0.0, key="training-progress", description="training steps done")

    def on_line(line: str) -> None:
        if m := STEP.match(line):
            update_progress_artifact(progress, progress=100.0 * int(m.group(1)) / int(m.group(2)))

    return _stage("train", project_dir, on_line)


@task(task_run_name="train")
def dispatch_training(deployment: str, project_dir: str, remote: str | None) -> None:
    """Train on the GPU work pool and wait for it: push the data stages' outputs to the DVC remote, hand the GPU
    flow this run's params.yaml and dvc.lock, then take back its train lock entry and pull the checkpoint."""
    from prefect.deployments import run_deployment

    root = Path(project_dir)
    logger = get_run_logger()
    logger.info(f"pushing {', '.join(dvc_remote.DATA_STAGES)} outputs to the DVC remote")
    dvc_remote.push(root, remote, dvc_remote.DATA_STAGES)
    parameters = {
        "params_yaml": (root / "params.yaml").read_text(),
        "dvc_lock": (root / "dvc.lock").read_text(),
        "git_commit": dvc_remote.git_commit(root),
    }
    run = run_deployment(deployment, parameters=parameters)
    if not run.state.is_completed():
        raise StageFailed(f"training deployment {deployment} ended {run.state.name}: {run.state.message}")
    dvc_remote.apply_train_record(root, dvc_remote.read_train_record(run.id))
    dvc_remote.pull(root, remote, ("train",))
    logger.info(f"checkpoint from {deployment} (flow run {run.name}) pulled from the DVC remote")


@flow(name="qwen_vl_pipeline", log_prints=True)
def qwen_vl_pipeline(project_dir: str = str(PROJECT)) -> dict:
    """validate -> decode -> tokenize -> pack -> train -> evaluate -> register, each through `dvc repro`."""
    root = Path(project_dir)
    params = load_params(root / "params.yaml")
    plan = StagePlan(root)

    def stage(name: str, task_fn, *args, force: bool = False) -> None:
        run = plan.needs_run(name) or force
        state = task_fn(*args, return_state=True) if run else skipped_stage(name, return_state=True)
        if state.is_cancelled():  # the task caught the cancellation signal: the flow run is cancelled too
            raise TerminationSignal(signal.SIGTERM)
        state.result()  # a failed stage raises its error here

    stage("validate", io_stage, "validate", project_dir)
    artifacts.validation_table(root)
    stage("decode", io_stage, "decode", project_dir)
    stage("tokenize", compute_stage, "tokenize", project_dir)
    stage("pack", compute_stage, "pack", project_dir)
    artifacts.packing_summary(root)
    if params.orchestration.gpu_deployment:
        orch = params.orchestration
        stage("train", dispatch_training, orch.gpu_deployment, project_dir, orch.dvc_remote)
    else:
        stage("train", train_stage, project_dir)
    artifacts.loss_curve(root)
    stage("evaluate", compute_stage, "evaluate", project_dir)
    artifacts.generations_table(root)
    # The registry is this machine's log, which DVC does not hash: where register's inputs match dvc.lock (a fresh
    # clone reproducing a committed run bit for bit) DVC would skip it, so it is forced while the registry here
    # lacks the checkpoint the training left.
    missing = newest_registered(params, root) is None
    stage("register", compute_stage, "register", project_dir, missing, force=missing)
    return artifacts.registered_checkpoint(root, params)
