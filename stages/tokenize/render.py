"""Turn normalised samples into token ids and labels, exactly as the real Qwen processor would.

The text comes from the processor's chat template; each image / video placeholder is expanded by the
processor's own `replace_image_token` / `replace_video_token` (Qwen3-VL's per-frame timestamps included) from
grids computed by `VisionArgs`; the tokenizer encodes the result. No pixels are processed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from stages.decode.sampling import SamplingOptions, video_key
from stages.decode.shards import FrameStore
from stages.tokenize.vision import VisionArgs, video_metadata

IGNORE = -100


@dataclass
class Tokenized:
    sample_id: str
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    image_grid_thw: list[list[int]] = field(default_factory=list)
    video_keys: list[str] = field(default_factory=list)
    video_grid_thw: list[list[int]] = field(default_factory=list)
    second_per_grid_ts: list[float] = field(default_factory=list)


class SampleRenderer:
    """One processor, reused for every sample of a worker."""

    def __init__(self, processor, vision: VisionArgs, frames: FrameStore | None, sampling: SamplingOptions | None):
        self.processor = processor
        self.vision = vision
        self.frames = frames
        self.sampling = sampling  # how decode sampled the videos: part of each clip's frame-store key
        tok = processor.tokenizer
        self.header = tok("<|im_start|>assistant\n").input_ids
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def _expansions(self, media: list[dict], out: Tokenized) -> tuple[list[str], list[str]]:
        images, videos = [], []
        for m in media:
            if m["kind"] == "image":
                grid = self.vision.image_grid(m["height"], m["width"])
                out.image_paths.append(m["path"])
                out.image_grid_thw.append(grid)
                images.append(self.processor.replace_image_token({"image_grid_thw": [np.array(grid)]}, 0))
                continue
            key = video_key(m["sha256"], self.sampling, m["video_start"], m["video_end"])
            index = self.frames[key]
            grid = self.vision.video_grid(index["nframes"], index["height"], index["width"])
            meta = video_metadata(index)
            out.video_keys.append(key)
            out.video_grid_thw.append(grid)
            out.second_per_grid_ts.append(self.vision.temporal_patch_size / meta.sampled_fps)
            inputs = {"video_grid_thw": [np.array(grid)], "video_metadata": [meta]}
            videos.append(self.processor.replace_video_token(inputs, 0))
        return images, videos

    def render(self, samples: list[tuple[str, str, list[dict]]]) -> list[Tokenized]:
        """(sample_id, messages JSON, media) -> token ids and labels, tokenised as one batch."""
        results, texts = [], []
        for sample_id, messages, media in samples:
            out = Tokenized(sample_id)
            text = self.processor.apply_chat_template(json.loads(messages), tokenize=False)
            images, videos = self._expansions(media, out)
            (text,), _ = self.processor.get_text_with_replacements([text], images, videos)
            results.append(out)
            texts.append(text)
        for out, ids in zip(results, self.processor.tokenizer(texts).input_ids, strict=True):
            out.input_ids = ids
            out.labels = self.assistant_labels(ids)
        return results

    def assistant_labels(self, ids: list[int]) -> list[int]:
        """-100 everywhere but each assistant turn's content and its closing <|im_end|>."""
        labels = [IGNORE] * len(ids)
        h, i, n = self.header, 0, len(ids)
        while i < n:
            if ids[i] == h[0] and ids[i : i + len(h)] == h:
                j = i + len(h)
                while j < n and ids[j] != self.im_end:
                    labels[j] = ids[j]
                    j += 1
                if j < n:
                    labels[j] = ids[j]
                i = j + 1
            else:
                i += 1
        return labels
