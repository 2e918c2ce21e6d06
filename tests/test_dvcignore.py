"""dvc.lock's code-dependency hashes cover source only: byte-compiled files and numba's cache are ignored."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

DVC = str(Path(sys.executable).with_name("dvc"))


def dvc(cwd: Path, *args: str) -> str:
    proc = subprocess.run([DVC, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_caches_beside_the_code_do_not_change_the_lock(tmp_path):
    shutil.copy(REPO / ".dvcignore", tmp_path / ".dvcignore")
    (tmp_path / "code").mkdir()
    (tmp_path / "code/algorithms.py").write_text("def f():\n    return 1\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "true", "deps": ["code"]}}}))
    dvc(tmp_path, "init", "--no-scm", "-q")
    dvc(tmp_path, "repro", "-q")
    lock = (tmp_path / "dvc.lock").read_text()
    cache = tmp_path / "code/__pycache__"
    cache.mkdir()
    for name in (
        "algorithms.cpython-311.pyc",
        "algorithms._first_fit-17.py311.nbi",
        "algorithms._first_fit-17.py311.1.nbc",
    ):
        (cache / name).write_bytes(b"machine-specific")
    assert "up to date" in dvc(tmp_path, "status")
    dvc(tmp_path, "repro", "-q")
    assert (tmp_path / "dvc.lock").read_text() == lock
