"""The `qvl` command line: every subcommand has --help; user errors print one line, no traceback."""

import subprocess
import sys

import pytest

from stages.cli import build_parser
from tests.conftest import REPO

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def qvl(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    proc = qvl(command, "--help")
    assert proc.returncode == 0 and "usage: qvl " + command in proc.stdout


def test_bad_params_key_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text("dataset_config:\n  packing_lenght: 10\n")
    proc = qvl("validate", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "did you mean 'packing_length'" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_dataset_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text("dataset_config:\n  datasets: [{path: nope.jsonl}]\n")
    proc = qvl("validate", cwd=tmp_path)
    assert proc.returncode == 2
    assert "dataset file not found: nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_python_dash_m_entry_point(tmp_path, demo_dir):
    import shutil

    shutil.copytree(demo_dir, tmp_path / "data" / "demo")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.validate", "--params", "params.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data/validated/samples.parquet").is_file()
    assert "accepted" in proc.stderr
