"""Padding-free vision attention: one call per vision block over all windows / frames / images of the row.

transformers' Qwen2.5-VL and Qwen3-VL vision blocks hand ``cu_seqlens`` (and a ``max_seqlen`` the tower computed
once per forward) to the attention function only when the implementation's name contains "flash"
(``is_flash_attention_requested``); any other name splits q/k/v with a ``.tolist()`` host sync and one kernel
launch per window in every block. This function takes the cu_seqlens path: a varlen kernel on CUDA
(stages/train/varlen.py), one SDPA call per segment elsewhere, its Python bounds read once per cu_seqlens tensor
(the tower passes the same tensor to every block), so no block syncs with the host.
"""

from __future__ import annotations

import torch
import transformers.modeling_flash_attention_utils as flash_utils
from torch.utils.weak import WeakTensorKeyDictionary
from transformers import AttentionInterface

from stages.train.varlen import cuda_varlen, sdpa_per_segment

VISION_ATTENTION_NAME = "qvl_flash_varlen_vision"  # "flash" routes cu_seqlens here (see the module docstring)

_bounds: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def segment_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as Python ints, read from the tensor once while it lives."""
    if cu_seqlens not in _bounds:
        _bounds[cu_seqlens] = cu_seqlens.tolist()
    return _bounds[cu_seqlens]


def varlen_vision_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention inside each segment of ``cu_seq_lens_q``: q/k/v (1, heads, tokens, dim) ->
    ((1, tokens, heads, dim), None), the transformers attention-function contract."""
    if cu_seq_lens_q is None:
        raise ValueError(f"attn_implementation {VISION_ATTENTION_NAME!r} is for Qwen-VL vision towers (cu_seqlens)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
        return cuda_varlen()[1](q, k, v, cu_seq_lens_q, max_length_q, scale, False).unsqueeze(0), None
    return sdpa_per_segment(query, key, value, segment_bounds(cu_seq_lens_q), scale, causal=False), None


def register() -> str:
    """Make the name a valid attn_implementation and return it. transformers (5.23) preloads a flash kernel for
    any name containing "flash" and, finding no hub kernel of that name, refuses it; this function needs none,
    so the name is marked as already loaded (docs/decisions.md)."""
    AttentionInterface.register(VISION_ATTENTION_NAME, varlen_vision_attention)
    flash_utils._loaded_implementation = VISION_ATTENTION_NAME
    return VISION_ATTENTION_NAME
