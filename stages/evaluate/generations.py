"""A few held-out samples answered by the trained model (greedy), beside the reference answer.

The prompt is the tokenized sample cut where its last labelled turn (the last assistant answer) begins, so the
model sees exactly the ids training saw; the reference is that answer's text. The images and videos come from the
same processors and frame shards as training's rows. A sample whose last answer itself holds an image or video is
skipped (its media cannot be split from the prompt's).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from stages.train.data import IGNORE, RowBuilder

VALIDATED = "data/validated/samples.parquet"


@dataclass
class Prompt:
    sample_id: str
    input_ids: torch.Tensor  # (1, prompt length)
    reference_ids: list[int]
    vision: dict
    seconds: list[float]  # seconds per temporal patch of each video (Qwen2.5-VL's M-RoPE)


def last_answer_start(labels: np.ndarray) -> int | None:
    """Where the last run of labelled tokens begins (the last assistant answer), or None without labels."""
    labelled = np.flatnonzero(labels != IGNORE)
    if not labelled.size:
        return None
    gaps = np.flatnonzero(np.diff(labelled) > 1)
    return int(labelled[gaps[-1] + 1] if gaps.size else labelled[0])


def prompts(builder: RowBuilder, sample_ids: Iterable[str], limit: int) -> list[Prompt]:
    """Up to ``limit`` prompts from ``sample_ids``, in order."""
    vision_tokens = [builder.image_token, builder.video_token]
    found: list[Prompt] = []
    for sample_id in sample_ids:
        if len(found) == limit:
            break
        row = int(builder.samples.rows_of([sample_id])[0])
        input_ids, labels = (np.asarray(a, np.int64) for a in builder.samples.tokens(row))
        start = last_answer_start(labels)
        if start is None or np.isin(input_ids[start:], vision_tokens).any():
            continue
        answer = input_ids[start:][labels[start:] != IGNORE]
        media = builder.samples.media(row)
        vision = builder.vision_inputs([media], lambda sample_id=sample_id: [sample_id])
        prompt_ids = torch.from_numpy(input_ids[:start]).view(1, -1)
        found.append(Prompt(sample_id, prompt_ids, answer.tolist(), vision, media["second_per_grid_ts"]))
    return found


def generation_inputs(model, builder: RowBuilder, prompt: Prompt, device: torch.device) -> dict:
    """The prompt's inputs as the model's own forward takes them: ids, mask, pixels and grids, and what its M-RoPE
    needs to place the vision tokens (transformers computes 3-D positions only given ``mm_token_type_ids``;
    Qwen2.5-VL's also takes each video's seconds per temporal patch, where training passes precomputed positions)."""
    ids = prompt.input_ids
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": torch.tensor(builder.processor.create_mm_token_type_ids(ids.tolist())),
        **prompt.vision,
    }
    if prompt.seconds and "second_per_grid_ts" in inspect.signature(model.forward).parameters:
        inputs["second_per_grid_ts"] = torch.tensor(prompt.seconds)
    return {k: v.to(device) for k, v in inputs.items()}


def end_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the chat template's end of turn and the model's own end-of-sequence ids."""
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), *configured})


def answer_text(tokenizer, ids: list[int], ends: list[int]) -> str:
    """The answer up to its first end token, special tokens kept (a model that emits them should show it); an
    answer of whitespace alone is shown quoted, so that it reads as what the model said."""
    cut = next((i for i, t in enumerate(ids) if t in ends), len(ids))
    text = tokenizer.decode(ids[:cut], skip_special_tokens=False)
    return text.strip() or (repr(text) if text else "")


def generate(
    model, builder: RowBuilder, prompt: Prompt, device: torch.device, max_new_tokens: int, ends: list[int]
) -> list[int]:
    """Greedy generation from ``prompt`` until one of ``ends`` (`end_ids`): the new token ids."""
    out = model.generate(
        **generation_inputs(model, builder, prompt, device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=ends,
        pad_token_id=builder.processor.tokenizer.pad_token_id,
    )
    return out[0, prompt.input_ids.shape[1] :].tolist()


def prompt_texts(root, sample_ids: list[str]) -> dict[str, str]:
    """Each sample's last user message as a person reads it: its text parts, with <image> / <video> where the
    media were (from validate's normal form of the messages)."""
    wanted = [("sample_id", "in", sample_ids)]  # read only the row groups that can hold them
    table = pq.read_table(root / VALIDATED, columns=["sample_id", "messages"], filters=wanted)
    texts = {}
    for sample_id, messages in zip(*(table.column(c).to_pylist() for c in ("sample_id", "messages")), strict=True):
        users = [m for m in json.loads(messages) if m.get("role") == "user"]
        content = users[-1]["content"] if users else []
        parts = [content] if isinstance(content, str) else [_part_text(p) for p in content]
        texts[sample_id] = " ".join(p for p in parts if p)
    return texts


def _part_text(part: dict) -> str:
    kind = part.get("type")
    return part.get("text", "") if kind == "text" else f"<{kind}>"
