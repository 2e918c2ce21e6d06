"""GPU training benchmark (issue 14): this project's path against the baseline users run, one process per
configuration (benchmarks/train_core.py says what each measures and how it counts).

A randomly initialised model of a released architecture (stages/released_configs.py), saved once and loaded as
the trainer loads a checkpoint (``build_model`` on the meta device, FSDP2, ``materialize``); image+text and
text-only chat samples made like the demo's, run through the real validate -> tokenize -> pack stages; FSDP2 on
one rank (two for SP=2), bf16 compute with fp32 master weights, gradient checkpointing, the trainer's AdamW
groups. Writes one JSON (--out) with every configuration's tokens/s, MFU (language model only, and with
vision), peak memory, first-step loss and longest trainable row, the conventions used, and the comparison with
the targets; each child's own JSON lies beside it.

    python benchmarks/train_gpu.py                          # one H100/H200: Qwen2.5-VL-3B architecture, 16k packs
    python benchmarks/train_gpu.py --model qwen3_vl_4b      # Qwen3-VL-4B architecture
    python benchmarks/train_gpu.py --smoke                  # any machine: tiny model, 1k packs (checks the script)
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
from benchmarks.train_workspace import bench_params, prepare, save_random_checkpoint, write_dataset  # noqa: E402
from stages.families import family  # noqa: E402
from stages.released_configs import RELEASED, released_config  # noqa: E402

# The tiny model's 152k-token vocabulary makes ~1-4 s of CPU per 1k-token step: the smoke keeps to a few steps.
SMOKE = {"packing_length": 1024, "steps": 1, "warmup": 1, "search_start": 1024, "search_limit": 1024, "bisections": 0}


def build_workspace(root: Path, args: argparse.Namespace) -> None:
    """Synthetic chat data through the real stages, and the checkpoint every child loads."""
    from stages.tiny_model import make_tiny_model

    arch = RELEASED[args.model]
    model_dir = root / "model"
    if args.smoke:
        make_tiny_model(arch.processor_type, model_dir)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        save_random_checkpoint(released_config(args.model), arch.processor_type, model_dir, device)
    # ~600 tokens per sample on average: enough packs for warm-up + measured steps, with room to spare
    samples = (args.warmup + args.steps + 2) * args.packing_length // 400
    write_dataset(root / "data/bench", samples, seed=0)
    datasets = [{"path": "data/bench/chat.jsonl", "data_folder": "data/bench", "data_type": "jsonl"}]
    prepare(root, bench_params(model_dir, arch.processor_type, datasets, args.packing_length))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(RELEASED), default="qwen2_5_vl_3b")
    ap.add_argument("--packing-length", type=int, default=16384)
    ap.add_argument("--configs", default="full_path,baseline,full_path_no_liger,sp2")
    ap.add_argument("--smoke", action="store_true", help="tiny model and rows on any device (checks the script)")
    ap.add_argument("--out", default="benchmarks/train_gpu.json")
    ap.add_argument("--child-timeout-s", type=float, default=420)
    train_runner.add_measure_args(ap)
    args = ap.parse_args()
    if args.config:
        train_core.child_main(args)
        return
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == ap.get_default(key):  # explicit flags win (the forced-OOM test)
                setattr(args, key, value)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    result = {
        **train_runner.environment(device),
        "model": f"tiny {RELEASED[args.model].processor_type}" if args.smoke else args.model,
        "family": family(RELEASED[args.model].processor_type).processor_type,
        "packing_length": args.packing_length,
        "smoke": args.smoke,
        "conventions": train_core.CONVENTIONS,
    }

    def write(configs: dict[str, dict]) -> None:
        result.update(configs=configs, comparison=train_runner.compare(configs))
        result["seconds"] = {"prepare": prepared, "total": time.monotonic() - started}
        out.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_workspace(root, args)
        prepared = time.monotonic() - started
        script, extra = Path(__file__).resolve(), train_runner.forward_args(args)
        names = args.configs.split(",")
        configs = train_runner.run_configs(script, root, names, extra, out, args.child_timeout_s, write)
    write(configs)
    print(json.dumps(result, indent=2))
    failed = [n for n, c in configs.items() if "error" in c]
    if failed:
        raise SystemExit(f"configuration(s) failed without a result: {failed}")


if __name__ == "__main__":
    main()
