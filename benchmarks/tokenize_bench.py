"""Tokenisation throughput (issue 4) in samples/s: one process (the renderer alone) and the whole stage on all cores.

Usage: python benchmarks/tokenize_bench.py [--samples 4000]
Samples: the demo's image and text chats repeated with varied text (the tiny Qwen2.5-VL processor, whose
tokenizer and chat template are the released ones).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.params import parse_params  # noqa: E402
from stages.cpus import available_cpus  # noqa: E402
from stages.demo import write_demo  # noqa: E402
from stages.tiny_model import make_tiny_model  # noqa: E402
from stages.tokenize import load_processor  # noqa: E402
from stages.tokenize import run as tokenize  # noqa: E402
from stages.tokenize.render import SampleRenderer  # noqa: E402
from stages.tokenize.vision import VisionArgs  # noqa: E402
from stages.validate import run as validate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo(root / "data/demo")
        model = make_tiny_model("qwen2_5_vl", root / "model")
        rows = [json.loads(line) for line in (root / "data/demo/chat.jsonl").read_bytes().splitlines()[:17]]
        rows = [r for r in rows if "video_url" not in json.dumps(r)]
        with open(root / "data/demo/many.jsonl", "w") as f:
            for i in range(args.samples):
                row = json.loads(json.dumps(rows[i % len(rows)]))
                row["messages"][-1]["content"] = f"Answer number {i}: " + json.dumps(row["messages"][-1]["content"])
                f.write(json.dumps(row) + "\n")
        params = parse_params(
            {
                "dataset_config": {
                    "datasets": [{"path": "data/demo/many.jsonl", "data_folder": "data/demo"}],
                    "processor_config": {"processor_name": str(model)},
                },
                "validate": {"media_cache": ".cache/m.duckdb"},
            }
        )
        validate(params, root)
        import pyarrow.parquet as pq

        samples = pq.read_table(root / "data/validated/samples.parquet").to_pylist()
        processor = load_processor(params)
        renderer = SampleRenderer(processor, VisionArgs.for_processor(processor, params.dataset_config), None, None)
        batch = [(s["sample_id"], s["messages"], s["media"]) for s in samples]
        start = time.perf_counter()
        for i in range(0, len(batch), 256):
            renderer.render(batch[i : i + 256])
        single = len(batch) / (time.perf_counter() - start)
        print(f"one process: {single:,.0f} samples/s ({len(batch):,} samples)")
        result = tokenize(params, root)
        print(
            f"tokenize stage, {available_cpus()} CPUs (incl. worker start-up and writes): "
            f"{result.tokenized / result.seconds:,.0f} samples/s ({result.tokens:,} tokens)"
        )
        shutil.rmtree(root / "data/tokenized")


if __name__ == "__main__":
    main()
