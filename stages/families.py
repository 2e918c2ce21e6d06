"""The model-family registry: every Qwen2-VL / Qwen2.5-VL / Qwen3-VL fact lives here, keyed by processor_type.

Other modules ask the registry (``family("qwen3_vl").patch_size``) instead of branching on the family name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from schemas.errors import ConfigError
from stages.tokenizer_build import EXTRA_TOKENS_QWEN2, EXTRA_TOKENS_QWEN3


@dataclass(frozen=True)
class ModelFamily:
    """What differs between the Qwen-VL generations, as far as this pipeline cares."""

    processor_type: str
    model_class: str  # transformers class name of the conditional-generation model
    config_class: str
    processor_class: str
    decoder_layer_class: str
    vision_block_class: str
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    vision_tower_prefix: str  # parameter-name prefix of the vision tower
    projector_prefixes: tuple[str, ...]  # parameter-name prefixes of the vision-to-text projectors (mm_projector_lr)
    text_model_prefix: str  # module path of the text decoder stack (sequence parallelism shards its inputs)
    rms_norm_classes: tuple[str, ...]  # Qwen-form RMSNorm modules use_liger_kernel swaps (stages/train/liger.py)
    swiglu_mlp_classes: tuple[str, ...]  # gate/up/down + SiLU MLP modules use_liger_kernel swaps
    has_deepstack: bool
    # Mixture-of-experts text layers: the router's load-balancing loss (transformers' load_balancing_loss_func,
    # weighted by model_config.router_aux_loss_coef) is added to the loss (stages/train/forward.py)
    moe: bool
    extra_tokens: tuple[str, ...]  # added tokens after the special ones, as in the released tokenizer
    chat_template: str  # file name under stages/templates/
    video_processor_class: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_size: dict[str, int]  # the released processor's pixel budget (shortest_edge/longest_edge = min/max)
    # Config values for a tiny, randomly initialised model with the real architecture (tests and the demo).
    tiny_text_config: dict[str, Any] = field(default_factory=dict)
    tiny_vision_config: dict[str, Any] = field(default_factory=dict)
    # The vision config's key for the merger's output width (= the text hidden size): Qwen2-VL calls it hidden_size
    merger_width_key: str = "out_hidden_size"

    def is_projector(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to a vision-to-text projector."""
        return any(name == p or name.startswith(p + ".") for p in self.projector_prefixes)

    @property
    def image_factor(self) -> int:
        """Side lengths are resized to multiples of this (patch x merge): 28 for Qwen2/2.5-VL, 32 for Qwen3-VL."""
        return self.patch_size * self.spatial_merge_size

    def transformers_class(self, name: str) -> type:
        import transformers

        return getattr(transformers, name)


