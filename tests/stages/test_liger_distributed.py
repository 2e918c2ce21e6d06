"""use_liger_kernel (CPU stand-ins) under FSDP2 and Ulysses SP, 2 ranks, gloo, real torchrun: the loss is computed
while FSDP2 has the LM head's weight unsharded, and it and the gradients equal one process without FSDP."""

import json

import pytest

from tests.conftest import run_torchrun
from tests.stages.test_train_distributed import history, launch, write_params


def test_fsdp2_and_sp_with_stand_ins_give_the_loss_and_gradients_of_one_process(packed_project):
    """fp32, relative error < 1e-5, for: FSDP2 plain, FSDP2 + stand-ins (each rank its own row), FSDP2 +
    stand-ins + SP degree 2 (both ranks one row, each scoring its shard's labels)."""
    root, family_name, model_dir = packed_project
    params = write_params(root, "liger-fsdp", model_dir, family_name)
    out = root / "liger-fsdp.json"
    run_torchrun("liger_fsdp_worker.py", params, out, cwd=root, timeout=900)
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    assert set(result) == {"plain", "liger", "liger+sp"}
    for name, r in result.items():
        assert r["loss_relative_error"] < 1e-5, name
        assert r["grad_relative_error"] < 1e-5, name
    assert abs(result["liger"]["loss"] - result["plain"]["loss"]) / result["plain"]["loss"] < 1e-5


def test_training_with_use_liger_kernel_on_cpu_runs_the_stand_ins_and_keeps_the_loss_curve(packed_project):
    """The real `qvl train` worker, 2 ranks: the log names the stand-ins, the losses equal the plain run's."""
    root, family_name, model_dir = packed_project
    runs = {}
    for liger in (False, True):
        name = f"liger-{liger}".lower()
        proc = launch(root, name, model_dir, family_name, max_steps=1, save_steps=1, use_liger_kernel=liger)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[liger] = (proc.stdout, [h["loss"] for h in history(root, name)])
    assert "use_liger_kernel: torch stand-ins on cpu (no Liger): RMSNorm x" in runs[True][0]
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5)
