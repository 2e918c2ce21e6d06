"""The real `qvl train` worker hands collectives only tensors on the training device (NCCL refuses CPU
tensors), and reduces gradients once per optimizer step, not once per micro-batch."""

import ast
import json

import pytest
import torch

from tests.conftest import REPO, run_torchrun
from tests.stages.test_train_distributed import write_params

pytestmark = pytest.mark.slow
FACTORIES = {"tensor", "zeros", "ones", "full", "empty", "arange", "zeros_like", "ones_like"}
LOOP_MODULES = ("stages/train/worker.py", "stages/train/distributed.py")


def test_the_training_loop_creates_no_tensor_without_a_device():
    """On this CPU machine every tensor is on the training device anyway; this is the part of the guarantee that
    can fail here: a tensor factory without ``device=`` in the loop lands on the CPU under NCCL."""
    offenders = []
    for path in LOOP_MODULES:
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
            ):
                offenders.append(f"{path}:{node.lineno}")
    assert not offenders


def test_collectives_get_training_device_tensors_and_one_gradient_sync_per_step(packed_project):
    root, family_name, model_dir = packed_project
    steps, accumulation = 2, 2
    nproc = torch.cuda.device_count() or 2
    params = write_params(
        root, "collectives", model_dir, family_name, max_steps=steps, gradient_accumulation_steps=accumulation
    )
    record = root / "collectives"
    run_torchrun(
        "collective_recorder.py", "--params", params, nproc=nproc, cwd=root, env={"QVL_COLLECTIVES": str(record)}
    )
    config = json.loads((model_dir / "config.json").read_text())
    # Reduce-scatters in one micro-batch's backward: one per decoder layer, one per vision block per call of the
    # vision tower (every row calls it twice, for images and for videos: stages/train/data.py), one for the root.
    per_backward = config["text_config"]["num_hidden_layers"] + 2 * config["vision_config"]["depth"] + 1
    for rank in range(nproc):
        calls = json.loads(record.with_name(f"collectives.rank{rank}.json").read_text())
        device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
        assert {d for c in calls for d in c["devices"]} == {device}, {c["op"]: c["devices"] for c in calls}
        ops = [c["op"] for c in calls]
        assert "all_reduce" in ops and "all_gather_single" in ops
        # one backward's worth per step; a sync after every micro-batch would be `accumulation` times as many
        assert ops.count("reduce_scatter_single") == steps * per_backward
