"""Balanced steps (issue 19): the straggler ratio of the GPU benchmark's data mix, packed at 16k, over 8
data-parallel ranks, with packs assigned to ranks in order (as before) and by estimated FLOPs (the trainer's
default, trainer_args.balance_packs).

Usage: python benchmarks/balance_bench.py [--packs 1024] [--packing-length 16384] [--world 8] [--model qwen2_5_vl_3b]

The data is the GPU benchmark's (benchmarks/train_workspace.py write_dataset: 70% one image of 224-896 px sides,
30% text, ~900 tokens a sample) through the real validate -> tokenize -> pack stages with the tiny model's
processor (the released tokenizer and image processor, so the token counts are the released model's). Each pack's
cost is what the trainer computes (stages/train/balance.py pack_costs) with the parameter counts of the released
architecture, built on the meta device (no weights, no GPU). Straggler ratio: per step, the busiest rank's cost
over the mean rank's, averaged over the steps of one epoch; 1.0 is perfect balance. Printed for several packs per
rank per step (per_device_train_batch_size x gradient_accumulation_steps). CPU only, a minute or two.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_workspace import bench_params, prepare, write_dataset  # noqa: E402
from stages.released_configs import RELEASED, released_config  # noqa: E402


def ratios(order: list[int], cost: dict[int, float], world: int, per_rank: int) -> tuple[float, float]:
    """(in order, balanced) straggler ratios over one epoch of ``order``, ``per_rank`` packs a rank a step."""
    from stages.train.balance import straggler_ratio
    from stages.train.data import step_assignment

    steps = len(order) // (world * per_rank)  # whole steps only: a short last step idles ranks either way
    figures = []
    for balance in (None, cost):
        per_step = [straggler_ratio(step_assignment(order, s, world, 1, per_rank, balance), cost) for s in range(steps)]
        figures.append(sum(per_step) / len(per_step))
    return figures[0], figures[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(RELEASED), default="qwen2_5_vl_3b")
    ap.add_argument("--packing-length", type=int, default=16384)
    ap.add_argument("--packs", type=int, default=1024, help="about how many packs to make")
    ap.add_argument("--world", type=int, default=8, help="data-parallel ranks")
    args = ap.parse_args()

    import torch

    from stages.families import family
    from stages.tiny_model import make_tiny_model
    from stages.train.balance import pack_costs
    from stages.train.samples import PACKS
    from stages.train.telemetry import parameter_counts

    arch = RELEASED[args.model]
    fam = family(arch.processor_type)
    config = released_config(args.model)
    with torch.device("meta"):
        model = fam.transformers_class(fam.model_class)._from_config(config)
    counts = parameter_counts(model, fam.vision_tower_prefix)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_tiny_model(arch.processor_type, root / "model")  # its processor is the released one
        write_dataset(root / "data/bench", args.packs * args.packing_length // 900, seed=0)
        datasets = [{"path": "data/bench/chat.jsonl", "data_folder": "data/bench", "data_type": "jsonl"}]
        prepare(root, bench_params(model_dir, arch.processor_type, datasets, args.packing_length))
        cost = pack_costs(root / PACKS, counts, config.text_config)
    order = sorted(cost)
    values = sorted(cost.values())
    print(
        f"{len(order)} packs of {args.packing_length} tokens, {args.model} costs: min {values[0]:.3e} "
        f"median {values[len(values) // 2]:.3e} max {values[-1]:.3e} FLOPs"
    )
    print(f"{'packs per rank per step':>24} {'in order':>9} {'balanced':>9}   ({args.world} data-parallel ranks)")
    for per_rank in (1, 2, 4, 8):
        if len(order) >= args.world * per_rank:
            before, after = ratios(order, cost, args.world, per_rank)
            print(f"{per_rank:>24} {before:>9.4f} {after:>9.4f}")


if __name__ == "__main__":
    main()
