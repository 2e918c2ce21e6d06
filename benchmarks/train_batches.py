"""What the training benchmarks train on, and how they count it (benchmarks/train_core.py).

Real tokens only: the samples' own ``input_ids``, never the padding of the baseline, the label-free filler
image/video segments the row builder appends to rows without images or videos, or SP padding. The baseline's
micro-batches are what the Hugging Face Trainer gives with ``group_by_length`` and a data collator over processor
outputs: length-sorted, right-padded, at most a token budget each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.train.data import IGNORE, RowBuilder


def real_lengths(builder: RowBuilder, sample_ids: list[str]) -> list[int]:
    return [len(builder.samples[s]["input_ids"]) for s in sample_ids]


def label_positions(builder: RowBuilder, sample_ids: list[str]) -> int:
    """Label tokens after the shift inside each sample (what reaches the loss)."""
    return sum(sum(label != IGNORE for label in builder.samples[s]["labels"][1:]) for s in sample_ids)


def real_patches(builder: RowBuilder, sample_ids: list[str]) -> int:
    grids = [g for s in sample_ids for k in ("image_grid_thw", "video_grid_thw") for g in builder.samples[s][k]]
    return sum(t * h * w for t, h, w in grids)


def micro_batches(builder: RowBuilder, sample_ids: list[str], budget: int) -> list[list[str]]:
    """Longest first (``group_by_length``), each micro-batch at most ``budget`` padded tokens (one sample if it
    alone is longer)."""
    ordered = sorted(sample_ids, key=lambda s: -len(builder.samples[s]["input_ids"]))
    groups: list[list[str]] = []
    for s in ordered:
        longest = len(builder.samples[groups[-1][0]]["input_ids"]) if groups else 0
        if groups and (len(groups[-1]) + 1) * longest <= budget:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


@dataclass
class Padded:
    """One right-padded HF-style micro-batch."""

    inputs: dict[str, torch.Tensor]
    tokens: int  # padded tokens through the model
    label_tokens: int


def padded_batch(builder: RowBuilder, sample_ids: list[str], pad_id: int, takes_seconds: bool) -> Padded:
    """input_ids / attention_mask / labels (unshifted; the model's loss shifts) and the samples' pixels, as a
    data collator over processor outputs gives them; the model computes its own M-RoPE positions."""
    samples = [builder.samples[s] for s in sample_ids]
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    vision = builder.build_samples(sample_ids).vision  # the samples' pixels, plus filler for absent kinds
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "mm_token_type_ids": ((ids == builder.image_token).int() + 2 * (ids == builder.video_token).int()),
    }
    if any(s["image_paths"] for s in samples):
        inputs |= {k: vision[k] for k in ("pixel_values", "image_grid_thw")}
    if any(s["video_keys"] for s in samples):
        inputs |= {k: vision[k] for k in ("pixel_values_videos", "video_grid_thw")}
        if takes_seconds:
            inputs["second_per_grid_ts"] = torch.tensor([t for s in samples for t in s["second_per_grid_ts"]])
    return Padded(inputs, ids.numel(), int((labels[:, 1:] != IGNORE).sum()))
