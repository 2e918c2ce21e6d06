"""Build the model (on the meta device), choose the padding-free attention path, freeze modules, wrap with FSDP2."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from schemas.errors import ConfigError
from schemas.params import Params
from stages.families import ModelFamily
from stages.train.attention import ATTENTION_NAME, implementation_map, kernel_name
from stages.train.loading import build_on_meta


def choose_attention(requested: str, device: torch.device, sp_degree: int, bf16: bool) -> tuple[str, str]:
    """(attn_implementation of the text tower, the reason, for the log line). Refuses, before any work, what
    cannot run: the CUDA varlen kernels take bf16/fp16 only, and Ulysses needs the packed attention."""
    attention = ATTENTION_NAME if requested == "auto" else requested
    if sp_degree > 1 and attention != ATTENTION_NAME:
        raise ConfigError(
            f"model_config.attn_implementation {requested!r} cannot run Ulysses sequence parallelism "
            f"(sp_ulysses_degree {sp_degree}); use 'auto' or {ATTENTION_NAME!r}"
        )
    if attention == ATTENTION_NAME and device.type == "cuda" and not bf16:
        raise ConfigError(
            f"trainer_args.bf16 is false, but the packed attention's CUDA kernel ({kernel_name(device)}) takes "
            "bf16/fp16 only: set bf16: true, or model_config.attn_implementation: sdpa (padded, slower)"
        )
    if requested == "auto":
        return attention, f"padding-free packed attention: {kernel_name(device)}"
    return attention, "as configured"


def build_model(params: Params, fam: ModelFamily, attention: str):
    """The architecture on the meta device (no weights yet: stages/train/loading.py fills them after sharding)."""
    model = build_on_meta(
        fam.transformers_class(fam.model_class),
        params.model_config_.load_from_pretrained_path,
        implementation_map(attention),
    )
    model.config.use_cache = False  # a cache skips the packed mask silently (DESIGN.md)
    if params.trainer_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def matches(name: str, prefix: str) -> bool:
    """`visual` matches `model.visual.*` and `visual.*`; `model.language_model` matches itself."""
    return any(name == p or name.startswith(p + ".") for p in (prefix, f"model.{prefix}"))


def freeze(model, prefixes: list[str]) -> None:
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(matches(n, prefix) for n in names):
            raise ConfigError(
                f"trainer_args.freeze_modules: {prefix!r} matches no parameter of the model "
                f"(top-level modules: {sorted({n.split('.')[0] + '.' + n.split('.')[1] for n in names})})"
            )
    for name, p in model.named_parameters():
        if any(matches(name, prefix) for prefix in prefixes):
            p.requires_grad_(False)


def trainable_summary(model, fam: ModelFamily) -> list[str]:
    """Which vision blocks, merger, embeddings and decoder layers train (printed at start)."""
    groups: dict[str, list[bool]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if fam.is_projector(name):
            key = "vision merger"
        elif name.startswith(fam.vision_tower_prefix + ".blocks."):
            key = f"vision block {parts[3]}"
        elif name.startswith(fam.vision_tower_prefix):
            key = "vision patch embedding"
        elif ".embed_tokens." in name or name.startswith("lm_head"):
            key = "token embeddings / lm_head"
        elif ".layers." in name:
            key = f"decoder layer {parts[parts.index('layers') + 1]}"
        else:
            key = "final norm and other"
        groups.setdefault(key, []).append(p.requires_grad)
    return [f"{k}: {'trains' if all(v) else 'frozen' if not any(v) else 'partly frozen'}" for k, v in groups.items()]


def wrap_classes(model, params: Params, fam: ModelFamily) -> list[str]:
    """The classes to shard on their own (default: decoder layer and vision block); checked against ``model``."""
    names = params.trainer_args.fsdp_config.transformer_layer_cls_to_wrap or [
        fam.decoder_layer_class,
        fam.vision_block_class,
    ]
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(
            f"fsdp_config.transformer_layer_cls_to_wrap names no module of this model: {missing}; "
            f"the model has {fam.decoder_layer_class} and {fam.vision_block_class}"
        )
    return names


def wrap_fsdp2(model, params: Params, fam: ModelFamily, mixed_precision: bool) -> None:
    """fully_shard every module of the wrap classes, then the root."""
    names = wrap_classes(model, params, fam)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    reshard = params.trainer_args.fsdp_config.reshard_after_forward
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
