"""Kill `dvc repro` (SIGKILL, whole process group) while each data stage runs: the rerun (`qvl repro`, which
repairs DVC's own lock file if the kill truncated it) completes with the same dvc.lock hashes as an
uninterrupted run, and no half-written output is ever visible."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from stages.io import HOLD_BEFORE_PUBLISH
from tests.flows.helpers import ENV, clone_project, sh

pytestmark = pytest.mark.slow
DATA_STAGES = ["validate", "decode", "tokenize", "pack"]


def lock_hashes(root) -> dict:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in stages[name]["outs"]} for name in DATA_STAGES if name in stages}


def visible_outputs_complete(root) -> None:
    """Each stage's output directory is either absent or complete (its main file present)."""
    for folder, main in [
        ("validated", "samples.parquet"),
        ("frames", "index.parquet"),
        ("tokenized", "samples.parquet"),
        ("packed", "packs.parquet"),
    ]:
        if (root / "data" / folder).exists():
            assert (root / "data" / folder / main).is_file(), f"data/{folder} is visible but incomplete"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = clone_project(tmp_path_factory.mktemp("kill") / "project")
    sh(sys.executable, "-m", "dvc", "repro", "pack", cwd=root)
    return root, lock_hashes(root)


OUTPUT_OF = {"validate": "validated", "decode": "frames", "tokenize": "tokenized", "pack": "packed"}


def kill_mid_write(proc: subprocess.Popen, data, stage: str) -> None:
    """Wait until ``stage``'s temp output directory exists (the stage holds it unpublished: HOLD_BEFORE_PUBLISH),
    then SIGKILL the whole process group and check the kill landed while the stage was still running."""
    folder = OUTPUT_OF[stage]
    deadline = time.monotonic() + 600
    while not any(name.startswith(f".{folder}.tmp-") for name in os.listdir(data)):
        assert proc.poll() is None, f"dvc exited ({proc.returncode}) before {stage} wrote anything"
        assert time.monotonic() < deadline, f"{stage} never started writing"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the kill did not land: dvc had already finished"


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_sigkill_during_a_stage_then_rerun_gives_the_same_outputs(project, stage):
    """Killed while the stage provably writes (its complete temp directory exists, held unpublished by the
    fault-injection switch): nothing half-written is visible right after the kill, and the rerun gives the
    uninterrupted run's hashes and leaves no temp directory."""
    root, reference = project
    data = root / "data"
    for folder in ("validated", "media", "frames", "tokenized", "packed"):
        shutil.rmtree(data / folder, ignore_errors=True)
    (root / "dvc.lock").unlink()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--no-run-cache", "pack"],  # really run (not restore) each stage
        cwd=root,
        env={**ENV, HOLD_BEFORE_PUBLISH: OUTPUT_OF[stage]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        kill_mid_write(proc, data, stage)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a held stage never exits by itself
    assert [p for p in data.iterdir() if p.name.startswith(f".{OUTPUT_OF[stage]}.tmp-")], "the temp dir vanished"
    assert not (data / OUTPUT_OF[stage]).exists(), "a half-written output is visible"
    visible_outputs_complete(root)
    sh(sys.executable, "-m", "stages.cli", "repro", "pack", cwd=root)  # heals what the killed dvc left behind
    visible_outputs_complete(root)
    assert lock_hashes(root) == reference
    assert not [p for p in data.iterdir() if ".tmp-" in p.name], "a temp directory outlived the rerun"


def test_truncated_dvc_rwlock_is_repaired(project):
    """What a SIGKILL during DVC's lock bookkeeping leaves behind no longer blocks the rerun."""
    root, reference = project
    (root / ".dvc/tmp").mkdir(parents=True, exist_ok=True)
    (root / ".dvc/tmp/rwlock").write_text('{"read": {"data/valid')
    assert subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True).returncode != 0
    sh(sys.executable, "-m", "stages.cli", "repro", "pack", cwd=root)
    assert lock_hashes(root) == reference


def test_dvc_lock_cut_short_is_repaired(project):
    """What a SIGKILL while DVC rewrites dvc.lock leaves behind (seen: "dvc.lock validation failed")."""
    root, reference = project
    sh(sys.executable, "-m", "stages.cli", "repro", "pack", cwd=root)
    text = (root / "dvc.lock").read_text()
    cut = text.index("  tokenize:")
    (root / "dvc.lock").write_text(text[: text.index("\n", cut) + 1])  # cut right after "  tokenize:"
    assert subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True).returncode != 0
    sh(sys.executable, "-m", "stages.cli", "repro", "pack", cwd=root)
    assert lock_hashes(root) == reference
