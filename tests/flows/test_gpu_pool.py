"""The GPU-pool path end to end with real components: a Prefect server, two process work pools deployed from
prefect.yaml, the pipeline's worker in clone A and the "gpu" worker in clone B (which holds no pipeline data),
a local DVC remote between them. Training must run in B on data that came through the remote, and the
checkpoint must come back to A through the remote, where register records it with its lineage."""

import hashlib
import sys

import pytest
import yaml

from tests.flows.helpers import BIN, clone_project, edit_params, prefect_server, read_artifacts, sh, start, stop

pytestmark = pytest.mark.slow
DATA = ("data/validated", "data/media", "data/frames", "data/tokenized", "data/packed")


def tree_digest(folder) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def train_lock(root) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]


def test_training_dispatched_to_the_gpu_pool_travels_through_the_dvc_remote(tmp_path):
    a = clone_project(tmp_path / "a", max_steps=2, save_steps=1)
    b = clone_project(tmp_path / "b", max_steps=2, save_steps=1)
    assert not any((b / d).exists() for d in DATA) and not (b / "output").exists()
    remote = tmp_path / "dvc-remote"
    for clone in (a, b):
        sh(sys.executable, "-m", "dvc", "remote", "add", "--local", "storage", str(remote), cwd=clone)
    edit_params(a, orchestration={"gpu_deployment": "train_on_gpu/train-gpu", "dvc_remote": "storage"})
    prefect = str(BIN / "prefect")
    with prefect_server(tmp_path / "prefect-home") as env:
        env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
        for pool in ("process-pool", "gpu"):
            sh(prefect, "work-pool", "create", pool, "--type", "process", cwd=tmp_path, env=env)
        # The GPU deployment's directory is left to the GPU worker's environment (QVL_GPU_PROJECT_DIR).
        sh(prefect, "--no-prompt", "deploy", "--all", cwd=a, env={**env, "QVL_PROJECT_DIR": str(a)})
        worker_a = start(
            prefect, "worker", "start", "--pool", "process-pool", cwd=a, env={**env, "QVL_PROJECT_DIR": str(a)},
            log=tmp_path / "worker-a.log",
        )  # fmt: skip
        worker_b = start(
            prefect, "worker", "start", "--pool", "gpu", cwd=b, env={**env, "QVL_GPU_PROJECT_DIR": str(b)},
            log=tmp_path / "worker-b.log",
        )  # fmt: skip
        try:
            run = sh(
                prefect, "deployment", "run", "qwen_vl_pipeline/demo", "--watch", "--watch-timeout", "800",
                cwd=a, env=env, timeout=900,
            )  # fmt: skip
            assert "Completed" in run.stdout + run.stderr, (tmp_path / "worker-a.log").read_text()[-3000:]
            found = read_artifacts(a, env)
        finally:
            stop(worker_a)
            stop(worker_b)
    log_a, log_b = (tmp_path / "worker-a.log").read_text(), (tmp_path / "worker-b.log").read_text()
    # Training ran in B, on the data A produced (which reached B only through the remote).
    assert "Running stage 'train'" in log_b and "Running stage 'train'" not in log_a
    assert "Running stage 'validate'" in log_a and "Running stage 'validate'" not in log_b
    for folder in ("data/frames", "data/tokenized", "data/packed"):
        assert tree_digest(b / folder) == tree_digest(a / folder), folder
    # The checkpoint came back to A through the remote, with B's lock entry and metrics.
    assert train_lock(a) == train_lock(b)
    assert tree_digest(a / "output/demo") == tree_digest(b / "output/demo")
    assert (a / "output/demo/checkpoint-2").is_dir() and (a / "output/demo/hf").is_dir()
    assert (a / "metrics/train.json").read_text() == (b / "metrics/train.json").read_text()
    assert any(remote.rglob("*")) and "checkpoint pushed to the DVC remote" in log_b
    # Register ran in A only, with the lineage of A's data stages.
    from stages.register import read_registry

    rows = read_registry(a / "registry/registry.duckdb")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["hf_path"] == "output/demo/hf"
    hashes = rows[-1]["data_hashes"]
    lock = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    assert hashes["pack"]["data/packed"] == next(o["md5"] for o in lock["pack"]["outs"] if o["path"] == "data/packed")
    assert not (b / "registry").exists()
    assert {"registered-checkpoint", "loss-curve", "gpu-training-outputs"} <= set(found)
    assert "demo@2-" in found["registered-checkpoint"]
    # A's DVC state is consistent: nothing left to run.
    assert "up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=a).stdout
