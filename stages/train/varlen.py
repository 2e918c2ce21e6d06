"""The CUDA variable-length attention kernel the text and vision towers share, chosen once per process."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

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
