"""What the registry says about the last run: its git commit names the code that ran (`-dirty` only when a tracked
source file differs from HEAD, never because the run rewrote dvc.lock, its metrics or plots, or because
params.yaml was edited: the params hash records that), and its newest row is the checkpoint the last training
left, even when an earlier run reached a higher step."""

import json
import shutil
import subprocess

from schemas.params import parse_params
from stages.register import git_commit, newest_registered, register
from stages.train.checkpoint import EXPORT_FILE, STATE_FILE


def git(root, *args):
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_dirty_only_when_tracked_source_differs(tmp_path):
    git(tmp_path, "init", "-q")
    files = ["dvc.lock", "params.yaml", "metrics/train.json", "plots/train_loss.csv", "stages/train/a.py"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git(tmp_path, "rev-parse", "HEAD")
    for name in files[:-1]:  # what a run (or `dvc exp run -S`) rewrites
        (tmp_path / name).write_text("v2\n")
    (tmp_path / "untracked.py").write_text("x\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "stages/train/a.py").write_text("v2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_outside_git_is_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"


def test_newest_row_is_the_last_trainings_checkpoint_not_the_highest_step(tmp_path):
    def checkpoint(step: int, loss: float) -> None:
        ckpt = tmp_path / f"output/demo/checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "history": [{"loss": loss}]}))

    params = parse_params({})
    checkpoint(6, 1.0)
    assert register(params, tmp_path)[-1]["step"] == 6
    shutil.rmtree(tmp_path / "output/demo")  # a changed config: training started fresh and stopped at step 2
    checkpoint(2, 2.0)
    rows = register(params, tmp_path)
    assert [r["step"] for r in rows] == [6, 2] and rows[-1]["metrics"]["loss"] == 2.0
    assert newest_registered(params, tmp_path)["id"] == rows[-1]["id"]


def test_export_row_is_the_checkpoint_its_weights_are_from_with_the_evaluate_metrics(tmp_path):
    """With load_best_model_at_end the export holds an earlier step's weights: hf_path and the evaluate stage's
    metrics go to that checkpoint's row, every row keeps its own eval loss, the newest keeps train.json's."""
    for step, eval_loss in ((2, 1.5), (4, 1.9)):
        ckpt = tmp_path / f"output/demo/checkpoint-{step}"
        ckpt.mkdir(parents=True)
        history = [{"step": step, "loss": 2.0, "eval_loss": eval_loss}]
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "history": history}))
    (tmp_path / "output/demo/hf").mkdir()
    (tmp_path / "output/demo/hf" / EXPORT_FILE).write_text(json.dumps({"step": 2}))
    (tmp_path / "metrics").mkdir()
    evaluated = {"model": "output/demo/hf", "step": 2, "eval_loss": 1.5}
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(evaluated))
    (tmp_path / "metrics/train.json").write_text(json.dumps({"final_loss": 2.0, "best_eval_step": 2}))
    best, newest = register(parse_params({}), tmp_path)
    assert (best["step"], best["hf_path"], best["metrics"]["evaluate"]) == (2, "output/demo/hf", evaluated)
    assert (newest["step"], newest["hf_path"], newest["metrics"]["best_eval_step"]) == (4, None, 2)
    assert (best["metrics"]["eval_loss"], newest["metrics"]["eval_loss"]) == (1.5, 1.9)
    assert "evaluate" not in newest["metrics"]
