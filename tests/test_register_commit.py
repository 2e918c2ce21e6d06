"""The registry's git commit names the code that ran: `-dirty` only when a tracked source file differs from HEAD,
never because the run rewrote dvc.lock, its metrics or plots, or because params.yaml was edited (the params hash
records that)."""

import subprocess

from stages.register import git_commit


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
