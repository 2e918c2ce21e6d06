"""use_liger_kernel (CPU stand-ins) under FSDP2 and Ulysses SP, 2 ranks, gloo, real torchrun: the loss is computed
while FSDP2 has the LM head's weight unsharded, and it and the gradients equal one process without FSDP.
(`qvl train` with use_liger_kernel is compared with the plain run in test_train_distributed.py.)"""

import json

from tests.conftest import run_torchrun
from tests.stages.test_train_distributed import write_params


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
