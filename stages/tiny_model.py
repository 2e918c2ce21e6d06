"""`qvl make-tiny-model`: a local, randomly initialised Qwen-VL checkpoint with the real architecture classes
and a real processor (the Qwen tokenizer, the chat template, image and video processor configs).

It loads offline exactly like a released checkpoint: `AutoProcessor.from_pretrained(dir)` and
`<Family>ForConditionalGeneration.from_pretrained(dir)`. The demo and the tests train it on CPU.
"""

from __future__ import annotations

from pathlib import Path

from stages.families import ModelFamily, family
from stages.io import atomic_dir
from stages.tokenizer_build import SPECIAL_TOKENS, build_hf_tokenizer

TEMPLATES = Path(__file__).parent / "templates"
VOCAB_SIZE = 151936  # the released embedding size (rounded up past the last added token)
TINY_TEXT = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def chat_template(fam: ModelFamily) -> str:
    return (TEMPLATES / fam.chat_template).read_text(encoding="utf-8")


def token_ids() -> dict[str, int]:
    ids = {t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def build_config(fam: ModelFamily, text_overrides: dict | None = None):
    """A small config of the family's real config class (about 5M parameters, mostly the tied embedding);
    ``text_overrides`` resize the language model (tests and benchmarks of loading at a chosen size)."""
    config_cls = fam.transformers_class(fam.config_class)
    text = {
        **TINY_TEXT,
        **fam.tiny_text_config,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        **(text_overrides or {}),
    }
    vision = {
        "depth": 2,
        "patch_size": fam.patch_size,
        "spatial_merge_size": fam.spatial_merge_size,
        "temporal_patch_size": fam.temporal_patch_size,
        **fam.tiny_vision_config,
        fam.merger_width_key: text["hidden_size"],
    }
    return config_cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids())


def build_processor(fam: ModelFamily):
    """The family's real processor class around the offline tokenizer and the released processor settings."""
    import transformers

    template = chat_template(fam)
    tokenizer = build_hf_tokenizer(fam.extra_tokens, template)
    common = {
        "patch_size": fam.patch_size,
        "merge_size": fam.spatial_merge_size,
        "temporal_patch_size": fam.temporal_patch_size,
        "image_mean": list(fam.image_mean),
        "image_std": list(fam.image_std),
    }
    image_processor = transformers.Qwen2VLImageProcessor(size=dict(fam.image_size), **common)
    video_processor = getattr(transformers, fam.video_processor_class)(**common)
    processor_cls = fam.transformers_class(fam.processor_class)
    return processor_cls(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer, chat_template=template
    )


def make_tiny_model(
    processor_type: str, out_dir: str | Path, seed: int = 0, text_overrides: dict | None = None, dtype: str = "float32"
) -> Path:
    """Write the tiny checkpoint to ``out_dir`` atomically (built in a temp dir, then renamed), saved in ``dtype``."""
    import torch

    fam = family(processor_type)
    with atomic_dir(out_dir) as tmp:
        torch.manual_seed(seed)
        config = build_config(fam, text_overrides)
        model = fam.transformers_class(fam.model_class)._from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(tmp)
        build_processor(fam).save_pretrained(tmp)
    return Path(out_dir)
