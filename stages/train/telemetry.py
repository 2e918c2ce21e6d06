"""Throughput and MFU, with the FLOP formula written down, and the metrics / loss-curve files.

FLOPs of one training step (forward + backward = 3 x forward):
  language model: 6 x N_lm x tokens + 12 x n_layers x n_heads x head_dim x sum(len_i^2)  (verl's count;
                  N_lm = non-embedding language-model parameters, len_i = each packed sample's length)
  vision tower:   6 x N_vision x vision_patches  (counted separately; attention inside the tower left out)
MFU = FLOPs / (seconds x peak); peak bf16 dense is 989 TFLOP/s on H100 SXM and H200, unknown on CPU (None).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12}


def parameter_counts(model, vision_prefix: str) -> tuple[int, int]:
    """(non-embedding language-model parameters, vision-tower parameters)."""
    lm = vision = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith(vision_prefix):
            vision += n
        elif "embed_tokens" not in name and not name.startswith("lm_head"):
            lm += n
    return lm, vision


def step_flops(
    lm_params: int, vision_params: int, text_config, seq_lengths: list[int], vision_patches: int
) -> tuple[float, float]:
    """(language-model FLOPs, vision FLOPs) for the given packed sample lengths."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    attention = (
        12
        * text_config.num_hidden_layers
        * text_config.num_attention_heads
        * head_dim
        * sum(n * n for n in seq_lengths)
    )
    return 6 * lm_params * sum(seq_lengths) + attention, 6 * vision_params * vision_patches


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def write_outputs(root: Path, history: list[dict], summary: dict) -> None:
    """metrics/train.json and plots/train_loss.csv, each written to a temp file and renamed."""
    for path in (root / "metrics", root / "plots"):
        path.mkdir(parents=True, exist_ok=True)
    tmp = root / "metrics" / ".train.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / "metrics" / "train.json")
    tmp = root / "plots" / ".train_loss.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "tokens", "label_tokens"])
        writer.writeheader()
        writer.writerows({k: h[k] for k in writer.fieldnames} for h in history)
    os.replace(tmp, root / "plots" / "train_loss.csv")
