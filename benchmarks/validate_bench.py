"""Validate throughput: N rows (text and image references into a few hundred real files) through the stage.

Usage: python benchmarks/validate_bench.py [--rows 1000000] [--images 300]
Prints rows/s end to end (load + SQL rules + media checks + Parquet writes), cold and with a warm media cache.
Goal (issue 2): at least 100,000 rows/s on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from schemas.params import parse_params  # noqa: E402
from stages.validate import run  # noqa: E402


def make_dataset(root: Path, rows: int, images: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    for i in range(images):
        w, h = rng.choice([(640, 480), (320, 240), (800, 600), (256, 512)])
        Image.new("RGB", (w, h), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(root / "images" / f"{i}.jpg")
    words = [
        "the",
        "a",
        "red",
        "blue",
        "cat",
        "dog",
        "runs",
        "sits",
        "on",
        "under",
        "table",
        "chair",
        "sky",
        "bright",
        "photo",
        "shows",
    ]
    with open(root / "rows.jsonl", "w") as f:
        for i in range(rows):
            q = " ".join(rng.choices(words, k=8)) + f" #{i}"
            a = " ".join(rng.choices(words, k=16))
            kind = rng.random()
            if kind < 0.4:
                user: object = q
            else:
                n = 1 if kind < 0.8 else 2
                user = [
                    {"type": "image_url", "image_url": {"url": f"images/{rng.randrange(images)}.jpg"}} for _ in range(n)
                ] + [{"type": "text", "text": q}]
            f.write(
                json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": a}]})
                + "\n"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_dataset(root / "data", args.rows, args.images)
        print(f"generated {args.rows:,} rows over {args.images} images in {time.perf_counter() - t:.1f} s")
        params = parse_params(
            {
                "dataset_config": {"datasets": [{"path": "data/rows.jsonl", "data_folder": "data"}]},
                "validate": {"media_cache": ".cache/media.duckdb"},
            }
        )
        for label in ("cold media cache", "warm media cache"):
            result = run(params, root)
            print(
                f"validate ({label}): {result.input:,} rows in {result.seconds:.2f} s = "
                f"{result.input / result.seconds:,.0f} rows/s (accepted {result.accepted:,}, "
                f"rejected {result.rejected:,})"
            )


if __name__ == "__main__":
    main()
