"""Started by torchrun from test_sequence_parallel.py: the loss and gradients of one packed row (images and
videos, a shard boundary inside a run of vision tokens) with Ulysses SP over all ranks vs no SP, as JSON. For a
mixture-of-experts model the loss includes the row's router balance loss (weight 1, so its gradients count)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoProcessor

from schemas.params import load_params
from stages.families import family
from stages.fast_exit import exit_now
from stages.tokenize.vision import VisionArgs
from stages.train.attention import ATTENTION_NAME
from stages.train.data import RowBuilder
from stages.train.forward import row_losses
from stages.train.sequence_parallel import build_layout, pad_row, shard_text_model_inputs

CPU = torch.device("cpu")


def boundary_in_vision(row, builder, degree: int) -> bool:
    padded = pad_row(row, degree, 0)
    vision = (padded.input_ids[0] == builder.image_token) | (padded.input_ids[0] == builder.video_token)
    shard = padded.tokens // degree
    return any(bool(vision[b - 1] and vision[b]) for b in range(shard, padded.tokens, shard))


def pick_row(builder, degree: int):
    """The first one- or two-pack row with real images and videos and a shard boundary inside vision tokens."""
    ids = sorted(builder.packs)
    for packs in [[p] for p in ids] + [[a, b] for a in ids for b in ids if a < b]:
        row = builder.build(packs)
        real = {k for k, v in row.vision.items() if k.endswith("grid_thw") and int(v.prod(-1).sum()) > 64}
        if len(real) == 2 and boundary_in_vision(row, builder, degree):
            return row
    raise SystemExit("no pack combination has images, videos and a shard boundary inside vision tokens")


def loss_and_grads(model, row, sp, router: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy (this rank's labels) + the balance loss (held whole by every SP rank: 1/degree each)."""
    model.zero_grad(set_to_none=True)
    parts = row_losses(model, row, CPU, sp, router=router)
    loss = parts.cross_entropy
    if parts.router_balance is not None:
        loss = loss + parts.router_balance / (sp.size if sp is not None else 1)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main(params_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    params = load_params(params_path)
    fam = family(params.dataset_config.processor_config.processor_type)
    model_dir = params.model_config_.load_from_pretrained_path
    model = fam.transformers_class(fam.model_class).from_pretrained(
        model_dir, attn_implementation={"text_config": ATTENTION_NAME, "vision_config": "sdpa"}, dtype=torch.float32
    )
    processor = AutoProcessor.from_pretrained(model_dir)
    vision = VisionArgs.for_processor(processor, params.dataset_config)
    builder = RowBuilder(Path.cwd(), processor, vision, fam.transformers_class(fam.model_class), model.config)
    degree = dist.get_world_size()
    row = pick_row(builder, degree)

    reference_loss, reference_grads = loss_and_grads(model, row, None, fam.moe)
    sp = build_layout(degree).sp
    shard_text_model_inputs(model.get_submodule(fam.text_model_prefix), sp)
    loss, grads = loss_and_grads(model, row, sp, fam.moe)
    dist.all_reduce(loss)  # each rank scored its own shard's labels
    for name in sorted(reference_grads):
        grad = grads.get(name, torch.zeros_like(reference_grads[name]))
        dist.all_reduce(grad)
        grads[name] = grad
    diff = sum(float((grads[n] - g).norm() ** 2) for n, g in reference_grads.items()) ** 0.5
    norm = sum(float(g.norm() ** 2) for g in reference_grads.values()) ** 0.5
    if dist.get_rank() == 0:
        result = {
            "tokens": row.tokens,
            "loss": float(loss),
            "reference_loss": float(reference_loss),
            "grad_relative_error": diff / norm,
            "vision_grad_norm": sum(
                float(g.norm()) for n, g in reference_grads.items() if n.startswith(fam.vision_tower_prefix)
            ),
            "parameters_with_grad": len(reference_grads),
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_now(0)
