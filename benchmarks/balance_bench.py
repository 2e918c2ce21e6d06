"""Balanced steps (issue 19): the straggler ratio of the GPU benchmark's data mix, packed at 16k, over 8
data-parallel ranks: packs by tokens (first_fit_decreasing, the GPU benchmark's; first_fit) and first_fit with the
pack stage's cost balance (the default), each with packs assigned to ranks in order and by estimated FLOPs (the
trainer's default, trainer_args.balance_packs).

Usage: python benchmarks/balance_bench.py [--packs 1024] [--packing-length 16384] [--world 8] [--model qwen2_5_vl_3b]

The data is the GPU benchmark's (benchmarks/train_workspace.py write_dataset: 70% one image of 224-896 px sides,
30% text, ~900 tokens a sample) through the real validate -> tokenize -> pack stages with the tiny model's
processor (the released tokenizer and image processor, so the token counts are the released model's); pack prices
samples with the released architecture's config.json (model_config points at it: no weights, no GPU). Each pack's
cost is what the trainer computes (stages/train/balance.py pack_costs). Straggler ratio: per step, the busiest
rank's cost over the mean rank's, averaged over the whole steps of one epoch; 1.0 is perfect balance. Printed for
several packs per rank per step (per_device_train_batch_size x gradient_accumulation_steps). CPU only, minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_workspace import bench_params, write_dataset  # noqa: E402
from stages.released_configs import RELEASED, released_config  # noqa: E402

PACKINGS = {  # name -> dataset_config overrides
    "first_fit_decreasing (tokens)": {"packing_strategy": "first_fit_decreasing", "packing_cost_balance": None},
    "first_fit (tokens)": {"packing_strategy": "first_fit", "packing_cost_balance": False},
    "first_fit + cost balance": {"packing_strategy": "first_fit", "packing_cost_balance": None},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(RELEASED), default="qwen2_5_vl_3b")
    ap.add_argument("--packing-length", type=int, default=16384)
    ap.add_argument("--packs", type=int, default=1024, help="about how many packs to make")
    ap.add_argument("--world", type=int, default=8, help="data-parallel ranks")
    args = ap.parse_args()

    from schemas.params import parse_params
    from stages.pack import run as pack
    from stages.tiny_model import make_tiny_model
    from stages.tokenize import run as tokenize
    from stages.train.balance import pack_costs
    from stages.train.data import epoch_straggler
    from stages.train.samples import PACKS
    from stages.train.telemetry import architecture_counts
    from stages.validate import run as validate

    arch = RELEASED[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        released_config(args.model).save_pretrained(root / "released")  # config.json only: what pack prices by
        counts, text_config = architecture_counts(root / "released", arch.processor_type)
        model_dir = make_tiny_model(arch.processor_type, root / "model")  # its processor is the released one
        write_dataset(root / "data/bench", args.packs * args.packing_length // 900, seed=0)
        datasets = [{"path": "data/bench/chat.jsonl", "data_folder": "data/bench", "data_type": "jsonl"}]
        raw = bench_params(model_dir, arch.processor_type, datasets, args.packing_length)
        raw["model_config"]["load_from_pretrained_path"] = str(root / "released")
        params = parse_params(raw)
        validate(params, root)
        tokenize(params, root)
        print(f"{args.model}, packs of {args.packing_length} tokens, {args.world} data-parallel ranks")
        print(
            f"{'packing':>30} {'packs':>6} {'efficiency':>10} {'dearest/mean':>12}   "
            "straggler ratio by packs a rank a step: in order / balanced"
        )
        for name, overrides in PACKINGS.items():
            raw["dataset_config"].update(overrides)
            result = pack(parse_params(raw), root)
            cost = pack_costs(root / PACKS, counts, text_config)
            order = sorted(cost)
            figures = []
            for per_rank in (1, 2, 4, 8):
                if len(order) >= args.world * per_rank:
                    before, after = (epoch_straggler(order, cost, args.world, 1, per_rank, b) for b in (False, True))
                    figures.append(f"{per_rank}: {before:.4f} / {after:.4f}")
            print(
                f"{name:>30} {result.packs:>6} {result.efficiency:>10.5f} {result.cost_max_over_mean:>12.4f}   "
                + "; ".join(figures)
            )


if __name__ == "__main__":
    main()
