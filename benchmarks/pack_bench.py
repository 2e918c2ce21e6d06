"""Packing benchmarks (issue 4): efficiency per strategy on a realistic length mix, and time for 10M lengths.

Usage: python benchmarks/pack_bench.py [--samples 200000] [--big 10000000]
The mix is long-tailed like VL fine-tuning data: short text chats, single- and multi-image samples and a
tail of long videos. `next_fit` is the greedy the peers use (one open pack; lmms-engine's "first_fit").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.pack.algorithms import STRATEGIES, assign_packs, pack_lengths  # noqa: E402


def realistic_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=n, p=[0.35, 0.40, 0.17, 0.08])
    text = rng.lognormal(5.5, 0.8, n)  # ~250 tokens median
    image = 300 + rng.lognormal(6.6, 0.6, n)  # one image: ~700-1500
    multi = 300 + rng.integers(2, 6, n) * rng.lognormal(6.4, 0.5, n)
    video = 500 + rng.lognormal(8.2, 0.6, n)  # long tail to the cap
    lengths = np.choose(kind, [text, image, multi, video])
    return np.clip(lengths.round(), 8, 16384).astype(np.int64)


def next_fit(lengths: np.ndarray, capacity: int) -> int:
    packs, room = 0, 0
    for n in lengths.tolist():
        if n > room:
            packs, room = packs + 1, capacity
        room -= n
    return packs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--big", type=int, default=10_000_000)
    args = ap.parse_args()
    assign_packs(np.array([1]), 2, "first_fit")  # compile once, outside the timings
    assign_packs(np.array([1]), 2, "best_fit_decreasing")
    for capacity in (16384, 4096):
        lengths = np.minimum(realistic_lengths(args.samples), capacity)
        total = lengths.sum()
        print(f"packing_length {capacity}: {len(lengths):,} samples, {total:,} tokens")
        print(f"  next_fit (peers)      efficiency {total / (next_fit(lengths, capacity) * capacity):.5f}")
        for strategy in STRATEGIES:
            start = time.perf_counter()
            packs = int(assign_packs(lengths, capacity, strategy).max()) + 1
            print(f"  {strategy:<21} efficiency {total / (packs * capacity):.5f} ({time.perf_counter() - start:.2f} s)")
    big = realistic_lengths(args.big, seed=1)
    for strategy in STRATEGIES:
        start = time.perf_counter()
        packs = pack_lengths(big, 16384, strategy)
        print(
            f"{args.big:,} lengths, {strategy}: {len(packs):,} packs in {time.perf_counter() - start:.1f} s "
            "(goal < 60 s)"
        )


if __name__ == "__main__":
    main()
