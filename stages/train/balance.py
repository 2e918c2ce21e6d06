"""Which data-parallel rank trains which pack of a step: balanced by estimated compute, not by position.

The loader fixes a step's packs (the same packs in the same steps whatever the balance); only their assignment to
ranks changes, so a step's loss (summed over ranks) is the same and a resumed run makes the same assignment. A
pack's cost is its FLOPs (stages/train/telemetry.py ``flops``: tokens, attention per sample, lm_head, vision
tower), from the columns pack writes. Greedy longest-processing-time with a slot limit: the heaviest pack first,
each to the least-loaded rank with a free slot (ties: the lower rank); then each rank's packs, heaviest first,
fill its micro-batches, so the a-th micro-batches of all ranks (which run their collectives together) hold packs
of similar cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from stages.train.telemetry import flops

Assignment = list[list[list[int]]]  # [rank][micro-batch] -> pack ids


def pack_costs(packs_path: Path, counts: dict[str, int], text_config) -> dict[int, float]:
    """pack_id -> estimated FLOPs of training it (language model + vision tower)."""
    table = pq.read_table(packs_path, columns=["pack_id", "total", "label_tokens", "attention_sq", "vision_patches"])
    columns = {name: table.column(name).to_numpy().astype(np.float64) for name in table.column_names[1:]}
    lm, vision = flops(
        counts,
        text_config,
        columns["total"],
        columns["attention_sq"],
        columns["label_tokens"],
        columns["vision_patches"],
    )
    return dict(zip(table.column("pack_id").to_pylist(), (lm + vision).tolist(), strict=True))


def in_order(packs: list[int], world: int, per_device: int, accumulation: int) -> Assignment:
    """The positional layout: micro-batch a of rank r takes packs [(a x world + r) x per_device, ...)."""
    return [
        [packs[(a * world + r) * per_device : (a * world + r + 1) * per_device] for a in range(accumulation)]
        for r in range(world)
    ]


def balanced(packs: list[int], cost: Mapping[int, float], world: int, per_device: int, accumulation: int) -> Assignment:
    """The step's packs spread over ``world`` ranks of per_device x accumulation slots, heaviest first."""
    slots = per_device * accumulation
    loads, mine = [0.0] * world, [[] for _ in range(world)]
    for pack in sorted(packs, key=lambda p: (-cost[p], p)):
        rank = min((r for r in range(world) if len(mine[r]) < slots), key=lambda r: (loads[r], r))
        mine[rank].append(pack)
        loads[rank] += cost[pack]
    return [[own[a * per_device : (a + 1) * per_device] for a in range(accumulation)] for own in mine]


def straggler_ratio(assignment: Assignment, cost: Mapping[int, float]) -> float:
    """The heaviest rank's cost over the mean rank's cost in one step (1.0: perfectly balanced)."""
    loads = [sum(cost[p] for micro in rank for p in micro) for rank in assignment]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0
