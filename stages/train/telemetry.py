"""Throughput and MFU, with the FLOP formula written down, and the metrics / loss-curve files.

FLOPs of one training step (forward + backward = 3 x forward), the convention behind every MFU figure here:
  language model: 6 x N_lm x tokens                       (N_lm = non-embedding language-model parameters)
                + 6 x N_head x label positions            (lm_head: only label positions reach it here)
                + 12 x n_layers x n_heads x head_dim x sum(len_i^2)   (attention per packed sample, as verl counts)
  vision tower:   6 x N_vision x vision patches           (separately; attention inside the tower left out)
MFU = FLOPs / (seconds x world x peak), peak = the GPU's dense bf16 TFLOP/s recognised from its name (None
where unknown, and on CPU). Throughput and MFU leave out each process's first (warm-up) step when it ran more.
Wall times are kept by the running process only, never in a checkpoint or a stage output: two runs of the same
inputs write the same bytes, and a resumed run's speed figures cover the steps it ran itself.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stages.io import atomic_file, write_json
from stages.train.plot import loss_svg

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MFU_CONVENTION = (
    "6*N_lm*tokens + 6*N_lm_head*label_positions + 12*layers*heads*head_dim*sum(len^2); vision 6*N_vision*patches; "
    "dense bf16 peak; warm-up step excluded"
)
# Dense bf16 TFLOP/s by device-name fragment, most specific first (torch.cuda.get_device_name, e.g.
# "NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)


def parameter_counts(model, vision_prefix: str) -> dict[str, int]:
    """Parameters by role: ``lm`` (non-embedding language model; of a mixture of experts, the share a token uses:
    num_experts_per_tok of num_experts), ``head`` (lm_head), ``vision`` (tower)."""
    counts = {"lm": 0, "head": 0, "vision": 0}
    head = model.get_output_embeddings()
    counts["head"] = head.weight.numel()
    text = model.config.get_text_config()
    active = getattr(text, "num_experts_per_tok", 1) / getattr(text, "num_experts", 1)
    for name, p in model.named_parameters():
        if name.startswith(vision_prefix):
            counts["vision"] += p.numel()
        elif "embed_tokens" not in name and not name.startswith("lm_head"):
            counts["lm"] += round(p.numel() * active) if ".mlp.experts." in name else p.numel()
    return counts


def architecture_counts(model_dir: Path, processor_type: str) -> tuple[dict[str, int], PretrainedConfig]:
    """(parameter_counts, text config) of the model at ``model_dir`` from its config.json alone: the architecture
    built on the meta device (no weights read, no memory), so a CPU stage can price work as the trainer will."""
    from transformers import AutoConfig

    from stages.families import family

    fam = family(processor_type)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = fam.transformers_class(fam.model_class)._from_config(config)
    return parameter_counts(model, fam.vision_tower_prefix), config.get_text_config()


def flops(counts: dict[str, int], text_config, tokens, attention_sq, label_positions, vision_patches):
    """(language-model FLOPs, vision FLOPs) of one step's work (see the module docstring): ``attention_sq`` is the
    sum of the squared packed sample lengths. Scalars or numpy arrays (one entry per pack) alike."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    attention = 12 * text_config.num_hidden_layers * text_config.num_attention_heads * head_dim * attention_sq
    lm = 6 * counts["lm"] * tokens + 6 * counts["head"] * label_positions + attention
    return lm, 6 * counts["vision"] * vision_patches


