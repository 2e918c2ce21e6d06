"""The training benchmarks' workspace: data run through the real validate -> (decode ->) tokenize -> pack stages, a
model checkpoint the trainer's loading path (stages/train/loading.py) reads, and the params both read.

Built once by the parent process; every configuration's child process reads the same workspace, so all of them
train the same samples from the same weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from schemas.params import Params, parse_params

WORDS = "the a image shows person car tree house road sky blue red green small large left right near far"
PARAMS = "bench_params.json"


def write_dataset(folder: Path, samples: int, seed: int) -> Path:
    """Chat samples like the demo's: 70% one image (224-896 px sides) with text, 30% text only."""
    rng, words = random.Random(seed), WORDS.split()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    sides = [224, 336, 448, 560, 672, 896]
    for w in sides:
        for h in sides:
            pixels = np.random.default_rng(w * 1000 + h).integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"images/{w}x{h}.png")
    with (folder / "chat.jsonl").open("w") as f:
        for _ in range(samples):
            question = " ".join(rng.choices(words, k=rng.randint(10, 200)))
            answer = " ".join(rng.choices(words, k=rng.randint(50, 900)))
            content: list[dict] = [{"type": "text", "text": question}]
            if rng.random() < 0.7:
                image = f"images/{rng.choice(sides)}x{rng.choice(sides)}.png"
                content.insert(0, {"type": "image_url", "image_url": {"url": image}})
            messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return folder / "chat.jsonl"


def bench_params(model_dir: Path, processor_type: str, datasets: list[dict], packing_length: int, **dataset) -> dict:
    """The params mapping of a benchmark run: bf16 (on CUDA), gradient checkpointing, the trainer's AdamW groups."""
    return {
        "dataset_config": {
            "datasets": datasets,
            "processor_config": {"processor_name": str(model_dir), "processor_type": processor_type},
            "packing_length": packing_length,
            "packing_strategy": "first_fit_decreasing",
            **dataset,
        },
        "model_config": {"load_from_pretrained_path": str(model_dir), "attn_implementation": "auto"},
        "trainer_args": {"bf16": True, "gradient_checkpointing": True, "learning_rate": 1e-5, "max_grad_norm": 1.0},
        "validate": {"media_cache": ".cache/media.duckdb"},
    }


def prepare(root: Path, raw: dict, decode: bool = False) -> Params:
    """Run the real stages over the workspace's data and store the params for the child processes."""
    from stages.pack import run as pack
    from stages.tokenize import run as tokenize
    from stages.validate import run as validate

    params = parse_params(raw)
    stages = [validate, tokenize, pack]
    if decode:
        from stages.decode.stage import run as decode_stage

        stages.insert(1, decode_stage)
    for stage in stages:
        stage(params, root)
    (root / PARAMS).write_text(json.dumps(raw))
    return params


def load_workspace_params(root: Path) -> Params:
    return parse_params(json.loads((root / PARAMS).read_text()))


def save_random_checkpoint(config, processor_type: str, out: Path, device: str) -> Path:
    """A randomly initialised model of ``config`` saved in bf16 with the family's processor (no download):
    the trainer loads it with ``from_pretrained`` exactly as it loads a released checkpoint."""
    import torch

    from stages.families import family
    from stages.tiny_model import build_processor

    fam = family(processor_type)
    torch.manual_seed(0)
    with torch.device(device):
        model = fam.transformers_class(fam.model_class)._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    build_processor(fam).save_pretrained(out)
    del model
    return out