_FAMILIES = {
    f.processor_type: f
    for f in (
        ModelFamily(
            processor_type="qwen2_vl",
            model_class="Qwen2VLForConditionalGeneration",
            config_class="Qwen2VLConfig",
            processor_class="Qwen2VLProcessor",
            decoder_layer_class="Qwen2VLDecoderLayer",
            vision_block_class="Qwen2VLVisionBlock",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            vision_tower_prefix="model.visual",
            projector_prefixes=("model.visual.merger",),
            text_model_prefix="model.language_model",
            rms_norm_classes=("Qwen2VLRMSNorm",),
            swiglu_mlp_classes=("Qwen2MLP",),
            has_deepstack=False,
            moe=False,
            extra_tokens=EXTRA_TOKENS_QWEN2,
            chat_template="qwen2_5_vl.jinja",
            video_processor_class="Qwen2VLVideoProcessor",
            image_mean=(0.48145466, 0.4578275, 0.40821073),
            image_std=(0.26862954, 0.26130258, 0.27577711),
            image_size={"shortest_edge": 3136, "longest_edge": 12845056},
            tiny_text_config={
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}
            },
            tiny_vision_config={"embed_dim": 64, "num_heads": 4, "mlp_ratio": 2},
            merger_width_key="hidden_size",
        ),
        ModelFamily(
            processor_type="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            config_class="Qwen2_5_VLConfig",
            processor_class="Qwen2_5_VLProcessor",
            decoder_layer_class="Qwen2_5_VLDecoderLayer",
            vision_block_class="Qwen2_5_VLVisionBlock",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            vision_tower_prefix="model.visual",
            projector_prefixes=("model.visual.merger",),
            text_model_prefix="model.language_model",
            rms_norm_classes=("Qwen2_5_VLRMSNorm",),
            swiglu_mlp_classes=("Qwen2MLP", "Qwen2_5_VLMLP"),  # text MLP; vision MLP (with biases)
            has_deepstack=False,
            moe=False,
            extra_tokens=EXTRA_TOKENS_QWEN2,
            chat_template="qwen2_5_vl.jinja",
            video_processor_class="Qwen2VLVideoProcessor",
            image_mean=(0.48145466, 0.4578275, 0.40821073),
            image_std=(0.26862954, 0.26130258, 0.27577711),
            image_size={"shortest_edge": 3136, "longest_edge": 12845056},
            tiny_text_config={
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}
            },
            tiny_vision_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 4,
                "fullatt_block_indexes": [1],
                "window_size": 112,
            },
        ),
        ModelFamily(
            processor_type="qwen3_vl",
            model_class="Qwen3VLForConditionalGeneration",
            config_class="Qwen3VLConfig",
            processor_class="Qwen3VLProcessor",
            decoder_layer_class="Qwen3VLTextDecoderLayer",
            vision_block_class="Qwen3VLVisionBlock",
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            vision_tower_prefix="model.visual",
            # the deepstack mergers project vision features into the text too: Qwen's own create_optimizer puts
            # them with the projector ("merger" in the name)
            projector_prefixes=("model.visual.merger", "model.visual.deepstack_merger_list"),
            text_model_prefix="model.language_model",
            rms_norm_classes=("Qwen3VLTextRMSNorm",),  # includes the per-head q_norm / k_norm
            swiglu_mlp_classes=("Qwen3VLTextMLP",),  # the vision tower has LayerNorm and a GELU MLP
            has_deepstack=True,
            moe=False,
            extra_tokens=EXTRA_TOKENS_QWEN3,
            chat_template="qwen3_vl.jinja",
            video_processor_class="Qwen3VLVideoProcessor",
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            image_size={"shortest_edge": 65536, "longest_edge": 16777216},
            tiny_text_config={
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 5000000.0,
                    "mrope_section": [2, 1, 1],
                    "mrope_interleaved": True,
                }
            },
            tiny_vision_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 4,
                "deepstack_visual_indexes": [0],
                "num_position_embeddings": 256,
            },
        ),
    )
}

# Qwen3-VL-MoE shares everything with Qwen3-VL but its classes.
_FAMILIES["qwen3_vl_moe"] = replace(
    _FAMILIES["qwen3_vl"],
    processor_type="qwen3_vl_moe",
    model_class="Qwen3VLMoeForConditionalGeneration",
    config_class="Qwen3VLMoeConfig",
    decoder_layer_class="Qwen3VLMoeTextDecoderLayer",
    vision_block_class="Qwen3VLMoeVisionBlock",
    rms_norm_classes=("Qwen3VLMoeTextRMSNorm",),
    swiglu_mlp_classes=("Qwen3VLMoeTextMLP",),  # the dense layers' MLP; the experts are left alone
    moe=True,
    tiny_text_config={
        **_FAMILIES["qwen3_vl"].tiny_text_config,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "mlp_only_layers": [1],  # layer 0 sparse (experts), layer 1 dense: both kinds in the tiny model
        "router_aux_loss_coef": 0.001,  # transformers' default
    },
)
FAMILY_NAMES = tuple(_FAMILIES)


def family(processor_type: str) -> ModelFamily:
    """The registry entry for ``processor_type``, or a ConfigError listing the known ones."""
    try:
        return _FAMILIES[processor_type]
    except KeyError:
        raise ConfigError(f"unknown processor_type {processor_type!r}; known: {', '.join(FAMILY_NAMES)}") from None