def step_flops(
    counts: dict[str, int], text_config, seq_lengths: list[int], label_positions: int, vision_patches: int
) -> tuple[float, float]:
    """(language-model FLOPs, vision FLOPs) for the given packed sample lengths."""
    squares = sum(n * n for n in seq_lengths)
    return flops(counts, text_config, sum(seq_lengths), squares, label_positions, vision_patches)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU called ``name``; None for one not in the table."""
    return next((v for k, v in PEAK_BF16 if k in name), None)


def summarize(history: list[dict]) -> dict:
    """metrics/train.json: what the inputs alone decide (the last loss, steps, token counts), so the train stage's
    outputs are the same bytes on every machine; speed and hardware figures go to metrics/train_speed.json."""
    return {
        "final_loss": history[-1]["loss"],
        "steps": history[-1]["step"],
        "tokens": sum(h["tokens"] for h in history),
        "label_tokens": sum(h["label_tokens"] for h in history),
        # estimated FLOPs of the busiest data-parallel rank over the mean rank, averaged over steps: as trained,
        # and as the positional layout would have been (1.0: balanced; see stages/train/balance.py)
        "straggler_ratio": sum(h["straggler"] for h in history) / len(history),
        "straggler_ratio_in_order": sum(h["straggler_in_order"] for h in history) / len(history),
        **({"router_balance_loss": history[-1]["router_balance"]} if "router_balance" in history[-1] else {}),
        **eval_summary(history),
    }


def eval_summary(history: list[dict]) -> dict:
    """The held-out loss of the last evaluation, the best one and its step (nothing when eval is off)."""
    evals = [h for h in history if "eval_loss" in h]
    if not evals:
        return {}
    best = min(evals, key=lambda h: (h["eval_loss"], h["step"]))
    return {"eval_loss": evals[-1]["eval_loss"], "best_eval_loss": best["eval_loss"], "best_eval_step": best["step"]}


def speed(
    history: list[dict], seconds: dict[int, float], peak: float | None, world: int, peak_mem_gb: float | None
) -> dict:
    """metrics/train_speed.json: throughput and MFU over the steps this process ran (``seconds``: step -> wall
    time; after a resume, only the steps since), its first (warm-up) step left out when it ran more than one."""
    timed = [h for h in history if h["step"] in seconds]
    steady = timed[1:] or timed
    wall = sum(seconds[h["step"]] for h in steady)
    lm = sum(h["lm_flops"] for h in steady)
    vis = sum(h["vision_flops"] for h in steady)
    measured = wall > 0
    return {
        "steps_timed": len(timed),
        "first_timed_step": timed[0]["step"] if timed else None,
        "tokens_per_s": sum(h["tokens"] for h in steady) / wall if measured else None,
        "label_tokens_per_s": sum(h["label_tokens"] for h in steady) / wall if measured else None,
        "first_step_s": seconds[timed[0]["step"]] if timed else None,
        "mfu": lm / (wall * peak * world) if measured and peak else None,
        "mfu_with_vision": (lm + vis) / (wall * peak * world) if measured and peak else None,
        "mfu_convention": MFU_CONVENTION,
        "peak_tflops": peak / 1e12 if peak else None,
        "peak_mem_gb": peak_mem_gb,
        "world_size": world,
    }


def write_outputs(root: Path, history: list[dict], summary: dict, speed_figures: dict) -> None:
    """metrics/train.json, plots/train_loss.csv, plots/eval_loss.csv, plots/train_loss.svg and
    metrics/train_speed.json, each written to a temp file and renamed. The first four are train-stage outputs
    (hashed into dvc.lock); the speed file is a top-level DVC metric, shown by `dvc metrics show` but never
    hashed."""
    write_json(root / "metrics/train.json", summary)
    write_json(root / "metrics/train_speed.json", speed_figures)
    with atomic_file(root / "plots/train_loss.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "tokens", "label_tokens"])
        writer.writeheader()
        writer.writerows({k: h[k] for k in writer.fieldnames} for h in history)
    with atomic_file(root / "plots/eval_loss.csv") as tmp, open(tmp, "w", newline="") as f:  # a header alone: no eval
        writer = csv.DictWriter(f, fieldnames=["step", "eval_loss", "eval_label_tokens"])
        writer.writeheader()
        writer.writerows({k: h[k] for k in writer.fieldnames} for h in history if "eval_loss" in h)
    with atomic_file(root / "plots/train_loss.svg") as tmp:
        tmp.write_text(loss_svg(history))
