"""Training throughput on CPU (issues 5 and 14): the same measuring core as the GPU benchmark
(benchmarks/train_core.py: one process per configuration, the trainer's own model loading, qvl_packed and FSDP2,
real tokens only) on the demo data (images, videos, text) with the tiny Qwen2.5-VL model in fp32, plus the row
builder's throughput against the trainer's consumption.

Usage: python benchmarks/train_cpu.py [--steps 4] [--out benchmarks/train_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import train_core, train_runner  # noqa: E402
from benchmarks.train_workspace import bench_params, load_workspace_params, prepare  # noqa: E402

DEMO_DATASETS = [
    {"path": "data/demo/chat.jsonl", "data_folder": "data/demo", "data_type": "jsonl"},
    {"path": "data/demo/qwen_utils.parquet", "data_folder": "data/demo", "data_type": "parquet"},
    {"path": "data/demo/qwen_official.json", "data_folder": "data/demo", "data_type": "json"},
]


def build_workspace(root: Path, family_name: str, packing_length: int) -> None:
    from stages.demo import write_demo
    from stages.tiny_model import make_tiny_model

    write_demo(root / "data/demo")
    model_dir = make_tiny_model(family_name, root / "model")
    video = {"video_min_pixels": 12544, "video_max_pixels": 50176, "video_max_frames": 8}
    prepare(root, bench_params(model_dir, family_name, DEMO_DATASETS, packing_length, **video), decode=True)


def builder_throughput(root: Path) -> dict:
    """Rows built per second in one process (the trainer's loader runs this in background workers)."""
    from transformers import AutoProcessor

    from stages.families import family
    from stages.train.data import RowBuilder

    params = load_workspace_params(root)
    fam = family(params.dataset_config.processor_config.processor_type)
    model_dir = params.model_config_.load_from_pretrained_path
    processor = AutoProcessor.from_pretrained(model_dir)
    from transformers import AutoConfig

    builder = RowBuilder.for_family(root, processor, params.dataset_config, fam, AutoConfig.from_pretrained(model_dir))
    started = time.perf_counter()
    rows = [builder.build([p]) for p in sorted(builder.packs)]
    seconds = time.perf_counter() - started
    return {"rows_per_s": len(rows) / seconds, "tokens_per_s": sum(r.tokens for r in rows) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen2_5_vl")
    ap.add_argument("--packing-length", type=int, default=1024)
    ap.add_argument("--configs", default="full_path,full_path_no_liger,baseline")
    ap.add_argument("--out", default="benchmarks/train_cpu.json")
    train_runner.add_measure_args(ap)
    args = ap.parse_args()
    if args.config:
        train_core.child_main(args)
        return
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_workspace(root, args.family, args.packing_length)
        configs = train_runner.run_configs(
            Path(__file__).resolve(), root, args.configs.split(","), train_runner.forward_args(args), out, 1800
        )
        builder = builder_throughput(root)
    full = configs.get("full_path", {})
    result = {
        **train_runner.environment(torch.device("cpu")),
        "model": f"tiny {args.family}",
        "packing_length": args.packing_length,
        "conventions": train_core.CONVENTIONS,
        "configs": configs,
        "comparison": train_runner.compare(configs),
        "row_builder": builder,
        "trainer_rows_per_s": 1 / (full["seconds"] / full["steps"]) if "seconds" in full else None,
    }
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
