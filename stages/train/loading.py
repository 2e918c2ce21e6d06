"""Load a checkpoint into an FSDP2-sharded model without a whole copy of the weights on every rank.

Every rank builds the architecture on the meta device (no memory), the caller patches kernels, freezes and
shards it, then `materialize` allocates only this rank's shards on the training device and fills them from rank 0:
rank 0 alone reads the checkpoint (through transformers' own `from_pretrained`, so its key conversions, dtype and
tied weights apply), and `set_model_state_dict(..., broadcast_from_rank0=True)` sends one tensor at a time, each
rank keeping its slice. Buffers (rotary `inv_freq`, which no checkpoint holds) are broadcast from rank 0's model,
so they come out exactly as transformers computes them. Peak host memory: one checkpoint copy on rank 0, one
tensor on the others.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


def build_on_meta(model_class: type, path: str | Path, attn_implementation):
    """The architecture of the checkpoint at ``path``, parameters on the meta device, fp32 (the master weights;
    FSDP2's mixed-precision policy casts them for compute)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return model_class._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype the checkpoint at ``path`` was saved in (config ``dtype`` / ``torch_dtype``; fp32 if unset)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def materialize(model, model_class: type, path: str | Path, device: torch.device) -> None:
    """Allocate ``model``'s (sharded) parameters and buffers on ``device`` and load the checkpoint at ``path``."""
    model.to_empty(device=device)
    source = None
    if dist.get_rank() == 0:
        source = model_class.from_pretrained(path, dtype="auto", attn_implementation="sdpa")
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    reference = dict(source.named_buffers()) if source is not None else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if source is not None:
                buffer.copy_(reference[name])
            dist.broadcast(buffer, src=0)
    if model.config.get_text_config().tie_word_embeddings:
        model.tie_weights()
    del full, source, reference
