"""The kernel set behind ``use_liger_kernel``: Liger's Triton kernels on CUDA, plain-torch stand-ins elsewhere.

Both sets have the same shape: an RMSNorm module class and a SwiGLU MLP module class with Liger's constructor
signatures (stages/train/liger.py swaps them into the model), and a linear cross-entropy
``(hidden (N, H), weight (V, H), targets (N,)) -> summed loss`` that never materialises the N x V logits
(stages/train/forward.py calls it inside the model's forward). The stand-ins let ``use_liger_kernel: true`` run
the same code path on CPU, so CPU tests cover everything but the Triton kernels themselves.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from schemas.errors import ConfigError

LinearCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Kernels:
    """What ``use_liger_kernel`` swaps in. ``name`` goes into the start-up log line."""

    name: str
    rms_norm: type[nn.Module]  # (hidden_size, eps, offset, casting_mode, init_fn, in_place, ...) like LigerRMSNorm
    swiglu_mlp: type[nn.Module]  # (config with hidden_size / intermediate_size / hidden_act) like LigerSwiGLUMLP
    linear_cross_entropy: LinearCrossEntropy


class TorchRMSNorm(nn.Module):
    """LigerRMSNorm's signature, Qwen2/Qwen3 RMSNorm's arithmetic (offset 0, Llama casting: normalise in fp32,
    cast back to the input dtype, then scale by the weight)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        casting_mode: str = "llama",
        init_fn: str = "ones",
        in_place: bool = True,
        row_mode=None,
        elementwise_affine: bool = True,
    ):
        super().__init__()
        if offset != 0.0 or casting_mode != "llama" or init_fn != "ones" or not elementwise_affine:
            raise ValueError("TorchRMSNorm implements the Qwen form only: offset 0, llama casting, a ones weight")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class TorchSwiGLUMLP(nn.Module):
    """LigerSwiGLUMLP's signature and submodule names: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"Activation function {config.hidden_act} not supported.")
        inner = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.down_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


CHUNK_LOGITS_BYTES = 32 * 2**20  # fp32 logits of one chunk of positions


def _chunks(hidden: torch.Tensor, vocab: int):
    rows = max(1, CHUNK_LOGITS_BYTES // (4 * vocab))
    return [(a, min(a + rows, hidden.shape[0])) for a in range(0, hidden.shape[0], rows)]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T`` summed over positions, a chunk of positions at a time; the backward
    recomputes each chunk's logits instead of keeping them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a, b in _chunks(hidden, weight.shape[0]):
            logits = F.linear(hidden[a:b], weight).float()
            total += (logits.logsumexp(-1) - logits.gather(1, targets[a:b, None])[:, 0]).sum()
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for a, b in _chunks(hidden, weight.shape[0]):
            probs = F.linear(hidden[a:b], weight).float()
            probs = probs.sub_(probs.logsumexp(-1, keepdim=True)).exp_()
            probs[torch.arange(b - a, device=probs.device), targets[a:b]] -= 1.0
            grad_logits = probs.mul_(grad_loss).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[a:b] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ hidden[a:b]
        return grad_hidden, grad_weight, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The stand-in for Liger's fused linear cross-entropy (reduction sum): at most one chunk of logits
    (``CHUNK_LOGITS_BYTES``) is alive at a time, in the forward and in the backward."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets)


def torch_kernels() -> Kernels:
    return Kernels("torch stand-ins", TorchRMSNorm, TorchSwiGLUMLP, chunked_linear_cross_entropy)


def versions() -> str:
    found = []
    for package in ("liger-kernel", "triton", "transformers", "torch"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def liger_kernels(device: torch.device) -> Kernels:
    """Liger's building blocks, checked on ``device`` with a tiny forward and backward of each kernel, so a
    missing or broken piece is a ConfigError at start, not a crash at step 1."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError as exc:
        raise ConfigError(
            f"trainer_args.use_liger_kernel: cannot import Liger's kernels ({exc}); {versions()}. "
            "Install a liger-kernel that has LigerRMSNorm, LigerSwiGLUMLP and liger_fused_linear_cross_entropy, "
            "or set use_liger_kernel: false"
        ) from None

    def liger_fused_linear_cross_entropy_sum(hidden, weight, targets):
        return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum").float()

    kernels = Kernels("liger", LigerRMSNorm, LigerSwiGLUMLP, liger_fused_linear_cross_entropy_sum)
    try:
        smoke_test(kernels, device)
    except Exception as exc:  # any failure of a kernel here would stop training at its first step
        raise ConfigError(
            f"trainer_args.use_liger_kernel: Liger's kernels fail on {device} ({type(exc).__name__}: {exc}); "
            f"{versions()}. Set use_liger_kernel: false or install matching versions"
        ) from None
    return kernels


def smoke_test(kernels: Kernels, device: torch.device) -> None:
    """One tiny forward and backward through each kernel (bf16 on CUDA, as in training)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        config = SimpleNamespace(hidden_size=16, intermediate_size=32, hidden_act="silu")
        norm = kernels.rms_norm(16, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False).to(dtype)
        mlp = kernels.swiglu_mlp(config).to(dtype)
        x = torch.randn(4, 16, dtype=dtype, requires_grad=True)
        weight = torch.randn(64, 16, dtype=dtype, requires_grad=True)
        loss = kernels.linear_cross_entropy(mlp(norm(x)), weight, torch.arange(4))
        loss.backward()
