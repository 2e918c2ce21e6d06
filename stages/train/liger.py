"""Liger kernels (CUDA only): RMSNorm, RoPE / M-RoPE, SwiGLU where Liger has it for the family, and the fused
linear cross-entropy, applied to the loaded model through the family's own Liger patch function."""

from __future__ import annotations

import importlib

import torch

from stages.families import ModelFamily


def apply_liger(model, fam: ModelFamily, device: torch.device) -> tuple[bool, str]:
    """(applied, the reason, for the log line). Call before FSDP wrapping."""
    if device.type != "cuda":
        return False, "ignored on CPU (Liger kernels need a GPU)"
    try:
        patch = getattr(importlib.import_module("liger_kernel.transformers"), fam.liger_patch)
    except (ImportError, AttributeError) as exc:
        return False, f"ignored: liger-kernel has no {fam.liger_patch} ({exc})"
    patch(model=model)
    return True, f"applied with {fam.liger_patch} (fused linear cross-entropy, RMSNorm, RoPE)"
