"""How a stage's results travel between the pipeline's checkout and the GPU host's (orchestration.dvc_remote).

Large outputs (frames, packs, checkpoints) go through the DVC remote (`dvc push` / `dvc pull`). What says which
version to fetch travels through Prefect: the pipeline hands its params.yaml and dvc.lock to the GPU deployment
as parameters, and the GPU flow hands back the train stage's dvc.lock entry and its small uncached outputs
(metrics/train.json, plots/train_loss.csv) as a table artifact of its flow run. No git push is needed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from uuid import UUID

import yaml

from flows.stage_runner import StageFailed, dvc

DATA_STAGES = ("validate", "decode", "tokenize", "pack")
RECORD_KEY = "gpu-training-outputs"
ERROR = re.compile(r"ERROR: .*")


def _dvc(root: Path, *args: str) -> str:
    """`dvc <args>` in ``root``; a failure is a StageFailed with DVC's own error line."""
    proc = dvc(*args, project_dir=root, capture_output=True, text=True)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        line = m.group(0) if (m := ERROR.search(out)) else (out.strip().splitlines() or [""])[-1]
        raise StageFailed(f"dvc {' '.join(args)} failed in {root}: {line}")
    return proc.stdout


def _remote_args(root: Path, remote: str | None) -> list[str]:
    """``-r remote`` after checking it is configured (or that a default remote exists)."""
    listed = _dvc(root, "remote", "list")
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    if remote:
        if remote not in names:
            raise StageFailed(
                f"orchestration.dvc_remote {remote!r} is not a DVC remote in {root} (configured: "
                f"{', '.join(names) or 'none'}); add it with `dvc remote add {remote} URL`"
            )
        return ["-r", remote]
    if not names or not _default_remote(root):
        raise StageFailed(
            f"training on the GPU pool needs a DVC remote in {root}: set orchestration.dvc_remote or run "
            "`dvc remote add -d NAME URL`"
        )
    return []


def _default_remote(root: Path) -> str:
    proc = dvc("config", "core.remote", project_dir=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def push(root: Path, remote: str | None, stages: tuple[str, ...]) -> None:
    """Push the cached outputs of ``stages`` to the remote."""
    _dvc(root, "push", *_remote_args(root, remote), *stages)


def pull(root: Path, remote: str | None, stages: tuple[str, ...]) -> None:
    """Fetch and check out the outputs of ``stages`` as dvc.lock records them (replacing what is there)."""
    _dvc(root, "pull", "--force", *_remote_args(root, remote), *stages)


def git_commit(root: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def check_same_commit(root: Path, commit: str | None) -> None:
    """The GPU checkout runs the code the pipeline ran (else the train stage's code hash would differ)."""
    here = git_commit(root)
    if commit and here and here != commit:
        raise StageFailed(
            f"the GPU checkout {root} is at commit {here[:12]} but the pipeline runs {commit[:12]}: check out "
            "the same commit on the GPU host (the train stage's code must match)"
        )


SPEED_FILE = "metrics/train_speed.json"  # a top-level DVC metric: no lock entry, but the registry shows it


def train_record(root: Path) -> dict:
    """The train stage's dvc.lock entry and the text of its outputs that are files (the uncached metrics and
    plot; the checkpoint directory goes through the remote), and the GPU's speed figures."""
    entry = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]
    paths = [o["path"] for o in entry["outs"]] + [SPEED_FILE]
    return {"lock": entry, "files": {p: (root / p).read_bytes().decode() for p in paths if (root / p).is_file()}}


def publish_train_record(root: Path) -> None:
    from prefect.artifacts import create_table_artifact

    record = train_record(root)
    rows = [{"item": "dvc.lock: train", "content": json.dumps(record["lock"])}]
    rows += [{"item": path, "content": text} for path, text in record["files"].items()]
    create_table_artifact(rows, key=RECORD_KEY, description="the train stage's dvc.lock entry and small outputs")


def read_train_record(flow_run_id: UUID) -> dict:
    """The record `publish_train_record` left on the flow run ``flow_run_id``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[RECORD_KEY])
            )
        )
    if not found:
        raise StageFailed(f"the GPU training run {flow_run_id} left no {RECORD_KEY!r} artifact")
    rows = found[-1].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    files = {r["item"]: r["content"] for r in rows}
    return {"lock": json.loads(files.pop("dvc.lock: train")), "files": files}


def apply_train_record(root: Path, record: dict) -> None:
    """Write the train stage's lock entry and small outputs into ``root`` (then `pull` fetches the checkpoint)."""
    lock_path = root / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text())
    lock["stages"]["train"] = record["lock"]
    for path, text in record["files"].items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(text.encode())  # bytes as they were (the CSV's \r\n line ends included)
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
