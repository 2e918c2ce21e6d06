"""Started by torchrun from test_liger_distributed.py (2 ranks, gloo): the loss and gradients of packed rows with
images and video under FSDP2 (real ``wrap_fsdp2``), plain and with ``use_liger_kernel`` (CPU stand-ins), and
with the stand-ins plus Ulysses SP over both ranks, each against one process without FSDP; as JSON."""

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
from stages.train.attention import ATTENTION_NAME, implementation_map
from stages.train.data import RowBuilder
from stages.train.forward import row_loss_sum
from stages.train.liger import apply_liger
from stages.train.model import wrap_fsdp2
from stages.train.sequence_parallel import build_layout, shard_text_model_inputs

CPU = torch.device("cpu")


def rows_with_images_and_video(builder, count: int) -> list:
    """The first ``count`` one- or two-pack rows with real images and videos (not only label-free dummies)."""
    ids = sorted(builder.packs)
    rows = []
    for packs in [[p] for p in ids] + [[a, b] for a in ids for b in ids if a < b]:
        row = builder.build(packs)
        if sum(int(v.prod(-1).sum()) > 64 for k, v in row.vision.items() if k.endswith("grid_thw")) == 2:
            rows.append(row)
        if len(rows) == count:
            return rows
    raise SystemExit(f"fewer than {count} pack combinations have both images and videos")


def relative(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert grads.keys() == reference.keys(), sorted(grads.keys() ^ reference.keys())
    diff = sum(float((grads[n] - g).norm() ** 2) for n, g in reference.items()) ** 0.5
    return diff / sum(float(g.norm() ** 2) for g in reference.values()) ** 0.5


def main(params_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    params = load_params(params_path)
    fam = family(params.dataset_config.processor_config.processor_type)
    model_dir = params.model_config_.load_from_pretrained_path

    def fresh():
        return fam.transformers_class(fam.model_class).from_pretrained(
            model_dir, attn_implementation=implementation_map(ATTENTION_NAME), dtype=torch.float32
        )

    reference_model = fresh()
    processor = AutoProcessor.from_pretrained(model_dir)
    vision = VisionArgs.for_processor(processor, params.dataset_config)
    builder = RowBuilder(Path.cwd(), processor, vision, type(reference_model), reference_model.config)
    rows = rows_with_images_and_video(builder, world)

    references = []  # (loss, grads) of row 0 alone, then of all rows together, in one process without FSDP
    for subset in (rows[:1], rows):
        reference_model.zero_grad(set_to_none=True)
        loss = sum(row_loss_sum(reference_model, row, CPU) for row in subset)
        loss.backward()
        references.append((float(loss), {n: p.grad.clone() for n, p in reference_model.named_parameters()}))

    result = {}
    for name, liger, sp_degree in [("plain", False, 1), ("liger", True, 1), ("liger+sp", True, world)]:
        model = fresh()
        sp = build_layout(sp_degree).sp
        if sp is not None:
            shard_text_model_inputs(model.get_submodule(fam.text_model_prefix), sp)
        kernels = apply_liger(model, fam, CPU)[0] if liger else False
        wrap_fsdp2(model, params, fam, mixed_precision=False)
        loss = row_loss_sum(model, rows[0] if sp else rows[rank], CPU, sp, kernels, 0)
        loss.backward()
        dist.all_reduce(loss)  # data parallel: each rank's row; SP: each rank's shard of row 0
        grads = {n: p.grad.full_tensor() * world for n, p in model.named_parameters()}  # FSDP2 averages
        reference_loss, reference_grads = references[0] if sp else references[1]
        result[name] = {
            "loss": float(loss),
            "reference_loss": reference_loss,
            "loss_relative_error": abs(float(loss) - reference_loss) / reference_loss,
            "grad_relative_error": relative(grads, reference_grads),
        }
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_now(0)
