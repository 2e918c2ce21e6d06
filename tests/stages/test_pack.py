"""Packing: properties over random inputs, equality with plain reference implementations, and the stage."""

import json
import re
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import PipelineError, StageInputError
from schemas.params import parse_params
from stages.families import family
from stages.pack import pack_lengths
from stages.pack import run as pack
from stages.pack.algorithms import STRATEGIES
from stages.tiny_model import build_config
from tests.conftest import fill_disk

lengths_and_capacity = st.integers(1, 300).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), max_size=200), st.just(cap))
)


@settings(max_examples=150, deadline=None)
@given(lengths_and_capacity, st.sampled_from(STRATEGIES), st.integers(0, 2**31))
def test_every_item_in_exactly_one_pack_and_no_pack_over_capacity(data, strategy, seed):
    lengths, capacity = data
    packs = pack_lengths(lengths, capacity, strategy, seed)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= capacity for p in packs)
    assert all(p for p in packs)
    assert pack_lengths(lengths, capacity, strategy, seed) == packs  # deterministic for a seed


def reference_first_fit(lengths, capacity, order):
    rooms, assigned = [], {}
    for i in order:
        for p, room in enumerate(rooms):
            if room >= lengths[i]:
                rooms[p] -= lengths[i]
                assigned[i] = p
                break
        else:
            rooms.append(capacity - lengths[i])
            assigned[i] = len(rooms) - 1
    return assigned


def reference_best_fit(lengths, capacity, order):
    rooms, assigned = [], {}
    for i in order:
        fits = [(room, p) for p, room in enumerate(rooms) if room >= lengths[i]]
        if fits:
            _, p = min(fits, key=lambda rp: rp[0])
            rooms[p] -= lengths[i]
        else:
            rooms.append(capacity - lengths[i])
            p = len(rooms) - 1
        assigned[i] = p
    return assigned


def as_partition(assigned: dict) -> set:
    groups: dict = {}
    for i, p in assigned.items():
        groups.setdefault(p, []).append(i)
    return {tuple(sorted(g)) for g in groups.values()}


@settings(max_examples=100, deadline=None)
@given(lengths_and_capacity, st.integers(0, 1000))
def test_equal_to_reference_implementations(data, seed):
    lengths, capacity = data
    decreasing = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shuffled = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    got = {s: {tuple(sorted(p)) for p in pack_lengths(lengths, capacity, s, seed)} for s in STRATEGIES}
    assert got["first_fit"] == as_partition(reference_first_fit(lengths, capacity, shuffled))
    assert got["first_fit_decreasing"] == as_partition(reference_first_fit(lengths, capacity, decreasing))
    # Best fit: ties between equally full packs may go either way, which changes which items share a pack but
    # never the fill: the sorted pack totals must equal the reference's exactly.
    ref = reference_best_fit(lengths, capacity, decreasing)
    bfd = got["best_fit_decreasing"]
    assert sorted(i for p in bfd for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= capacity for p in bfd)
    totals = sorted(sum(lengths[i] for i in p) for p in bfd)
    assert totals == sorted(sum(lengths[i] for i in p) for p in as_partition(ref))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="1..10"):
        pack_lengths([3, 11], 10)
    with pytest.raises(ValueError, match="unknown packing strategy"):
        pack_lengths([3], 10, "next_fit")
    assert pack_lengths([], 10) == []


def sample_images(i: int) -> list[list[int]]:
    return [[1, 2 + (i + k) % 4, 4] for k in range(i % 3)]


def sample_videos(i: int) -> list[list[int]]:
    return [[2, 4, 6]] if i % 5 == 0 else []


