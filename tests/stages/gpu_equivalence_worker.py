"""Started by test_train_gpu.py on a CUDA machine (a fresh process, since Liger patches transformers globally):
the loss of the same packed rows with transformers' sdpa, with qvl_packed (varlen kernel), and with qvl_packed +
Liger, bf16, as JSON."""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoProcessor

from schemas.params import load_params
from stages.families import family
from stages.tokenize.vision import VisionArgs
from stages.train.attention import ATTENTION_NAME
from stages.train.data import RowBuilder
from stages.train.forward import row_loss_sum
from stages.train.liger import apply_liger

CUDA = torch.device("cuda:0")


def losses(model, rows, liger: bool = False) -> list[float]:
    with torch.no_grad():
        return [float(row_loss_sum(model, row, CUDA, None, liger)) / row.label_tokens for row in rows]


def main(params_path: str, out: str) -> None:
    params = load_params(params_path)
    fam = family(params.dataset_config.processor_config.processor_type)
    cls = fam.transformers_class(fam.model_class)
    model_dir = params.model_config_.load_from_pretrained_path
    processor = AutoProcessor.from_pretrained(model_dir)

    def load(text_attention: str):
        implementation = {"text_config": text_attention, "vision_config": "sdpa"}
        return cls.from_pretrained(model_dir, attn_implementation=implementation, dtype=torch.bfloat16).to(CUDA)

    model = load("sdpa")
    vision = VisionArgs.for_processor(processor, params.dataset_config)
    builder = RowBuilder(Path.cwd(), processor, vision, cls, model.config)
    rows = [builder.build([p]) for p in sorted(builder.packs)[:3]]
    result = {"sdpa": losses(model, rows)}
    model = load(ATTENTION_NAME)
    result["varlen"] = losses(model, rows)
    applied, why = apply_liger(model, fam, CUDA)
    result["liger_applied"], result["liger_note"] = applied, why
    result["varlen_liger"] = losses(model, rows, liger=True)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
