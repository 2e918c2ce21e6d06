"""One packed row through the model: the cross-entropy summed over this rank's label tokens.

Only label positions reach the LM head (``logits_to_keep``); with Liger the fused linear cross-entropy never
materialises even those logits. With sequence parallelism the row is padded to a multiple of the degree and
this rank scores the labels of its own shard (stages/train/sequence_parallel.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.train.attention import PackedSegments
from stages.train.data import IGNORE, Row
from stages.train.sequence_parallel import SequenceParallel, pad_row


def row_loss_sum(
    model, row: Row, device: torch.device, sp: SequenceParallel | None = None, liger: bool = False, pad_id: int = 0
) -> torch.Tensor:
    if sp is not None:
        row = pad_row(row, sp.size, pad_id)
    start, end = sp.bounds(row.tokens) if sp is not None else (0, row.tokens)
    targets = row.targets[0, start:end]
    keep = (targets != IGNORE).nonzero().flatten()
    kept_targets = targets[keep].to(device)
    inputs = {
        "input_ids": row.input_ids.to(device),
        "position_ids": row.position_ids.to(device),
        "use_cache": False,
        "logits_to_keep": keep.to(device),
        "packed_segments": PackedSegments.from_text_positions(row.position_ids[0, 0], device, sp),
        **{k: v.to(device) for k, v in row.vision.items()},
    }
    if liger and keep.numel():
        # Liger's forward: the loss is sum / num_items_in_batch, so 1 gives the sum; targets are already shifted.
        return model(**inputs, shift_labels=kept_targets.view(1, -1), skip_logits=True, num_items_in_batch=1).loss
    logits = model(**inputs).logits
    return F.cross_entropy(logits[0].float(), kept_targets, reduction="sum")
