"""Padding-free attention over packed rows, registered with transformers as ``qvl_packed`` (text tower only).

Each forward call carries a `PackedSegments` (cu_seqlens over the whole packed row) in its keyword arguments;
transformers hands those to every text attention call. With Ulysses sequence parallelism q/k/v arrive sharded
along the sequence: an all-to-all trades that for a shard of the heads, attention runs over the whole row, and a
second all-to-all trades back (stages/train/sequence_parallel.py).

Kernels, fastest available first: flash-attn's varlen kernel (when importable, CUDA), torch's
``torch.nn.attention.varlen.varlen_attn`` (CUDA), one causal SDPA call per packed sample (any device, exact).
No path builds an L x L mask. The CUDA kernel is chosen once per process (stages/train/varlen.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from stages.train import vision_attention
from stages.train.sequence_parallel import SequenceParallel, heads_to_sequence, sequence_to_heads
from stages.train.varlen import cuda_varlen, sdpa_per_segment

ATTENTION_NAME = "qvl_packed"


@dataclass
class PackedSegments:
    """Where each packed sample starts in the (whole, unsharded) row; the same on every rank of an SP group."""

    cu_seqlens: torch.Tensor  # int32, (samples + 1,), on the model's device
    bounds: list[int]  # the same as Python ints, read once per row on the host (no device sync per layer)
    max_len: int
    sp: SequenceParallel | None = None

    @classmethod
    def from_text_positions(
        cls, text_positions: torch.Tensor, device: torch.device, sp: SequenceParallel | None = None
    ) -> PackedSegments:
        """``text_positions`` (L,) restart at 0 for each packed sample (stages/train/data.py)."""
        starts = (text_positions == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([text_positions.numel()])])
        return cls(cu.to(device=device, dtype=torch.int32), cu.tolist(), int((cu[1:] - cu[:-1]).max()), sp)


def implementation_map(text_attention: str) -> str | dict[str, str]:
    """The ``attn_implementation`` to load the model with: ``qvl_packed`` for the text tower goes with the
    padding-free vision attention (stages/train/vision_attention.py); any other name applies to both towers."""
    if text_attention != ATTENTION_NAME:
        return text_attention
    return {"text_config": text_attention, "vision_config": vision_attention.register()}


def kernel_name(device: torch.device) -> str:
    """The kernel ``qvl_packed`` uses on ``device`` (for the start-up log line); on CUDA the padding-free vision
    attention loaded with it uses the same one."""
    if device.type == "cuda":
        return cuda_varlen()[0]
    return "causal SDPA per packed sample (vision: SDPA per window or frame)"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: PackedSegments, scale: float) -> torch.Tensor:
    """Causal attention inside each segment. q (1, H, L, D), k/v (1, H_kv, L, D) -> (1, L, H, D)."""
    if q.is_cuda:
        q3, k3, v3 = (t[0].transpose(0, 1) for t in (q, k, v))  # (L, heads, D)
        return cuda_varlen()[1](q3, k3, v3, seg.cu_seqlens, seg.max_len, scale, True).unsqueeze(0)
    return sdpa_per_segment(q, k, v, seg.bounds, scale, causal=True)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed_segments: PackedSegments | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The transformers attention-function signature: q/k/v (batch 1, heads, seq, dim) -> ((1, seq, heads, dim),
    None). The mask transformers would build is not used (and not built: see `register`)."""
    if packed_segments is None:
        raise ValueError(f"attn_implementation {ATTENTION_NAME!r} needs packed_segments in the forward kwargs")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    sp = packed_segments.sp
    if sp is None or sp.size == 1:
        return _attend(query, key, value, packed_segments, scale), None
    kv_copies = max(1, sp.size // key.shape[1])  # fewer KV heads than ranks: replicate them (checked at start)
    if kv_copies > 1:
        key, value = key.repeat_interleave(kv_copies, dim=1), value.repeat_interleave(kv_copies, dim=1)
    q, k, v = (sequence_to_heads(t, sp) for t in (query, key, value))
    return heads_to_sequence(_attend(q, k, v, packed_segments, scale), sp), None


def register() -> None:
    """Make ``qvl_packed`` a valid attn_implementation. transformers builds no mask for a name its mask
    interface does not know, which is what this function wants (it takes the segments instead)."""
    AttentionInterface.register(ATTENTION_NAME, packed_attention)


register()
