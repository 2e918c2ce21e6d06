"""One packed row through the model: the cross-entropy summed over this rank's label tokens.

One path for every kernel set: hidden states -> the kept label positions -> linear cross-entropy against the
LM head's weight. Plain: ``lm_head`` logits of the kept positions only, then cross-entropy. ``liger`` (a
`Kernels` from stages/train/liger.py): the set's fused linear cross-entropy, which never materialises even
those logits. The loss is computed inside the top model's forward (`install_loss_forward`): under FSDP2 the LM
head's weight is unsharded only while the root module's forward runs. With sequence parallelism the row is
padded to a multiple of the degree and this rank scores the labels of its own shard
(stages/train/sequence_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F

from stages.train.attention import PackedSegments
from stages.train.data import IGNORE, Row
from stages.train.kernels import Kernels, LinearCrossEntropy
from stages.train.router import RouterBalance
from stages.train.sequence_parallel import SequenceParallel, pad_row


def plain_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The logits of the given positions, then cross-entropy summed (in fp32)."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


@dataclass
class RowLoss:
    """What the loss forward scores: ``keep`` indexes this rank's hidden states, ``targets`` the labels there."""

    keep: torch.Tensor
    targets: torch.Tensor
    linear_cross_entropy: LinearCrossEntropy
    router: RouterBalance | None = None  # MoE: also the row's load-balancing loss

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        kept = hidden[0, self.keep]
        if not self.keep.numel():  # still through the graph: every rank runs the same backward collectives
            return plain_linear_cross_entropy(kept, weight, self.targets)
        return self.linear_cross_entropy(kept, weight, self.targets)


def _forward(self, *args, row_loss: RowLoss | None = None, **kwargs):
    """The model's own forward, or, given ``row_loss``, the base model's hidden states scored by it (with a router:
    a tuple of that and the load-balancing loss of the router logits the base model recorded)."""
    if row_loss is None:
        return type(self).forward(self, *args, **kwargs)
    if row_loss.router is None:
        return row_loss(self.model(*args, **kwargs)[0], self.lm_head.weight)
    out = self.model(*args, output_router_logits=True, **kwargs)
    return row_loss(out[0], self.lm_head.weight), row_loss.router(out.router_logits)


@dataclass
class RowLosses:
    cross_entropy: torch.Tensor  # summed over this rank's label tokens of the row
    router_balance: torch.Tensor | None  # MoE: the row's load-balancing loss (the same on every rank of an SP group)


def install_loss_forward(model) -> None:
    """Let ``model(..., row_loss=...)`` return the loss (idempotent; before or after FSDP wrapping: the forward
    hooks FSDP2 registers run around it either way)."""
    if getattr(model.forward, "__func__", None) is _forward:
        return
    if model.lm_head.bias is not None:
        raise ValueError("the loss forward assumes an LM head without bias (every Qwen-VL family)")
    model.forward = MethodType(_forward, model)


def remove_loss_forward(model) -> None:
    """Undo `install_loss_forward` (generate reads the model's forward signature to check its inputs)."""
    if getattr(model.forward, "__func__", None) is _forward:
        del model.forward


def row_loss_sum(*args, **kwargs) -> torch.Tensor:
    """The summed cross-entropy over this rank's label tokens of the row: `row_losses` (same arguments, no
    router) without the balance loss."""
    return row_losses(*args, **kwargs).cross_entropy


def row_losses(
    model,
    row: Row,
    device: torch.device,
    sp: SequenceParallel | None = None,
    liger: Kernels | bool | None = None,
    pad_id: int = 0,
    router: bool = False,
) -> RowLosses:
    """The cross-entropy summed over this rank's label tokens of ``row`` and, with ``router`` (a mixture-of-experts
    model), the row's router load-balancing loss (stages/train/router.py). ``liger``: the `Kernels` apply_liger
    returned (its linear cross-entropy), or a false value for the plain one."""
    if liger and not isinstance(liger, Kernels):
        raise TypeError(f"liger must be the Kernels apply_liger returned, not {liger!r}")
    install_loss_forward(model)
    if sp is not None:
        row = pad_row(row, sp.size, pad_id)
    start, end = sp.bounds(row.tokens) if sp is not None else (0, row.tokens)
    targets = row.targets[0, start:end]
    keep = (targets != IGNORE).nonzero().flatten()
    balance = None
    if router:
        text_config = model.config.get_text_config()
        balance = RouterBalance.for_row(text_config, row.sample_tokens, start, end, device, sp)
    loss = RowLoss(
        keep.to(device),
        targets[keep].to(device),
        liger.linear_cross_entropy if liger else plain_linear_cross_entropy,
        balance,
    )
    out = model(
        input_ids=row.input_ids.to(device, non_blocking=True),  # rows arrive pinned on CUDA (PrefetchLoader)
        position_ids=row.position_ids.to(device, non_blocking=True),
        use_cache=False,
        packed_segments=PackedSegments.from_text_positions(row.position_ids[0, 0], device, sp),
        row_loss=loss,
        **{k: v.to(device, non_blocking=True) for k, v in row.vision.items()},
    )
    return RowLosses(*out) if router else RowLosses(out, None)
