"""Started by torchrun (2 gloo ranks) from test_train_loading.py, writes one JSON per rank: the sharded model
loaded by the trainer's path vs a plain ``from_pretrained`` copy (loss, gradients, tied embeddings, rotary
buffers); 4 micro-batches with one gradient sync vs a sync after each; the trainer's AdamW (foreach) vs the
per-parameter loop (foreach=False)."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoProcessor

from schemas.params import TrainerArgs
from stages.families import family
from stages.fast_exit import exit_now
from stages.train.loading import build_on_meta, materialize
from stages.train.optim import build_optimizer, param_groups

CPU = torch.device("cpu")


def sharded(fam, model_dir):
    """The trainer's loading path: meta build, fully_shard per decoder layer / vision block and the root, load."""
    cls = fam.transformers_class(fam.model_class)
    model = build_on_meta(cls, model_dir, "sdpa")
    for module in model.modules():
        if type(module).__name__ in (fam.decoder_layer_class, fam.vision_block_class):
            fully_shard(module)
    fully_shard(model)
    materialize(model, cls, model_dir, CPU)
    return model


def image_inputs(processor, seed: int) -> dict:
    """A chat with one random image, labels on every token (transformers computes the loss itself)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)
    words = " ".join(rng.choice(["red", "blue", "cat", "tree", "sky", "one", "two"], 12))
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe: {words}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": words}]},
    ]
    text = processor.apply_chat_template(chat, tokenize=False)
    inputs = dict(processor(text=[text], images=[image], return_tensors="pt"))
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = grad.detach().clone()
    return out


def max_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in a)


def accumulate(model, batches, sync_every_micro: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for i, inputs in enumerate(batches):
        model.set_requires_gradient_sync(sync_every_micro or i == len(batches) - 1)
        model(**inputs, use_cache=False).loss.backward()
    return full_grads(model)


def numerics(fam, model_dir: str) -> dict:
    rank = dist.get_rank()
    cls = fam.transformers_class(fam.model_class)
    processor = AutoProcessor.from_pretrained(model_dir)
    plain = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = sharded(fam, model_dir)
    text_model = model.get_submodule(fam.text_model_prefix)
    result = {
        "tied": model.get_output_embeddings().weight is text_model.embed_tokens.weight,
        "buffers_equal": all(torch.equal(b, dict(plain.named_buffers())[n]) for n, b in model.named_buffers()),
        "buffers": sorted(n for n, _ in model.named_buffers()),
    }
    inputs = image_inputs(processor, seed=0)  # the same on both ranks: FSDP's averaged gradient equals plain's
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    reference = plain(**inputs, use_cache=False).loss
    reference.backward()
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    result["loss"], result["plain_loss"] = float(loss), float(reference)
    result["grad_error"] = max_relative(full_grads(model), plain_grads)

    batches = [image_inputs(processor, seed=10 * rank + i) for i in range(4)]  # differ per rank and micro-batch
    every = accumulate(model, batches, sync_every_micro=True)
    once = accumulate(model, batches, sync_every_micro=False)
    result["accumulation_error"] = max_relative(once, every)

    args = TrainerArgs(learning_rate=1e-3, weight_decay=0.1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    stepped = {}
    for name, optimizer in (
        ("foreach", build_optimizer(model, args, fam, CPU)),
        (
            "loop",
            torch.optim.AdamW(
                param_groups(model, args, fam),
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                foreach=False,
            ),
        ),
    ):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        for _ in range(2):
            accumulate(model, batches[:2], sync_every_micro=False)
            optimizer.step()
        stepped[name] = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
    result["optimizer_error"] = max_relative(stepped["foreach"], stepped["loop"])
    result["optimizer_moved"] = max_relative(stepped["loop"], {n: p.full_tensor() for n, p in start.items()})
    return result


def main(processor_type: str, model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    fam = family(processor_type)
    result = numerics(fam, model_dir)
    Path(f"{out}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_now(0)
