"""Attention inside segments, shared by the text and vision towers: the CUDA variable-length kernel (chosen once
per process) and its exact stand-in elsewhere, one SDPA call per segment."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

VarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float, bool], torch.Tensor]


@functools.cache
def cuda_varlen() -> tuple[str, VarlenFn]:
    """flash-attn's varlen kernel when importable, else torch's ``varlen_attn``:
    ``(name, fn(q, k, v, cu_seqlens, max_len, scale, causal))`` with q (tokens, heads, dim), k/v
    (tokens, kv heads, dim), cu_seqlens int32 on the device, max_len a Python int."""
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        def flash(q, k, v, cu, n, scale, causal):
            return flash_attn_varlen_func(q, k, v, cu, cu, n, n, softmax_scale=scale, causal=causal)

        return "flash-attn varlen", flash
    from torch.nn.attention.varlen import varlen_attn

    def torch_varlen(q, k, v, cu, n, scale, causal):
        window = (-1, 0) if causal else (-1, -1)
        return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, window_size=window, enable_gqa=True)

    return "torch varlen_attn", torch_varlen


def sdpa_per_segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float, causal: bool
) -> torch.Tensor:
    """q (1, heads, tokens, dim), k/v (1, kv heads, tokens, dim), segments [bounds[i], bounds[i+1]) ->
    (1, tokens, heads, dim)."""
    parts = [
        F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=causal, scale=scale, enable_gqa=True
        )
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)
