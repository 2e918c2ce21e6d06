"""In-loop evaluation: the global per-token loss over every held-out pack, with no gradients, on every rank.

Each eval round gives every data-parallel rank one pack (pack i goes to rank i mod the data-parallel size,
step_assignment in order); a rank left without one on the last round runs a label-free copy, so FSDP's and
sequence parallelism's collectives stay in step. The loss sums over all label tokens of all eval packs, divided by
their count: the same number whatever the world size or SP degree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from schemas.params import TrainerArgs
from stages.train.data import PrefetchLoader, RowBuilder, micro_batches, step_assignment
from stages.train.forward import row_loss_sum
from stages.train.kernels import Kernels
from stages.train.sequence_parallel import SequenceParallel


def eval_due(args: TrainerArgs, step: int, total_steps: int, epoch_done: bool) -> bool:
    """Whether to evaluate after ``step``: by eval_strategy, and always after the last step (the last eval loss is
    the trained model's)."""
    if args.eval_strategy == "no":
        return False
    if step == total_steps:
        return True
    if args.eval_strategy == "epoch":
        return epoch_done
    return step % (args.eval_steps or args.logging_steps) == 0


def eval_plan(pack_ids: list[int], dp_size: int, dp_rank: int) -> list[tuple[list[int], bool]]:
    """This data-parallel rank's eval micro-batches, one pack each, as (pack ids, is_dummy)."""
    rounds = -(-len(pack_ids) // dp_size)
    return [
        mb
        for r in range(rounds)
        for mb in micro_batches(step_assignment(pack_ids, r, dp_size, 1, 1)[dp_rank], pack_ids)
    ]


def eval_loss(
    model,
    builder: RowBuilder,
    plan: list[tuple[list[int], bool]],
    device: torch.device,
    sp: SequenceParallel | None,
    liger: Kernels | bool,
    pad_id: int,
    counts_labels: bool,
    workers: int = 0,
) -> tuple[float, int]:
    """(loss, label tokens) over every rank's ``plan``; ``counts_labels``: this rank counts its rows' label
    tokens (one rank per sequence-parallel group, as in training)."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()  # no gradient checkpointing (transformers applies it only in training mode)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the DataLoader draws a seed: leave training's RNG
        for row in PrefetchLoader(builder, plan, workers, pin=device.type == "cuda"):
            sums[0] += row_loss_sum(model, row, device, sp, liger, pad_id).double()
            sums[1] += row.label_tokens if counts_labels else 0
    model.train(was_training)
    if dist.is_initialized():  # the evaluate stage runs one process, without a process group
        dist.all_reduce(sums)
    loss, labels = sums.tolist()
    return loss / max(labels, 1), int(labels)
