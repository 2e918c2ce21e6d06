"""``use_liger_kernel``: swap the family's RMSNorm and SwiGLU MLP modules for the kernel set's (Liger on CUDA,
torch stand-ins elsewhere: stages/train/kernels.py); the loss then runs through the set's fused linear
cross-entropy (stages/train/forward.py).

Liger's own per-model patch functions are not used: with transformers 5.23 they import names transformers 5
removed and raise ImportError inside Liger, and their forwards ignore ``logits_to_keep`` (docs/decisions.md).
The swap keeps every parameter object and name (the state-dict keys do not change) and allocates nothing, so it
works on a meta-device model before FSDP wrapping. RoPE is not swapped: Liger's M-RoPE patch replaces a function
transformers 5.23 no longer calls (docs/decisions.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers.activations import SiLUActivation

from stages.families import ModelFamily
from stages.train.kernels import Kernels, liger_kernels, torch_kernels


def _rms_norm(old: nn.Module, kernels: Kernels) -> nn.Module:
    """Qwen's RMSNorm: offset 0, Llama casting (fp32 normalisation, cast back, then scale)."""
    with torch.device("meta"):
        new = kernels.rms_norm(
            old.weight.shape[0], eps=old.variance_epsilon, offset=0.0, casting_mode="llama", in_place=False
        )
    new.weight = old.weight
    return new


def _is_swiglu(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and (
        isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation))
    )


def _swiglu_mlp(old: nn.Module, kernels: Kernels) -> nn.Module:
    """The old projections (biases included, as in Qwen2.5-VL's vision MLP) under the kernel set's MLP."""
    config = SimpleNamespace(
        hidden_size=old.gate_proj.in_features, intermediate_size=old.gate_proj.out_features, hidden_act="silu"
    )
    with torch.device("meta"):
        new = kernels.swiglu_mlp(config)
    new.gate_proj, new.up_proj, new.down_proj = old.gate_proj, old.up_proj, old.down_proj
    return new


def replace_modules(model: nn.Module, fam: ModelFamily, kernels: Kernels) -> dict[str, int]:
    """Swap the family's RMSNorm and SwiGLU MLP modules in place; how many of each were swapped."""
    counts = {"RMSNorm": 0, "SwiGLU MLP": 0}
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind in fam.rms_norm_classes:
            new, key = _rms_norm(module, kernels), "RMSNorm"
        elif kind in fam.swiglu_mlp_classes and _is_swiglu(module):
            new, key = _swiglu_mlp(module, kernels), "SwiGLU MLP"
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        counts[key] += 1
    return counts


def apply_liger(model: nn.Module, fam: ModelFamily, device: torch.device) -> tuple[Kernels, str]:
    """(the kernel set, to pass to row_loss_sum as ``liger``; the log line). Call before FSDP wrapping.
    On CUDA a Liger piece that is missing or fails raises ConfigError; elsewhere the torch stand-ins run."""
    kernels = liger_kernels(device) if device.type == "cuda" else torch_kernels()
    counts = replace_modules(model, fam, kernels)
    where = "Liger Triton kernels" if device.type == "cuda" else f"torch stand-ins on {device.type} (no Liger)"
    modules = {"RMSNorm": kernels.rms_norm, "SwiGLU MLP": kernels.swiglu_mlp}
    swapped = ", ".join(f"{kind} x{counts[kind]} ({cls.__name__})" for kind, cls in modules.items())
    loss = kernels.linear_cross_entropy.__name__
    return kernels, f"{where}: {swapped}, linear cross-entropy {loss}; RoPE not swapped (see docs/decisions.md)"
