"""The offline tiny models: real classes, real tokenizer ids, real chat templates, loadable by from_pretrained."""

import pytest
import torch

from stages.families import family as family_of
from stages.tokenizer_build import SPECIAL_TOKENS
from tests.conftest import FAMILIES, MORE_FAMILIES, processor_of

CHAT = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "a.jpg"},
            {"type": "video", "video": "b.mp4"},
            {"type": "text", "text": "What is this?"},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
]


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_tokenizer_known_ids(tiny_models, family):
    tok = processor_of(tiny_models[family]).tokenizer
    assert tok("Hello world").input_ids == [9707, 1879]
    assert tok("你好").input_ids == [108386]
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(151643, 151657))
    assert tok.convert_tokens_to_ids("<tool_call>") == 151657
    # Special tokens in text are single ids, as in the released tokenizers.
    assert tok("<|im_start|>user").input_ids == [151644, 872]


def test_qwen3_has_its_extra_tokens(tiny_models):
    tok = processor_of(tiny_models["qwen3_vl"]).tokenizer
    assert tok.convert_tokens_to_ids(["<tool_response>", "</think>"]) == [151665, 151668]


def test_qwen2_5_vl_chat_template_rendering(tiny_models):
    processor = processor_of(tiny_models["qwen2_5_vl"])
    text = processor.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    # Without a system turn, the released template adds the default system prompt.
    text = processor.apply_chat_template(CHAT[1:], tokenize=False, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_qwen3_vl_chat_template_rendering(tiny_models):
    processor = processor_of(tiny_models["qwen3_vl"])
    text = processor.apply_chat_template(CHAT, tokenize=False)
    # The video is a bare <|video_pad|>: the processor adds per-frame timestamps and vision tokens itself.
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|video_pad|>What is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    assert not processor.apply_chat_template(CHAT[1:], tokenize=False).startswith("<|im_start|>system")


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_model_loads_offline_and_runs(tiny_models, family, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fam = family_of(family)
    model = fam.transformers_class(fam.model_class).from_pretrained(tiny_models[family])
    processor = processor_of(tiny_models[family])
    assert type(model).__name__ == fam.model_class and type(processor).__name__ == fam.processor_class
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    image_only = [CHAT[0], {"role": "user", "content": CHAT[1]["content"][:1] + CHAT[1]["content"][2:]}]
    text = processor.apply_chat_template(image_only, tokenize=False)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], 151936)
    assert torch.isfinite(out.logits).all()
