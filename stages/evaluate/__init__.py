"""The evaluate stage: the held-out loss of a trained model and a few of its answers, after train.

The model is the run's Hugging Face export (what `from_pretrained` users get), another from_pretrained directory,
or a checkpoint-<step> of the run (its sharded weights loaded over the base model), set by `evaluate.checkpoint`
or `--checkpoint`. The loss is the global per-token loss over every eval pack, computed by the trainer's own
in-loop evaluation code in one process (so it equals the in-loop eval loss of the same weights). The answers are
greedy generations on the first held-out samples (stages/evaluate/generations.py). Writes metrics/evaluate.json
and metrics/generations.json (the table the flow publishes as a Prefect artifact).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from schemas.errors import StageInputError
from schemas.params import Params
from stages.evaluate.generations import answer_text, end_ids, generate, prompt_texts, prompts
from stages.families import ModelFamily, family
from stages.io import write_json
from stages.tokenize import load_processor
from stages.train.attention import ATTENTION_NAME, implementation_map
from stages.train.checkpoint import EXPORT_FILE, STATE_FILE
from stages.train.data import RowBuilder
from stages.train.evaluation import eval_loss, eval_plan
from stages.train.forward import remove_loss_forward
from stages.train.samples import EVAL_PACKS

METRICS = Path("metrics/evaluate.json")
GENERATIONS = Path("metrics/generations.json")


@dataclass
class EvaluateResult:
    model: str  # the evaluated directory, relative to the project
    step: int | None  # the training step of its weights (None: not a checkpoint or export of this run)
    eval_loss: float | None  # None without held-out samples
    eval_label_tokens: int
    eval_samples: int
    eval_packs: int
    generations: int
    seconds: float


def model_dir(params: Params, root: Path, checkpoint: str | None) -> Path:
    """The directory to evaluate: ``checkpoint``, else evaluate.checkpoint, else the run's export."""
    args = params.trainer_args
    chosen = checkpoint or params.evaluate.checkpoint
    path = root / chosen if chosen else root / args.output_dir / args.run_name / "hf"
    if not (path / "config.json").is_file() and not (path / STATE_FILE).is_file():
        raise StageInputError(
            f"no trained model at {path}: expected a from_pretrained directory (run `qvl train` first) or a "
            "checkpoint-<step> directory"
        )
    return path


def trained_step(path: Path) -> int | None:
    """The step of a checkpoint's or this project's export's weights (None for another from_pretrained dir)."""
    for name in (STATE_FILE, EXPORT_FILE):
        if (path / name).is_file():
            return int(json.loads((path / name).read_text())["step"])
    return None


def load_model(path: Path, fam: ModelFamily, base: str, device: torch.device):
    """The model at ``path`` with the padding-free attention, in eval mode: bf16 on CUDA (the varlen kernels'
    dtype), fp32 on CPU. A checkpoint-<step> directory holds torch.distributed.checkpoint shards of the training
    model's state: they are loaded over the base model (DCP reshards them into this one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_class = fam.transformers_class(fam.model_class)
    attention = implementation_map(ATTENTION_NAME)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if (path / "config.json").is_file():
        model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    else:
        model = model_class.from_pretrained(base, dtype=torch.float32, attn_implementation=attention)
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
        set_model_state_dict(model, state["model"])
        model.to(dtype)
    model.config.use_cache = False  # the packed loss forward (DESIGN.md); generation turns it back on per call
    return model.to(device).eval()


def run(params: Params, root: Path = Path("."), checkpoint: str | None = None) -> EvaluateResult:
    started = time.perf_counter()
    cfg = params.dataset_config
    fam = family(cfg.processor_config.processor_type)
    path = model_dir(params, root, checkpoint)
    if not (root / EVAL_PACKS).is_file():
        raise StageInputError(f"{root / EVAL_PACKS} not found: run `qvl pack` first")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = load_model(path, fam, params.model_config_.load_from_pretrained_path, device)
    processor = load_processor(params)
    held_out = RowBuilder.for_family(root, processor, cfg, fam, model.config).for_packs(root / EVAL_PACKS)
    pack_ids = sorted(held_out.packs)
    sample_ids = [s for p in pack_ids for s in held_out.packs[p]]
    loss, labels = None, 0
    if pack_ids:
        pad_id = processor.tokenizer.pad_token_id or 0
        loss, labels = eval_loss(model, held_out, eval_plan(pack_ids, 1, 0), device, None, False, pad_id, True)
    else:
        print(
            "evaluate: no held-out samples (set dataset_config.eval_ratio or eval_datasets): no eval loss",
            file=sys.stderr,
        )
    table = answer(model, held_out, sample_ids, device, params, root)
    result = EvaluateResult(
        model=str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
        step=trained_step(path),
        eval_loss=loss,
        eval_label_tokens=labels,
        eval_samples=len(sample_ids),
        eval_packs=len(pack_ids),
        generations=len(table),
        seconds=time.perf_counter() - started,
    )
    write_json(root / GENERATIONS, table)
    write_json(root / METRICS, {k: v for k, v in asdict(result).items() if k != "seconds"})  # the same bytes per run
    return result


def answer(model, builder: RowBuilder, sample_ids: list[str], device: torch.device, params: Params, root: Path):
    """The generations table: sample id, prompt, reference answer, generated answer."""
    chosen = prompts(builder, sample_ids, params.evaluate.generations)
    if not chosen:
        return []
    texts = prompt_texts(root, [p.sample_id for p in chosen])
    tokenizer = builder.processor.tokenizer
    ends = end_ids(model, tokenizer)
    remove_loss_forward(model)
    model.set_attn_implementation("sdpa")  # generation: transformers' own masks and KV cache
    try:
        rows = []
        for prompt in chosen:
            new = generate(model, builder, prompt, device, params.evaluate.max_new_tokens, ends)
            rows.append(
                {
                    "sample_id": prompt.sample_id,
                    "prompt": texts.get(prompt.sample_id, ""),
                    "reference": answer_text(tokenizer, prompt.reference_ids, ends),
                    "generated": answer_text(tokenizer, new, ends),
                    "generated_tokens": len(new),
                }
            )
    finally:
        model.set_attn_implementation(implementation_map(ATTENTION_NAME))
    return rows
