"""Training checkpoints on a real full filesystem (a small tmpfs), and checkpoints that do not depend on their path.

The checkpoint code runs in a one-rank gloo process group in a subprocess (DCP needs a process group).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

WORKER = REPO / "tests/stages/checkpoint_disk_worker.py"


def run_worker(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_checkpoint_is_a_clear_error_and_keeps_the_previous_one(small_fs):
    run_dir = small_fs / "run"
    run_dir.mkdir()
    report = run_worker("full", str(run_dir))
    assert report["warning"] and "a checkpoint needs about" in report["warning"]
    assert report["error"] and report["error"].startswith("disk full while writing checkpoint")
    assert str(run_dir / "checkpoint-2") in report["error"] and "needs about" in report["error"]
    assert report["left"] == ["checkpoint-1"]  # no temp dir, the previous checkpoint still there
    assert report["intact"] and report["loaded_step"] == 1


def test_checkpoint_bytes_do_not_depend_on_the_directory(tmp_path):
    report = run_worker("portable", str(tmp_path / "a"), str(tmp_path / "elsewhere" / "b"))
    assert report["same"], report["differ"]