def write_tokenized(root, lengths, eval_ids=(), label_tokens=None):
    """samples.parquet with the columns pack reads: sample i has i % 3 images and, every fifth, a video; and
    validate's samples.parquet with the split of each (``eval_ids`` held out), the column pack reads there; and the
    default model's config.json, which pack prices samples by."""
    build_config(family("qwen2_5_vl")).save_pretrained(root / "models/tiny-qwen2_5_vl")
    (root / "data/tokenized").mkdir(parents=True)
    (root / "data/validated").mkdir(parents=True)
    ids = [f"s{i:04d}" for i in range(len(lengths))]
    splits = ["eval" if i in eval_ids else "train" for i in ids]
    pq.write_table(pa.table({"sample_id": ids, "split": splits}), root / "data/validated/samples.parquet")
    grids = pa.list_(pa.list_(pa.int32()))
    table = pa.table(
        {
            "sample_id": ids,
            "length": pa.array(lengths, pa.int32()),
            "label_tokens": pa.array(label_tokens or [n // 3 for n in lengths], pa.int32()),
            "image_grid_thw": pa.array([sample_images(i) for i in range(len(lengths))], grids),
            "video_grid_thw": pa.array([sample_videos(i) for i in range(len(lengths))], grids),
        }
    )
    pq.write_table(table, root / "data/tokenized/samples.parquet")
    return ids


def test_sample_rows_are_tokenized_row_numbers_after_overlong_samples_are_dropped(tmp_path):
    ids = write_tokenized(tmp_path, [5, 2000, 7, 3000, 9, 1000])
    pack(parse_params({"dataset_config": {"packing_length": 1024}}), tmp_path)
    packs = pq.read_table(tmp_path / "data/packed/packs.parquet").to_pylist()
    assert sorted(r for p in packs for r in p["sample_rows"]) == [0, 2, 4, 5]
    assert all(p["sample_ids"] == [ids[r] for r in p["sample_rows"]] for p in packs)


@pytest.mark.parametrize("packing", [True, False])
def test_stage_writes_every_sample_once(tmp_path, packing):
    lengths = np.random.default_rng(1).integers(1, 900, 300).tolist()
    ids = write_tokenized(tmp_path, lengths)
    params = parse_params(
        {"dataset_config": {"packing": packing, "packing_length": 1024, "packing_strategy": "best_fit_decreasing"}}
    )
    pack(params, tmp_path)
    packs = pq.read_table(tmp_path / "data/packed/packs.parquet").to_pylist()
    assert sorted(s for p in packs for s in p["sample_ids"]) == ids
    assert [p["pack_id"] for p in packs] == list(range(len(packs)))
    length_of = dict(zip(ids, lengths, strict=True))
    for p in packs:
        assert p["lengths"] == [length_of[s] for s in p["sample_ids"]] and p["total"] == sum(p["lengths"]) <= 1024
        assert p["sample_rows"] == [ids.index(s) for s in p["sample_ids"]]  # what the trainer reads them by
        # what its compute cost is made of
        assert p["label_tokens"] == sum(n // 3 for n in p["lengths"])
        assert p["attention_sq"] == sum(n * n for n in p["lengths"])
        grids = [g for i in p["sample_rows"] for g in sample_images(i) + sample_videos(i)]
        assert p["vision_patches"] == sum(t * h * w for t, h, w in grids)
    metrics = json.loads((tmp_path / "metrics/pack.json").read_text())
    assert metrics["packs"] == len(packs) and metrics["samples"] == len(ids)
    assert metrics["efficiency"] == pytest.approx(sum(lengths) / (len(packs) * 1024), abs=1e-6)
    if packing:
        assert metrics["efficiency"] > 0.95  # uniform lengths up to 0.9 x capacity: BFD reaches 0.968
    else:
        assert all(len(p["sample_ids"]) == 1 for p in packs)


def test_held_out_samples_are_packed_apart(tmp_path):
    """Validate's eval samples go to eval_packs.parquet, every one once, and none into the training packs."""
    lengths = np.random.default_rng(3).integers(1, 900, 200).tolist()
    lengths[7] = 5000  # an overlong eval sample is dropped like a training one
    held = {f"s{i:04d}" for i in range(0, 200, 7)}
    ids = write_tokenized(tmp_path, lengths, held)
    result = pack(parse_params({"dataset_config": {"packing_length": 1024}}), tmp_path)
    train = pq.read_table(tmp_path / "data/packed/packs.parquet").to_pylist()
    held_packs = pq.read_table(tmp_path / "data/packed/eval_packs.parquet").to_pylist()
    assert sorted(s for p in held_packs for s in p["sample_ids"]) == sorted(held - {"s0007"})
    assert sorted(s for p in train for s in p["sample_ids"]) == sorted(set(ids) - held)
    assert all(p["sample_ids"] == [ids[r] for r in p["sample_rows"]] and p["total"] <= 1024 for p in held_packs)
    assert [p["pack_id"] for p in held_packs] == list(range(len(held_packs)))
    assert (result.eval_samples, result.eval_packs, result.dropped_overlong) == (len(held) - 1, len(held_packs), 1)
    metrics = json.loads((tmp_path / "metrics/pack.json").read_text())
    assert metrics["eval_samples"] == len(held) - 1 and metrics["samples"] == len(ids) - len(held)


def test_validated_samples_without_a_split_are_a_clear_error(tmp_path):
    write_tokenized(tmp_path, [100, 200])
    pq.write_table(pa.table({"sample_id": ["s0000", "s0001"]}), tmp_path / "data/validated/samples.parquet")
    with pytest.raises(StageInputError, match="has no split column .*re-run validate"):
        pack(parse_params({"dataset_config": {"packing_length": 1024}}), tmp_path)


def test_stage_pack_order_is_shuffled_but_seeded(tmp_path):
    write_tokenized(tmp_path, list(range(1, 401)))
    params = parse_params({"dataset_config": {"packing_length": 1000, "packing_strategy": "first_fit_decreasing"}})
    pack(params, tmp_path)
    first = pq.read_table(tmp_path / "data/packed/packs.parquet").column("total").to_pylist()
    assert first != sorted(first, reverse=True) and first != sorted(first)  # FFD order is not kept
    pack(params, tmp_path)
    assert pq.read_table(tmp_path / "data/packed/packs.parquet").column("total").to_pylist() == first


def test_stage_counts_overlong_samples_as_dropped(tmp_path):
    write_tokenized(tmp_path, [100, 2000, 300])
    result = pack(parse_params({"dataset_config": {"packing_length": 1024}}), tmp_path)
    assert result.dropped_overlong == 1 and result.samples == 2


def test_stage_on_empty_input_writes_no_packs(tmp_path):
    write_tokenized(tmp_path, [])
    result = pack(parse_params({"dataset_config": {"packing_length": 1024}}), tmp_path)
    assert result.samples == 0 and result.packs == 0
    assert pq.read_table(tmp_path / "data/packed/packs.parquet").num_rows == 0
    metrics = json.loads((tmp_path / "metrics/pack.json").read_text())
    assert metrics["packs"] == 0 and metrics["efficiency"] == 0.0


@pytest.mark.parametrize("packing", [True, False])
def test_stage_with_only_an_overlong_sample_drops_it(tmp_path, packing):
    write_tokenized(tmp_path, [1025])
    result = pack(parse_params({"dataset_config": {"packing": packing, "packing_length": 1024}}), tmp_path)
    assert result.dropped_overlong == 1 and result.samples == 0 and result.packs == 0
    assert pq.read_table(tmp_path / "data/packed/packs.parquet").num_rows == 0


def test_full_disk_is_one_clear_error_and_the_previous_output_survives(small_fs):
    """A real full filesystem (8 MiB tmpfs) during the Parquet write: one PipelineError naming the file and the
    bytes it needs; the previous packs.parquet is untouched and no temp directory is left."""
    write_tokenized(small_fs, np.random.default_rng(2).integers(1, 900, 3000).tolist())
    pack(parse_params({"dataset_config": {"packing_length": 1024}}), small_fs)
    before = (small_fs / "data/packed/packs.parquet").read_bytes()
    fill_disk(small_fs)
    with pytest.raises(PipelineError, match=r"disk full while writing .*data/packed/packs.parquet: it needs") as err:
        pack(parse_params({"dataset_config": {"packing_length": 2048}}), small_fs)  # other packs than before
    needed, free = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) bytes", str(err.value)))
    assert needed > len(before) / 2 and free < needed
    assert (small_fs / "data/packed/packs.parquet").read_bytes() == before
    assert sorted(p.name for p in (small_fs / "data").iterdir()) == ["packed", "tokenized", "validated"]


def test_read_only_disk_is_one_clear_error(small_fs):
    write_tokenized(small_fs, [100, 200, 300])
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(PipelineError, match=r"no permission to write .*data/packed \(Read-only file system\)"):
        pack(parse_params({"dataset_config": {"packing_length": 1024}}), small_fs)
    assert sorted(p.name for p in (small_fs / "data").iterdir()) == ["tokenized", "validated"]


def test_first_fit_packs_are_cost_balanced_and_the_straggler_ratio_is_reported(tmp_path):
    """With first_fit, pack exchanges samples until the packs' FLOPs (priced as the trainer prices them, from the
    packs' columns) agree: the same samples, within capacity; metrics/pack.json reports the straggler ratio of the
    trainer's layout before and after, and `packing_cost_balance: false` packs by tokens alone."""
    from stages.train.balance import pack_costs
    from stages.train.telemetry import architecture_counts

    rng = np.random.default_rng(5)
    lengths = rng.integers(5, 200, 600)
    labels = np.where(rng.random(600) < 0.3, lengths, lengths // 10)  # the tiny model's cost is mostly lm_head's
    ids = write_tokenized(tmp_path, lengths.tolist(), label_tokens=labels.tolist())
    counts, text_config = architecture_counts(tmp_path / "models/tiny-qwen2_5_vl", "qwen2_5_vl")
    metrics, spread = {}, {}
    for balance in (False, True):
        params = {"packing_length": 1024, "packing_strategy": "first_fit", "packing_cost_balance": balance}
        pack(parse_params({"dataset_config": params, "trainer_args": {"nproc_per_node": 4}}), tmp_path)
        packs = pq.read_table(tmp_path / "data/packed/packs.parquet").to_pylist()
        assert sorted(s for p in packs for s in p["sample_ids"]) == ids and max(p["total"] for p in packs) <= 1024
        cost = np.array(list(pack_costs(tmp_path / "data/packed/packs.parquet", counts, text_config).values()))
        metrics[balance] = json.loads((tmp_path / "metrics/pack.json").read_text())
        spread[balance] = cost.max() / cost.mean()
        assert metrics[balance]["cost_max_over_mean"] == pytest.approx(spread[balance], rel=1e-5)
        assert metrics[balance]["straggler_world"] == 4 and metrics[balance]["cost_balance"] is balance
    assert spread[True] - 1 < (spread[False] - 1) / 4  # measured 1.17 against 1.95
    assert metrics[True]["packs"] == metrics[False]["packs"]
    assert metrics[True]["straggler_ratio_token_packing"] == metrics[False]["straggler_ratio"]
    assert metrics[True]["straggler_ratio"] < 1.05 < 1.3 < metrics[False]["straggler_ratio"]  # 1.045 and 1.41
