"""Train-stage pieces in one process: packed rows are exact, optimizer groups, freezing, preflight errors."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from schemas.errors import ConfigError, StageInputError
from stages.families import family
from stages.train import preflight
from stages.train.attention import ATTENTION_NAME
from stages.train.balance import balanced, in_order, straggler_ratio
from stages.train.data import RowBuilder, micro_batches, step_assignment
from stages.train.forward import row_loss_sum
from stages.train.model import freeze, trainable_summary
from stages.train.optim import build_optimizer
from tests.conftest import FAMILIES, MORE_FAMILIES_SLOW, pipeline_params, processor_of


def load(project, attention="sdpa"):
    root, family_name, model_dir = project
    fam = family(family_name)
    params = pipeline_params(model_dir, family_name)
    implementation = {"text_config": attention, "vision_config": "sdpa"}
    model = fam.transformers_class(fam.model_class).from_pretrained(
        model_dir, attn_implementation=implementation, dtype=torch.float32
    )
    processor = processor_of(model_dir)
    builder = RowBuilder.for_family(root, processor, params.dataset_config, fam, model.config)
    return root, fam, params, model, builder


def reference_loss_sum(model, builder, sample_id: str) -> torch.Tensor:
    """One sample through the plain transformers model with ``labels=``: transformers computes the positions
    (get_rope_index, from the processor's ``mm_token_type_ids``), the causal mask, the label shift and the mean
    cross-entropy; times the label count = the summed loss."""
    labels = torch.tensor([builder.samples[sample_id]["labels"]])
    inputs = reference_inputs(builder, sample_id) | {"labels": labels}
    return model(**inputs, use_cache=False).loss * int((labels[0, 1:] != -100).sum())


def reference_inputs(builder, sample_id: str) -> dict:
    """One whole sample as the plain transformers model takes it (the processor's token types, pixels, grids)."""
    s = builder.samples[sample_id]
    ids = torch.tensor([s["input_ids"]])
    vision = builder.build_samples([sample_id]).vision  # the processor's pixels of this sample (+ dummies)
    mm_types = torch.tensor(builder.processor.create_mm_token_type_ids([s["input_ids"]]))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm_types}
    if s["image_paths"]:
        inputs |= {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
    if s["video_keys"]:
        inputs |= {"pixel_values_videos": vision["pixel_values_videos"], "video_grid_thw": vision["video_grid_thw"]}
        if s["second_per_grid_ts"]:
            inputs["second_per_grid_ts"] = torch.tensor(s["second_per_grid_ts"])
    return inputs


@pytest.mark.parametrize("packed_project", FAMILIES + MORE_FAMILIES_SLOW, indirect=True)
@pytest.mark.parametrize("attention", ["sdpa", ATTENTION_NAME])
def test_packed_loss_equals_plain_transformers_with_labels(packed_project, attention):
    """The test that catches attention, rope or labels leaking across packed samples, against a reference no code
    here wrote: the packed rows' summed loss and gradients (this project's rows, position ids, attention and loss)
    equal the sum over the same samples, one at a time, through the plain transformers model with sdpa and
    ``labels=`` (fp32, relative error < 1e-5), over the largest packs until images and video are both in. Both
    families with the padding-free attention; transformers' own packed sdpa mask for one family."""
    root, fam, _, model, builder = load(packed_project, attention)
    if attention == "sdpa" and fam.processor_type != "qwen2_5_vl":
        pytest.skip("transformers' packed sdpa mask: one family is enough")
    reference = load(packed_project, "sdpa")[3]
    pack_ids, sample_ids = [], []
    for p in sorted(builder.packs, key=lambda p: -len(builder.packs[p])):
        kinds = {k for s in sample_ids for k in ("image_paths", "video_keys") if builder.samples[s][k]}
        if len(sample_ids) >= 3 and kinds == {"image_paths", "video_keys"}:
            break
        pack_ids.append(p)
        sample_ids += builder.packs[p]
    model.zero_grad(set_to_none=True)
    packed = sum(row_loss_sum(model, builder.build([p]), torch.device("cpu")) for p in pack_ids)
    packed.backward()
    reference.zero_grad(set_to_none=True)
    expected = sum(reference_loss_sum(reference, builder, s) for s in sample_ids)
    expected.backward()
    assert abs(packed.item() - expected.item()) / expected.item() < 1e-5
    grads = dict(reference.named_parameters())
    num = sum(float((p.grad.double() - grads[n].grad.double()).norm() ** 2) for n, p in model.named_parameters())
    den = sum(float(p.grad.double().norm() ** 2) for p in grads.values())
    assert num**0.5 / den**0.5 < 1e-5
    vision = [p.grad for n, p in model.named_parameters() if n.startswith(fam.vision_tower_prefix)]
    assert vision and any(float(g.abs().sum()) > 0 for g in vision)  # images and video really trained


def test_rows_have_per_sample_positions_and_no_cross_sample_labels(packed_project):
    _, _, _, _, builder = load(packed_project)
    tokenized = {
        s["sample_id"]: s for s in pq.read_table(packed_project[0] / "data/tokenized/samples.parquet").to_pylist()
    }
    for pack_id, sample_ids in list(builder.packs.items())[:3]:
        row = builder.build([pack_id])
        lengths = [tokenized[s]["length"] for s in sample_ids]
        assert row.seq_lengths()[: len(lengths)] == lengths  # then at most two label-free dummy segments
        assert row.position_ids.shape == (4, 1, row.tokens)
        starts = np.cumsum([0] + lengths)
        for s, start in zip(sample_ids, starts[:-1], strict=True):
            expected = tokenized[s]["labels"][1:] + [-100]
            assert row.targets[0, start : start + len(expected)].tolist() == expected


@pytest.mark.parametrize("balance", [False, True])
def test_every_pack_once_per_epoch_whatever_the_split(balance):
    order = [int(x) for x in np.random.default_rng(0).permutation(11)]
    cost = {p: float(c) for p, c in enumerate(np.random.default_rng(1).integers(1, 100, 11))} if balance else None
    for world, per_device, accumulation in [(1, 1, 2), (2, 1, 1), (2, 2, 2), (3, 1, 1), (4, 1, 2)]:
        global_batch = world * per_device * accumulation
        steps = -(-len(order) // global_batch)
        seen = []
        for step in range(steps):
            this_step = []
            for mine in step_assignment(order, step, world, per_device, accumulation, cost):
                micro = micro_batches(mine, order)
                assert len(micro) == accumulation and all(len(ids) <= per_device for ids, _ in micro)
                this_step += [p for ids, dummy in micro if not dummy for p in ids]
            assert sorted(this_step) == sorted(order[step * global_batch : (step + 1) * global_batch])
            seen += this_step
        assert sorted(seen) == sorted(order)


def test_positional_layout_written_out():
    assert in_order(list(range(8)), world=2, per_device=2, accumulation=2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert in_order([7, 8, 9], world=2, per_device=1, accumulation=2) == [[[7], [9]], [[8], []]]


def test_balanced_layout_written_out():
    """Heaviest first, each to the least-loaded rank with a free slot; each rank's packs heaviest first."""
    cost = {10: 8.0, 11: 7.0, 12: 6.0, 13: 5.0, 14: 1.0}
    packs = [10, 11, 12, 13]
    assert in_order(packs, 2, 1, 2) == [[[10], [12]], [[11], [13]]]  # loads 14 and 12
    assert balanced(packs, cost, 2, 1, 2) == [[[10], [13]], [[11], [12]]]  # loads 13 and 13
    assert straggler_ratio(in_order(packs, 2, 1, 2), cost) == pytest.approx(14 / 13)
    assert straggler_ratio(balanced(packs, cost, 2, 1, 2), cost) == 1.0
    # a slot limit: after 10 and 12, rank 1 is full, so 14 goes to rank 0 although rank 1 is lighter
    assert balanced([10, 11, 12, 14], {10: 1.0, 11: 9.0, 12: 1.0, 14: 1.0}, 2, 2, 1) == [[[11, 14]], [[10, 12]]]
    assert balanced([10, 11, 14], cost, 3, 1, 1) == [[[10]], [[11]], [[14]]]
    assert balanced([10, 11], cost, 3, 1, 1) == [[[10]], [[11]], [[]]]  # a short step: the last rank idles
    # ties go to the lower rank and the lower pack id: the same layout on every rank and after a resume
    even = {p: 1.0 for p in range(6)}
    assert balanced([5, 3, 1, 0, 2, 4], even, 2, 1, 3) == [[[0], [2], [4]], [[1], [3], [5]]]


def test_pack_costs_follow_the_flop_formula(tmp_path):
    from types import SimpleNamespace

    import pyarrow as pa

    from stages.train.balance import pack_costs

    pq.write_table(
        pa.table(
            {
                "pack_id": pa.array([1, 0], pa.int64()),
                "total": pa.array([30, 10], pa.int64()),
                "label_tokens": pa.array([7, 2], pa.int64()),
                "attention_sq": pa.array([500, 100], pa.int64()),
                "vision_patches": pa.array([64, 0], pa.int64()),
            }
        ),
        tmp_path / "packs.parquet",
    )
    text = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, head_dim=None)
    counts = {"lm": 1000, "head": 300, "vision": 50}
    # 6 N_lm tokens + 6 N_head labels + 12 layers heads head_dim sum(len^2) + 6 N_vision patches
    assert pack_costs(tmp_path / "packs.parquet", counts, text) == {
        1: 6 * 1000 * 30 + 6 * 300 * 7 + 12 * 2 * 4 * 8 * 500 + 6 * 50 * 64,
        0: 6 * 1000 * 10 + 6 * 300 * 2 + 12 * 2 * 4 * 8 * 100,
    }


# Spot checks written out by hand: (parameter name, expected part, decays) per family.
OPTIMIZER_SPOT_CHECKS = {
    "qwen2_5_vl": [
        ("model.visual.patch_embed.proj.weight", "vision", True),
        ("model.visual.blocks.0.attn.qkv.bias", "vision", False),
        ("model.visual.blocks.1.norm1.weight", "vision", False),
        ("model.visual.merger.ln_q.weight", "projector", False),
        ("model.visual.merger.mlp.0.weight", "projector", True),
        ("model.visual.merger.mlp.2.bias", "projector", False),
        ("model.language_model.layers.1.self_attn.q_proj.weight", "llm", True),
        ("model.language_model.layers.1.self_attn.q_proj.bias", "llm", False),
        ("model.language_model.norm.weight", "llm", False),
        ("model.language_model.embed_tokens.weight", "llm", True),
    ],
    "qwen3_vl": [
        ("model.visual.patch_embed.proj.weight", "vision", True),
        ("model.visual.pos_embed.weight", "vision", True),
        ("model.visual.blocks.0.attn.qkv.bias", "vision", False),
        ("model.visual.merger.linear_fc1.weight", "projector", True),
        ("model.visual.merger.norm.weight", "projector", False),
        ("model.visual.deepstack_merger_list.0.linear_fc1.weight", "projector", True),
        ("model.visual.deepstack_merger_list.0.linear_fc2.bias", "projector", False),
        ("model.visual.deepstack_merger_list.0.norm.weight", "projector", False),
        ("model.language_model.layers.1.mlp.up_proj.weight", "llm", True),
        ("model.language_model.layers.1.self_attn.q_norm.weight", "llm", False),
        ("model.language_model.embed_tokens.weight", "llm", True),
    ],
}


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_optimizer_groups_and_rates(tiny_models, family_name):
    """Expected groups from the rules, not from the implementation's prefixes: a name with "visual" and "merger"
    is the projector (mm_projector_lr; Qwen3-VL's deepstack mergers too, as in Qwen's own create_optimizer),
    other "visual" names the vision tower (vision_tower_lr), the rest the language model (learning_rate);
    1-D parameters (biases, norm weights) get no weight decay. Frozen parameters get no optimizer state."""
    fam = family(family_name)
    model = fam.transformers_class(fam.model_class).from_pretrained(tiny_models[family_name], dtype=torch.float32)
    rates = {"projector": 3e-4, "vision": 1e-5, "llm": 2e-3}
    args = pipeline_params(tiny_models[family_name], family_name).trainer_args.model_copy(
        update={"learning_rate": 2e-3, "vision_tower_lr": 1e-5, "mm_projector_lr": 3e-4, "weight_decay": 0.1}
    )
    freeze(model, ["model.language_model.layers.0"])
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for group in build_optimizer(model, args, fam, torch.device("cpu")).param_groups:
        for p in group["params"]:
            assert names[id(p)] not in got, f"{names[id(p)]} is in two groups"
            got[names[id(p)]] = (group["lr"], group["weight_decay"])

    def part(name: str) -> str:
        return "projector" if "visual" in name and "merger" in name else "vision" if "visual" in name else "llm"

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(trainable)
    assert not any(n.startswith("model.language_model.layers.0.") for n in got)
    for name, p in trainable.items():
        assert got[name] == (rates[part(name)], 0.1 if p.ndim >= 2 else 0.0), name
    for name, expected_part, decays in OPTIMIZER_SPOT_CHECKS[family_name]:
        assert got[name] == (rates[expected_part], 0.1 if decays else 0.0), name
    summary = trainable_summary(model, fam)
    assert "decoder layer 0: frozen" in summary and "decoder layer 1: trains" in summary


def test_freeze_prefix_that_matches_nothing_is_an_error(packed_project):
    _, _, _, model, _ = load(packed_project)
    with pytest.raises(ConfigError, match="matches no parameter"):
        freeze(model, ["vision_tower"])


def test_preflight_errors(packed_project, tmp_path):
    root, family_name, model_dir = packed_project
    params = pipeline_params(model_dir, family_name)
    preflight(params, root, 2)  # the good case passes
    with pytest.raises(StageInputError, match="model directory not found"):
        preflight(
            pipeline_params(tmp_path / "nope", family_name).model_copy(
                update={"dataset_config": params.dataset_config}
            ),
            root,
            2,
        )
    with pytest.raises(ConfigError, match="cannot feed 64 data-parallel"):
        preflight(params, root, 64)
    other = "qwen3_vl" if family_name == "qwen2_5_vl" else "qwen2_5_vl"
    wrong = params.model_copy(deep=True)
    wrong.dataset_config.processor_config.processor_type = other
    with pytest.raises(ConfigError, match="expects"):
        preflight(wrong, root, 2)
    wrap = params.model_copy(deep=True)
    wrap.trainer_args.fsdp_config.transformer_layer_cls_to_wrap = ["LlamaDecoderLayer"]
    with pytest.raises(ConfigError, match="names no module"):
        preflight(wrap, root, 2)
    sp = params.model_copy(deep=True)
    sp.trainer_args.sp_ulysses_degree = 3
    with pytest.raises(ConfigError, match="sp_ulysses_degree 3: the world size 2 .* 4 attention heads do not divide"):
        preflight(sp, root, 2)
    sp.trainer_args.sp_ulysses_degree = 2
    sp.model_config_.attn_implementation = "eager"
    with pytest.raises(ConfigError, match="'eager' cannot run Ulysses sequence parallelism"):
        preflight(sp, root, 2)
    evaluation = params.model_copy(deep=True)  # the project holds no eval split
    evaluation.trainer_args.eval_strategy = "steps"
    with pytest.raises(StageInputError, match="eval_strategy is 'steps' but .*eval_packs.parquet holds no packs"):
        preflight(evaluation, root, 2)
    from transformers import AutoProcessor

    grown = tmp_path / "grown-processor"  # one token more than the data was tokenized with
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.add_tokens(["<|not-in-the-data|>"])
    processor.save_pretrained(grown)
    other_processor = params.model_copy(deep=True)
    other_processor.dataset_config.processor_config.processor_name = str(grown)
    with pytest.raises(StageInputError, match=rf"tokenizer has {len(processor.tokenizer)} tokens but the data was"):
        preflight(other_processor, root, 2)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_each_scheduler_warms_up_then_follows_its_schedule(kind):
    """The learning rate of each step, written out from the schedules' definitions: a linear warm-up from 0
    over warmup_steps (or warmup_ratio of the steps), then constant, linear decay to 0, or a half cosine."""
    import math

    from stages.train.optim import build_scheduler

    base, total = 1e-3, 10
    for warmup_args, warmup in (({"warmup_steps": 3}, 3), ({"warmup_ratio": 0.2}, 2)):
        args = pipeline_params(Path("m"), "qwen2_5_vl").trainer_args.model_copy(
            update={"lr_scheduler_type": kind, "learning_rate": base, **warmup_args}
        )
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
        scheduler = build_scheduler(optimizer, args, total)
        got = []
        for _ in range(total):
            got.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        expected = []
        for t in range(total):
            progress = (t - warmup) / (total - warmup)
            after = {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
            expected.append(base * (t / warmup if t < warmup else after[kind]))
        assert got == pytest.approx(expected, abs=1e-12), warmup_args


@pytest.mark.parametrize("packs, ranks", [(5, 2), (4, 2), (1, 3), (7, 4)])
def test_eval_plan_gives_every_pack_once_and_every_rank_the_same_rounds(packs, ranks):
    from stages.train.evaluation import eval_plan

    pack_ids = [10 + 3 * i for i in range(packs)]
    plans = [eval_plan(pack_ids, ranks, r) for r in range(ranks)]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) == -(-packs // ranks)  # collectives stay in step
    real = sorted(ids[0] for plan in plans for ids, dummy in plan if not dummy)
    assert real == pack_ids and all(len(ids) == 1 for plan in plans for ids, _ in plan)
    assert sum(dummy for plan in plans for _, dummy in plan) == len(plans[0]) * ranks - packs


def test_eval_is_due_by_strategy_and_after_the_last_step():
    from schemas.params import TrainerArgs
    from stages.train.evaluation import eval_due

    def due(strategy, steps=None, logging=1, epoch_ends=()):
        args = TrainerArgs(eval_strategy=strategy, eval_steps=steps, logging_steps=logging)
        return [s for s in range(1, 11) if eval_due(args, s, 10, epoch_done=s in epoch_ends)]

    assert due("no") == []
    assert due("steps", 4) == [4, 8, 10]
    assert due("steps", logging=3) == [3, 6, 9, 10]  # eval_steps defaults to logging_steps
    assert due("epoch", epoch_ends=(3, 6, 9)) == [3, 6, 9, 10]
