"""The Hugging Face export keeps the base checkpoint's dtype: a bf16 base gives a bf16 export that
``AutoModelForImageTextToText.from_pretrained`` loads and that generates from an image prompt."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from stages.tiny_model import make_tiny_model
from tests.stages.test_train_distributed import train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("packed_project", ["qwen2_5_vl"], indirect=True)
def test_bf16_base_exports_bf16_that_loads_and_generates(packed_project, tmp_path):
    root, family_name, _ = packed_project
    base = make_tiny_model(family_name, tmp_path / "tiny-bf16", dtype="bfloat16")
    train(root, "bf16-export", base, family_name, max_steps=1, nproc_per_node=2)
    hf = root / "output/bf16-export/hf"
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
    for shard in hf.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (safe_open is not iterable)

    model = AutoModelForImageTextToText.from_pretrained(hf)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    processor = AutoProcessor.from_pretrained(hf)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    image = np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
