"""Ulysses sequence parallelism: the ranks of an SP group share one packed row, each holding a contiguous
1/degree of its sequence through the language model.

The vision tower and the merge of vision embeddings into the text embeddings run on the whole row on every
rank of the group (so M-RoPE positions are the global ones and an image split across two shards is still one
image); a forward pre-hook on the text model then keeps this rank's slice of the embeddings, the positions and,
for Qwen3-VL, the deepstack visual embeddings. Attention trades sequence shards for head shards with an
all-to-all (stages/train/attention.py). Each rank's loss covers its own label tokens; the worker divides by the
label tokens of the whole global batch, so no token is counted twice or missed (the peers' divisor bug).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from schemas.errors import ConfigError


@dataclass(frozen=True)
class SequenceParallel:
    group: dist.ProcessGroup
    size: int
    rank: int  # this rank's place in its SP group = which sequence shard it holds

    def bounds(self, length: int) -> tuple[int, int]:
        """This rank's [start, end) of a row of ``length`` tokens (a multiple of ``size``)."""
        shard = length // self.size
        return self.rank * shard, (self.rank + 1) * shard


@dataclass(frozen=True)
class Layout:
    """How the world splits: data-parallel groups of ``sp_degree`` ranks each."""

    dp_size: int
    dp_rank: int
    sp: SequenceParallel | None  # None when sp_degree is 1

    @property
    def sp_size(self) -> int:
        return self.sp.size if self.sp is not None else 1


def check_degree(degree: int, world: int, text_config) -> None:
    """Refuse, before any work, a degree the world size or the attention heads cannot be split by."""
    if degree == 1:
        return
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    problems = []
    if world % degree:
        problems.append(f"the world size {world} (nnodes x nproc_per_node) is not a multiple of it")
    if heads % degree:
        problems.append(f"the model's {heads} attention heads do not divide by it")
    if kv_heads % degree and degree % kv_heads:
        problems.append(f"the model's {kv_heads} key/value heads neither divide by it nor divide it")
    if problems:
        raise ConfigError(f"trainer_args.sp_ulysses_degree {degree}: " + "; ".join(problems))


def build_layout(degree: int) -> Layout:
    """Consecutive ranks form an SP group (on one node: the all-to-alls stay on the fast links)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if degree == 1:
        return Layout(world, rank, None)
    groups = [dist.new_group(list(range(start, start + degree))) for start in range(0, world, degree)]
    return Layout(world // degree, rank // degree, SequenceParallel(groups[rank // degree], degree, rank % degree))


def _all_to_all(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk j of the result came from rank j (autograd-aware)."""
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), None, None, sp.group))


def sequence_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(1, heads, L/sp, D) sequence shard -> (1, heads/sp, L, D) head shard."""
    _, heads, shard, dim = x.shape
    y = _all_to_all(x[0].reshape(sp.size, heads // sp.size, shard, dim), sp)  # dim 0 now: source rank = shard
    return y.permute(1, 0, 2, 3).reshape(1, heads // sp.size, sp.size * shard, dim)


def heads_to_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(1, L, heads/sp, D) head shard -> (1, L/sp, heads, D) sequence shard."""
    _, length, heads, dim = x.shape
    y = _all_to_all(x[0].reshape(sp.size, length // sp.size, heads, dim), sp)  # dim 0 now: source rank = heads
    return y.permute(1, 0, 2, 3).reshape(1, length // sp.size, sp.size * heads, dim)


def pad_row(row, degree: int, pad_id: int):
    """The row padded to a multiple of ``degree`` tokens; the padding is its own label-free packed segment."""
    extra = -row.tokens % degree
    if extra == 0:
        return row
    positions = torch.arange(extra).expand(row.position_ids.shape[0], 1, extra)
    return dataclasses.replace(
        row,
        input_ids=torch.cat([row.input_ids, torch.full((1, extra), pad_id)], dim=1),
        targets=torch.cat([row.targets, torch.full((1, extra), -100)], dim=1),
        position_ids=torch.cat([row.position_ids, positions], dim=2),
    )


def shard_text_model_inputs(text_model: torch.nn.Module, sp: SequenceParallel) -> None:
    """Slice the text model's per-token inputs to this rank's shard as it is called (a forward pre-hook)."""

    def keep_shard(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        start, end = sp.bounds(embeds.shape[1])
        kwargs["inputs_embeds"] = embeds[:, start:end]
        kwargs["position_ids"] = kwargs["position_ids"][..., start:end]
        mask = kwargs.get("visual_pos_masks")
        if mask is not None:  # Qwen3-VL deepstack: one embedding per visual token, in sequence order
            before, inside = int(mask[:, :start].sum()), int(mask[:, start:end].sum())
            kwargs["visual_pos_masks"] = mask[:, start:end]
            kwargs["deepstack_visual_embeds"] = [e[before : before + inside] for e in kwargs["deepstack_visual_embeds"]]
        return args, kwargs

    text_model.register_forward_pre_hook(keep_shard, with_kwargs=True)
