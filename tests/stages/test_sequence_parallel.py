"""Ulysses sequence parallelism on CPU (gloo, real torchrun): the same loss and gradients as without it.
(SP combined with data parallelism in training: tests/stages/test_train_distributed.py.)"""

import json

import pytest
from transformers import AutoConfig

from schemas.errors import ConfigError
from stages.train.sequence_parallel import check_degree
from tests.conftest import run_torchrun
from tests.stages.test_train_distributed import write_params


def sp_equivalence(root, model_dir, family_name, nproc) -> dict:
    params = write_params(root, f"sp{nproc}", model_dir, family_name)
    out = root / f"sp{nproc}.json"
    run_torchrun("sp_equivalence_worker.py", params, out, nproc=nproc, cwd=root)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("degree", [2, pytest.param(4, marks=pytest.mark.family_only("qwen3_vl"))])
def test_sp_gives_the_loss_and_gradients_of_one_rank(packed_project, degree):
    """fp32, relative error < 1e-5; a shard boundary falls inside a run of image or video tokens; degree 4 has
    fewer key/value heads (2) than ranks, so they are replicated."""
    root, family_name, model_dir = packed_project
    result = sp_equivalence(root, model_dir, family_name, degree)
    assert abs(result["loss"] - result["reference_loss"]) / result["reference_loss"] < 1e-5
    assert result["grad_relative_error"] < 1e-5
    assert result["vision_grad_norm"] > 0  # the vision tower is in the comparison


def test_degrees_the_model_or_world_cannot_split_are_refused(tiny_models):
    text = AutoConfig.from_pretrained(tiny_models["qwen3_vl"]).text_config  # 4 heads, 2 key/value heads
    check_degree(4, 8, text)
    with pytest.raises(ConfigError, match="8 attention heads|4 attention heads do not divide"):
        check_degree(8, 8, text)
    with pytest.raises(ConfigError, match="world size 6"):
        check_degree(4, 6, text)
    text.num_key_value_heads = 3
    text.num_attention_heads = 6
    with pytest.raises(ConfigError, match="3 key/value heads"):
        check_degree(2, 2, text)
