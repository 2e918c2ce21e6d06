"""Balanced steps through real `qvl train` launches (torchrun, gloo, FSDP2): spreading a step's packs over the
ranks by estimated FLOPs changes who trains what, never the steps or their losses."""

import json
import shutil

import pytest

from tests.stages.test_train_distributed import losses, train

pytestmark = pytest.mark.slow


@pytest.mark.family_only("qwen2_5_vl")
def test_balanced_packs_train_the_same_steps_with_the_same_losses(packed_project, tmp_path):
    """2 ranks x 2 packs a row (four packs a step) spread by estimated FLOPs, against one rank training each step's
    four packs in order: the same packs in the same steps, the same losses. The first four packs' attention terms
    are made lopsided (the cost only decides the layout), so the balanced layout is not the positional one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, family_name, model_dir = packed_project
    root = tmp_path / "project"
    shutil.copytree(source / "data", root / "data")
    packs = pq.read_table(root / "data/packed/packs.parquet")
    skew = [10**15, 9 * 10**14, 1, 1] + packs.column("attention_sq").to_pylist()[4:]
    at = packs.schema.get_field_index("attention_sq")
    pq.write_table(packs.set_column(at, "attention_sq", pa.array(skew, pa.int64())), root / "data/packed/packs.parquet")
    spread = train(root, "spread", model_dir, family_name, max_steps=2, nproc_per_node=2, per_device_train_batch_size=2)
    options = dict(max_steps=2, nproc_per_node=1, gradient_accumulation_steps=4, balance_packs=False)
    alone = train(root, "alone", model_dir, family_name, **options)
    assert [h["packs"] for h in spread] == [h["packs"] for h in alone] and spread[0]["packs"] == [0, 1, 2, 3]
    assert losses(spread) == pytest.approx(losses(alone), rel=1e-6)
    # in order, rank 0 would take packs 0 and 1 (both heavy); balanced, one heavy pack each
    assert spread[0]["straggler_in_order"] > 1.9 and spread[0]["straggler"] < 1.06
    assert all(1.0 <= h["straggler"] <= h["straggler_in_order"] for h in spread)
    assert all(h["straggler"] == h["straggler_in_order"] == 1.0 for h in alone)  # one rank: nothing to balance
    assert json.loads((root / "metrics/train.json").read_text())["straggler_ratio"] == 1.0  # the last run's
