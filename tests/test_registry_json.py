"""`qvl registry show` prints plain JSON: metrics and data_hashes are objects, not JSON strings inside JSON; the
speed figures (metrics/train_speed.json) sit nested under metrics.speed."""

import json
import os
import subprocess
import sys

import yaml

from schemas.params import parse_params
from stages.register import register
from stages.train.checkpoint import STATE_FILE
from tests.conftest import REPO

LOCK = {"stages": {"pack": {"cmd": "x", "outs": [{"path": "data/packed", "md5": "abc.dir"}]}}}


def test_registry_show_prints_nested_objects(tmp_path):
    ckpt = tmp_path / "output/demo/checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 2, "history": [{"loss": 1.5, "packs": 4}]}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train.json").write_text(json.dumps({"final_loss": 1.5, "steps": 2}))
    speed = {"tokens_per_s": 12.5, "steps_timed": 2, "mfu": None}
    (tmp_path / "metrics/train_speed.json").write_text(json.dumps(speed))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    (tmp_path / "params.yaml").write_text("{}\n")
    (row,) = register(parse_params({}), tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "registry", "show", row["id"]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["metrics"] == {"loss": 1.5, "final_loss": 1.5, "steps": 2, "speed": speed}
    assert shown["data_hashes"] == {"pack": {"data/packed": "abc.dir"}}
    listed = subprocess.run(
        [sys.executable, "-m", "stages.cli", "registry", "list"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert listed.returncode == 0 and "loss 1.5" in listed.stdout, listed.stderr
