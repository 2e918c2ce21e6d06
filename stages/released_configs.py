"""Architecture values of released Qwen-VL checkpoints, entered from their config.json files, so benchmarks can
build a randomly initialised model of the real size offline (no weights are downloaded).

Sources: Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen3-VL-4B-Instruct on the Hugging Face Hub (config.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.families import family
from stages.tiny_model import token_ids


@dataclass(frozen=True)
class ReleasedArchitecture:
    processor_type: str
    text: dict[str, Any]
    vision: dict[str, Any]


RELEASED = {
    "qwen2_5_vl_3b": ReleasedArchitecture(
        "qwen2_5_vl",
        text={
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        },
        vision={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "hidden_act": "silu",
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
    ),
    "qwen3_vl_4b": ReleasedArchitecture(
        "qwen3_vl",
        text={
            "vocab_size": 151936,
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        },
        vision={
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "out_hidden_size": 2560,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [5, 11, 17],
        },
    ),
}


def released_config(name: str):
    """The transformers config of a released architecture (both released models tie their word embeddings)."""
    arch = RELEASED[name]
    fam = family(arch.processor_type)
    text = {**arch.text, "bos_token_id": 151643, "eos_token_id": 151645}
    config_cls = fam.transformers_class(fam.config_class)
    return config_cls(text_config=text, vision_config=arch.vision, tie_word_embeddings=True, **token_ids())
