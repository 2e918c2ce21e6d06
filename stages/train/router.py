"""The mixture-of-experts load-balancing loss of one packed row (Qwen3-VL-MoE), as transformers computes it.

transformers' `load_balancing_loss_func` (Switch Transformer eqs. 4-6): over every MoE layer's router logits,
the share of top-k assignments each expert received times its mean routing probability, summed, times the number
of experts. Here it is taken over the row's sample tokens only (not the label-free dummy segments a row carries
for the vision towers, nor sequence-parallel padding), so a row of one sample gives exactly what the model's own
forward gives for that sample with ``output_router_logits=True``. Under Ulysses SP each rank routes its own shard:
the three sums are all-reduced over the SP group (the probability sum through an autograd-aware all-reduce), and
each rank then holds the row's whole loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad

from stages.train.sequence_parallel import SequenceParallel


@dataclass
class RouterBalance:
    """The balance loss of this rank's tokens of one row; ``real`` is 1.0 at the tokens of real samples."""

    num_experts: int
    top_k: int
    real: torch.Tensor  # (this rank's tokens,) float
    sp: SequenceParallel | None = None

    @classmethod
    def for_row(cls, text_config, sample_tokens: int, start: int, end: int, device, sp=None) -> RouterBalance:
        """For the rank holding tokens [start, end) of a row whose first ``sample_tokens`` are real samples."""
        real = (torch.arange(start, end, device=device) < sample_tokens).float()
        return cls(text_config.num_experts, text_config.num_experts_per_tok, real, sp)

    def __call__(self, router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        device = router_logits[0].device
        assigned = torch.zeros(self.num_experts, device=device)
        probability = torch.zeros(self.num_experts, device=device)
        weights = self.real.repeat_interleave(self.top_k)
        for logits in router_logits:  # one (tokens, experts) tensor per MoE layer
            probs = F.softmax(logits.float(), dim=-1)
            chosen = torch.topk(probs, self.top_k, dim=-1).indices.reshape(-1)
            assigned = assigned + torch.zeros_like(assigned).scatter_add_(0, chosen, weights)
            probability = probability + (probs * self.real[:, None]).sum(dim=0)
        rows = self.real.sum() * len(router_logits)
        if self.sp is not None:
            counts = torch.cat([assigned, rows.view(1)])
            dist.all_reduce(counts, group=self.sp.group)
            assigned, rows = counts[:-1], counts[-1]
            probability = all_reduce_with_grad(probability, group=self.sp.group)
        rows = rows.clamp(min=1)
        return (assigned / rows * probability / rows).sum() * self.num_experts


def balance_weight(is_moe: bool, configured: float | None, text_config) -> float:
    """The weight of the balance loss in the training loss: 0 for a dense model; else model_config's
    router_aux_loss_coef, or the checkpoint config's when that is unset."""
    if not is_moe:
        return 0.0
    return float(configured if configured is not None else text_config.router_aux_loss_coef)
