"""The pack stage: group tokenized samples into fixed-capacity packs (one padding-free row each) for training.

Recipe: read sample lengths -> pack them (algorithms.pack_lengths; or one sample per pack when packing is off)
-> with first_fit, exchange samples between packs until their estimated FLOPs agree (cost_balance.py; each
sample priced as the trainer prices it, from the model's config.json) -> shuffle the pack order with the seed, so
neighbouring packs are not all long or all short; the same, apart, for the samples validate held out for
evaluation -> write data/packed/packs.parquet, data/packed/eval_packs.parquet and metrics/pack.json (with the
straggler ratio the trainer's data-parallel layout would see) atomically (a full or read-only disk is one clear
error and leaves the previous output as it was).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.errors import StageInputError
from schemas.params import DatasetConfig, Params
from schemas.tables import PACKS_SCHEMA
from stages.io import atomic_dir, disk_full_is_clear, write_json
from stages.pack.algorithms import assign_packs, pack_lengths
from stages.pack.cost_balance import balance_costs

__all__ = ["pack_lengths", "run", "PackResult"]

TOKENIZED = Path("data/tokenized/samples.parquet")
VALIDATED = Path("data/validated/samples.parquet")
COST_INPUTS = ("label_tokens", "image_grid_thw", "video_grid_thw")
OUT_DIR = Path("data/packed")
PACKS, EVAL_PACKS = "packs.parquet", "eval_packs.parquet"  # the training packs, the held-out samples' packs
METRICS = Path("metrics/pack.json")


@dataclass
class PackResult:
    samples: int
    packs: int
    tokens: int
    capacity: int
    efficiency: float
    dropped_overlong: int  # in either split
    strategy: str
    eval_samples: int
    eval_packs: int
    cost_balance: bool
    cost_max_over_mean: float  # the dearest training pack's estimated FLOPs over the mean pack's
    straggler_world: int  # data-parallel ranks the ratios assume: nnodes x nproc_per_node / SP (8 if nproc unset)
    straggler_ratio: float  # the first epoch's whole steps, packs assigned to ranks as the trainer does (1.0: even)
    straggler_ratio_token_packing: float  # the same for the packs before the cost balance
    seconds: float

    def metrics(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "seconds"}


def write_packs(tables: dict[str, pa.Table], out_dir: Path) -> None:
    """Each table as ``out_dir``/<name>, encoded in memory first (so its exact size is known), then written into a
    temp directory that replaces ``out_dir`` only once complete. A full disk raises PipelineError naming the file
    and the bytes it needs (a read-only one: atomic_dir's no-permission error); either way the temp directory is
    removed and the previous output is left as it was."""
    encoded = {}
    for name, table in tables.items():
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        encoded[name] = sink.getvalue()
    with atomic_dir(out_dir) as tmp:
        for name, data in encoded.items():
            with disk_full_is_clear(out_dir / name, need=data.size):
                (tmp / name).write_bytes(data)


def held_out(root: Path, sample_ids: pa.ChunkedArray) -> np.ndarray:
    """Whether each tokenized sample is in the eval split (validate's ``split`` column, matched by sample id)."""
    validated = pq.read_schema(root / VALIDATED)
    if "split" not in validated.names:
        raise StageInputError(f"{root / VALIDATED} has no split column (an older validate wrote it): re-run validate")
    splits = pq.read_table(root / VALIDATED, columns=["sample_id", "split"])
    eval_ids = pc.filter(splits.column("sample_id"), pc.equal(splits.column("split"), "eval"))
    return pc.is_in(sample_ids, value_set=eval_ids.combine_chunks()).to_numpy(zero_copy_only=False)


def sample_costs(tokenized: pa.Table, params: Params, root: Path) -> dict[str, np.ndarray]:
    """Per tokenized sample: label tokens, vision patches (the sum of t x h x w over its image and video grids) and
    the estimated FLOPs of training it (stages/train/telemetry.py, for the model training will load)."""
    from stages.train.telemetry import architecture_counts, flops

    model_dir = root / params.model_config_.load_from_pretrained_path
    if not (model_dir / "config.json").is_file():
        raise StageInputError(
            f"{model_dir / 'config.json'} not found (model_config.load_from_pretrained_path): pack prices each "
            "sample for the model it will train"
        )
    patches = np.zeros(tokenized.num_rows, np.int64)
    for name in ("image_grid_thw", "video_grid_thw"):
        grids = tokenized.column(name).combine_chunks()  # list<list<int32>>: a sample's grids
        flat = grids.flatten()
        per_grid = flat.flatten().to_numpy().astype(np.int64).reshape(-1, 3).prod(axis=1)
        owner = pc.list_parent_indices(grids).to_numpy()
        patches += np.bincount(owner, weights=per_grid, minlength=tokenized.num_rows).astype(np.int64)
    labels = tokenized.column("label_tokens").to_numpy().astype(np.int64)
    lengths = tokenized.column("length").to_numpy().astype(np.float64)
    counts, text_config = architecture_counts(model_dir, params.dataset_config.processor_config.processor_type)
    lm, vision = flops(counts, text_config, lengths, lengths**2, labels.astype(np.float64), patches.astype(np.float64))
    return {"label_tokens": labels, "vision_patches": patches, "flops": lm + vision}


@dataclass
class Packing:
    table: pa.Table  # PACKS_SCHEMA rows
    cost: np.ndarray  # estimated FLOPs of each pack, by pack_id
    token_packing_cost: np.ndarray  # the same packs' costs before the cost balance (packed by tokens alone)


def build_packs(tokenized: pa.Table, costs: dict[str, np.ndarray], rows: np.ndarray, cfg: DatasetConfig) -> Packing:
    """The packs of the tokenized ``rows`` (all of which fit the packing length), in a seeded order; ``costs`` is
    sample_costs of the same table."""
    lengths = tokenized.column("length").to_numpy().astype(np.int64)[rows]
    capacity = cfg.packing_length if cfg.packing else int(lengths.max(initial=1))
    by_tokens = (
        assign_packs(lengths, capacity, cfg.packing_strategy, cfg.seed) if cfg.packing else np.arange(len(lengths))
    )
    sample_flops = costs["flops"][rows]
    assigned = balance_costs(by_tokens, lengths, sample_flops, capacity) if cfg.balances_cost else by_tokens
    n_packs = int(assigned.max(initial=-1)) + 1
    pack_order = np.random.default_rng(cfg.seed).permutation(n_packs)  # new position of each pack
    order = np.lexsort((np.arange(len(assigned)), pack_order[assigned]))  # by new pack id, then input order
    new_ids = pack_order[assigned][order]
    bounds = np.flatnonzero(np.diff(new_ids)) + 1 if len(order) else np.zeros(0, np.int64)
    starts = np.concatenate([[0], bounds]) if len(order) else bounds
    offsets = pa.array(np.concatenate([starts, [len(order)]]), pa.int32())  # pack k: [offsets[k], offsets[k + 1])
    packed_rows, packed_lengths = rows[order], lengths[order]
    ids = tokenized.column("sample_id").take(packed_rows).combine_chunks()

    def per_pack(values: np.ndarray) -> pa.Array:
        return pa.array(np.add.reduceat(values, starts) if len(starts) else [], pa.int64())

    labels, patches = (costs[name][packed_rows] for name in ("label_tokens", "vision_patches"))
    table = pa.table(
        {
            "pack_id": pa.array(np.arange(len(starts)), pa.int64()),
            "sample_ids": pa.ListArray.from_arrays(offsets, ids),
            "sample_rows": pa.ListArray.from_arrays(offsets, pa.array(packed_rows, pa.int64())),
            "lengths": pa.ListArray.from_arrays(offsets, pa.array(packed_lengths, pa.int32())),
            "total": per_pack(packed_lengths),
            "label_tokens": per_pack(labels),
            "attention_sq": per_pack(packed_lengths**2),
            "vision_patches": per_pack(patches),
        },
        schema=PACKS_SCHEMA,
    )
    return Packing(
        table,
        *(np.bincount(pack_order[a], weights=sample_flops, minlength=n_packs) for a in (assigned, by_tokens)),
    )


def straggler_layout(params: Params) -> tuple[int, int, int, bool]:
    """(data-parallel ranks, packs per rank per micro-batch, micro-batches, balance) as the trainer will run."""
    args = params.trainer_args
    world = args.nnodes * (args.nproc_per_node or 8) // args.sp_ulysses_degree
    return max(world, 1), args.per_device_train_batch_size, args.gradient_accumulation_steps, args.balance_packs


def run(params: Params, root: Path = Path(".")) -> PackResult:
    from stages.train.data import epoch_straggler  # (imports torch: not for pack_lengths' users)

    start = time.perf_counter()
    cfg = params.dataset_config
    if not (root / TOKENIZED).is_file():
        raise StageInputError(f"{root / TOKENIZED} not found: run `qvl tokenize` first")
    table = pq.read_table(root / TOKENIZED, columns=["sample_id", "length", *COST_INPUTS])
    costs = sample_costs(table, params, root)
    fits = table.column("length").to_numpy() <= cfg.packing_length
    evaluation = held_out(root, table.column("sample_id"))
    # Tokenized row numbers (what the trainer reads the samples by) of each split's samples that fit.
    train_rows, eval_rows = np.flatnonzero(fits & ~evaluation), np.flatnonzero(fits & evaluation)
    packing, eval_packing = (build_packs(table, costs, rows, cfg) for rows in (train_rows, eval_rows))
    packs = packing.table
    write_packs({PACKS: packs, EVAL_PACKS: eval_packing.table}, root / OUT_DIR)
    world, per_device, accumulation, balance = straggler_layout(params)
    order = list(range(packs.num_rows))  # the trainer's first epoch trains the packs in pack_id order
    straggler = [
        epoch_straggler(order, dict(enumerate(cost.tolist())), world, per_device, accumulation, balance)
        for cost in (packing.cost, packing.token_packing_cost)
    ]
    tokens = int(pc.sum(packs.column("total")).as_py() or 0)
    efficiency = tokens / (packs.num_rows * cfg.packing_length) if packs.num_rows else 0.0
    result = PackResult(
        len(train_rows),
        packs.num_rows,
        tokens,
        cfg.packing_length,
        round(efficiency, 6),
        int((~fits).sum()),
        cfg.packing_strategy if cfg.packing else "none",
        len(eval_rows),
        eval_packing.table.num_rows,
        cfg.balances_cost,
        round(float(packing.cost.max() / packing.cost.mean()), 6) if packs.num_rows else 1.0,
        world,
        round(straggler[0], 6),
        round(straggler[1], 6),
        time.perf_counter() - start,
    )
    write_json(root / METRICS, result.metrics())
    return result
