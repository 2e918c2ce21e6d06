"""The demo with Qwen3-VL-MoE, as a user switches to it: `qvl setup-demo --family qwen3_vl_moe`, three params,
`dvc repro`: every stage runs and the checkpoint is registered with its balance loss and eval loss."""

import json
import sys

import pytest

from stages.register import read_registry
from tests.flows.helpers import BIN, clone_project, edit_params, sh

pytestmark = pytest.mark.slow


def test_dvc_repro_of_the_demo_with_qwen3_vl_moe_registers_a_checkpoint(tmp_path):
    clone = clone_project(tmp_path / "project", max_steps=2, save_steps=1)
    sh(str(BIN / "qvl"), "setup-demo", "--family", "qwen3_vl_moe", cwd=clone)
    model = "models/tiny-qwen3_vl_moe"
    edit_params(
        clone,
        dataset_config={"processor_config": {"processor_name": model, "processor_type": "qwen3_vl_moe"}},
        model_config={"load_from_pretrained_path": model},
    )
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=clone)
    assert "mixture of experts: 4 experts, 2 per token" in out.stdout + out.stderr
    rows = read_registry(clone / "registry/registry.duckdb")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["hf_path"] == "output/demo/hf"
    metrics = rows[-1]["metrics"]
    assert metrics["router_balance_loss"] > 0 and metrics["evaluate"]["eval_loss"] > 0
    assert json.loads((clone / "output/demo/hf/config.json").read_text())["model_type"] == "qwen3_vl_moe"
