"""How the flow runs one stage (flows/stage_runner.py): `dvc repro --single-item` in a real git + DVC repository;
a failing stage becomes StageFailed carrying the stage's own error line, and its lines reach the flow's log."""

import sys

import pytest
import yaml

from flows.stage_runner import StageFailed, run_stage
from tests.conftest import REPO
from tests.flows.helpers import sh


@pytest.fixture
def repo(tmp_path):
    sh("git", "init", "-q", cwd=tmp_path)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=tmp_path)
    stage = {"cmd": f"{sys.executable} -m stages.validate --params params.yaml", "outs": ["data/validated"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"validate": stage}}))
    return tmp_path


def test_a_failing_stage_fails_with_its_own_error_line(repo, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (repo / "params.yaml").write_text("dataset_config:\n  datasets: [{path: data/nope.jsonl}]\n")
    logged = []
    with pytest.raises(StageFailed) as err:
        run_stage("validate", repo, logged.append)
    assert str(err.value).startswith("stage validate failed (exit ")
    assert "qvl validate: error: dataset file not found:" in str(err.value) and "nope.jsonl" in str(err.value)
    assert any("dataset file not found" in line for line in logged)  # the stage's lines reached the log


def test_a_stage_that_succeeds_streams_its_lines(repo, monkeypatch, demo_dir):
    import shutil

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    shutil.copytree(demo_dir, repo / "data/demo")
    params = {"dataset_config": {"datasets": [{"path": "data/demo/chat.jsonl", "data_folder": "data/demo"}]}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    logged, seen = [], []
    run_stage("validate", repo, logged.append, seen.append)
    assert set(logged) <= set(seen) and any("Running stage 'validate'" in line for line in logged)
    assert (repo / "data/validated/samples.parquet").is_file()


def test_dvc_git_advice_and_blank_lines_are_not_logged_and_warnings_go_to_warn(tmp_path):
    """What reaches the flow's log: the stage's lines without DVC's "git add dvc.lock" advice or blank lines;
    a warning (DVC's, or Python's warnings module) goes to ``warn``, so Prefect shows it at WARNING."""
    sh("git", "init", "-q", cwd=tmp_path)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=tmp_path)
    cmd = f"{sys.executable} -c \"import warnings; print('made'); print(); warnings.warn('disk nearly full')\" > out"
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": cmd, "outs": ["out"]}}}))
    logged, warned, seen = [], [], []
    run_stage("make", tmp_path, logged.append, seen.append, warn=warned.append)
    assert any("Running stage 'make'" in line for line in logged)
    assert any("To enable auto staging" in line for line in seen)  # DVC did print its advice ...
    assert not [line for line in logged if "git add" in line or "autostage" in line or "auto staging" in line]
    assert all(line.strip() for line in logged + seen)  # ... and blank lines reach neither
    assert len(warned) == 1 and "UserWarning: disk nearly full" in warned[0]
    assert not any("UserWarning" in line for line in logged)
