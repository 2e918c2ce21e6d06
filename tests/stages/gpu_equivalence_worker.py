"""Forward and backward of the packed training path against an fp32 SDPA reference on the same rows, comparing
the loss and every parameter's gradient; and a deliberately broken packed path (segments crossing: one causal
segment over the whole row) that the same comparison must reject.

The rows are structured so that attention decides the answer: each packed sample is random tokens, a separator,
then the same tokens again, with labels only on the copy; several samples share one row, so a path that lets a
sample attend to its neighbours (the broken variant) sees the wrong context.

Reference: the fp32 model with transformers' sdpa, each sample alone (batch 1, its own positions), full logits,
cross-entropy summed over the labels; it shares no code with the packed path (no ``qvl_packed``, no
``row_loss_sum``). Metric: for every parameter tensor with a gradient, ||g - g_ref|| / ||g_ref||; the comparison
fails when the largest of these exceeds ``GRAD_TOLERANCE``, or the loss differs by more than ``LOSS_TOLERANCE``
relative.

How the tolerance was chosen (measured on CPU with the tiny Qwen2.5-VL model, 2 rows x 4 samples of 193 tokens;
tests/stages/test_train_gpu.py checks both sides on every CPU run): the fp32 packed path differs from the fp32
reference by 2.6e-7 (summation order only); the trainer's bf16 path (FSDP2 bf16 mixed precision, per-sample SDPA
kernel: the same bf16 roundings of weights and activations the CUDA path has) by 0.018 at worst (a k_proj bias
gradient; median 0.008); the broken variant by 1.07 at worst (median 0.72) in fp32 and in bf16, while its loss
moves by only 6e-4 relative (the model is random, which is why gradients are compared). GRAD_TOLERANCE = 0.1
sits ~5x above the bf16 error (room for the varlen kernel and Liger's bf16 kernels) and ~10x below the broken
error, so it tells a bf16 kernel from an attention bug.

Run as a script (on CUDA, by test_train_gpu.py; a fresh process, since Liger patches transformers globally):
the trainer's path (meta-device build, Liger where asked, FSDP2 with bf16 mixed precision over NCCL, weights
loaded from rank 0, qvl_packed varlen) against the reference, writing the comparisons as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from stages.fast_exit import exit_now
from stages.train.attention import PackedSegments, packed_attention
from stages.train.data import IGNORE, Row
from stages.train.forward import row_loss_sum

GRAD_TOLERANCE = 0.1
LOSS_TOLERANCE = 0.01
BROKEN = "qvl_packed_crossing"
SEPARATOR = 151643  # <|endoftext|>


def _crossing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The broken variant: ``qvl_packed`` told the whole row is one sample, so samples attend to each other."""
    length = query.shape[2]
    whole = PackedSegments.from_text_positions(torch.arange(length), query.device)  # positions never restart
    kwargs["packed_segments"] = whole
    return packed_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


AttentionInterface.register(BROKEN, _crossing_attention)


def copy_rows(rows: int, samples_per_row: int, half: int, seed: int = 0) -> list[Row]:
    """Text-only packed rows of copy-task samples: x, separator, x again; labels (shifted) only on the copy."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        ids, targets, positions = [], [], []
        for _ in range(samples_per_row):
            x = torch.randint(1000, 30000, (half,), generator=gen)
            sample = torch.cat([x, torch.tensor([SEPARATOR]), x])
            labels = torch.full_like(sample, IGNORE)
            labels[half : 2 * half] = x  # position i predicts token i + 1: the copy, from the separator on
            ids.append(sample)
            targets.append(labels)
            positions.append(torch.arange(sample.numel()))
        text = torch.cat(positions).view(1, 1, -1)
        out.append(
            Row(
                input_ids=torch.cat(ids).view(1, -1),
                targets=torch.cat(targets).view(1, -1),
                position_ids=text.expand(4, 1, -1).clone(),
                label_tokens=int(sum((t != IGNORE).sum() for t in targets)),
                pack_ids=[],
            )
        )
    return out


def bench_params(model_dir: str, family_name: str):
    """Params for loading ``model_dir`` the trainer's way: bf16 (mixed precision on CUDA), gradient checkpointing."""
    from schemas.params import parse_params

    return parse_params(
        {
            "dataset_config": {"processor_config": {"processor_name": model_dir, "processor_type": family_name}},
            "model_config": {"load_from_pretrained_path": model_dir},
            "trainer_args": {"bf16": True, "gradient_checkpointing": True},
        }
    )


def trainer_model(params, device: torch.device, attention: str, fsdp_bf16: bool | None, liger: bool = False):
    """The model as stages/train/worker.py sets it up: built on the meta device, Liger (if asked), FSDP2 (unless
    ``fsdp_bf16`` is None: the reference stays a plain module), weights loaded from rank 0.
    (model, the kernel set for row_loss_sum or None, the Liger log line)."""
    from stages.families import family
    from stages.train.liger import apply_liger
    from stages.train.loading import materialize
    from stages.train.model import build_model, wrap_fsdp2

    fam = family(params.dataset_config.processor_config.processor_type)
    model = build_model(params, fam, attention)
    kernels, note = apply_liger(model, fam, device) if liger else (None, "not used")
    if fsdp_bf16 is not None:
        wrap_fsdp2(model, params, fam, mixed_precision=fsdp_bf16)
    materialize(model, fam.transformers_class(fam.model_class), params.model_config_.load_from_pretrained_path, device)
    return model, kernels, note


def gradients(model) -> dict[str, torch.Tensor]:
    """Full fp32 gradients by parameter name (FSDP2's DTensor gradients gathered), then cleared."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("_fsdp_wrapped_module.", "")] = g.detach().float().cpu().clone()
        p.grad = None
    return grads


def reference(model, rows: list[Row], device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean loss over all label tokens and its gradients, each sample alone through sdpa with full logits."""
    total_labels = sum(r.label_tokens for r in rows)
    loss_sum = 0.0
    for row in rows:
        bounds = [0, *torch.cumsum(torch.tensor(row.seq_lengths()), 0).tolist()]
        for a, b in zip(bounds, bounds[1:], strict=False):
            logits = model(
                input_ids=row.input_ids[:, a:b].to(device),
                position_ids=row.position_ids[:, :, a:b].to(device),
                use_cache=False,
            ).logits
            loss = F.cross_entropy(logits[0].float(), row.targets[0, a:b].to(device), reduction="sum")
            (loss / total_labels).backward()
            loss_sum += float(loss)
    return loss_sum / total_labels, gradients(model)


def packed(model, rows: list[Row], device: torch.device, kernels=None) -> tuple[float, dict[str, torch.Tensor]]:
    """The same through the trainer's ``row_loss_sum`` (whatever attention the model was loaded with; ``kernels``:
    what apply_liger returned, for its fused linear cross-entropy)."""
    total_labels = sum(r.label_tokens for r in rows)
    loss_sum = 0.0
    for row in rows:
        loss = row_loss_sum(model, row, device, None, kernels)
        (loss / total_labels).backward()
        loss_sum += float(loss)
    return loss_sum / total_labels, gradients(model)


def compare(test: tuple[float, dict], ref: tuple[float, dict]) -> dict:
    """The loss's relative difference, and the worst parameter's relative gradient error (with its name)."""
    (loss, grads), (ref_loss, ref_grads) = test, ref
    if set(grads) != set(ref_grads):
        raise AssertionError(f"different parameters have gradients: {sorted(set(grads) ^ set(ref_grads))[:5]}")
    errors = {n: float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in ref_grads.items() if g.norm() > 0}
    worst = max(errors, key=errors.get)
    return {
        "loss": loss,
        "reference_loss": ref_loss,
        "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
        "grad_max_rel_err": errors[worst],
        "grad_worst_param": worst,
        "grad_median_rel_err": sorted(errors.values())[len(errors) // 2],
    }


def within_tolerance(result: dict) -> bool:
    return result["grad_max_rel_err"] <= GRAD_TOLERANCE and result["loss_rel_diff"] <= LOSS_TOLERANCE


def assert_matches(result: dict, what: str) -> None:
    """The one assertion both the correct path and (expected to fail) the broken path go through."""
    assert within_tolerance(result), (
        f"{what}: loss differs by {result['loss_rel_diff']:.2e} relative (tolerance {LOSS_TOLERANCE}), worst "
        f"gradient {result['grad_worst_param']} by {result['grad_max_rel_err']:.3e} (tolerance {GRAD_TOLERANCE})"
    )


def main(model_dir: str, family_name: str, out: str) -> None:
    """CUDA: the trainer's bf16 path (FSDP2 over NCCL, varlen, with and without Liger) and the broken variant
    against the fp32 reference."""
    import torch.distributed as dist

    from stages.train.distributed import init_distributed
    from stages.train.model import choose_attention

    device = init_distributed().device  # torchrun-style environment, set by the test
    params = bench_params(model_dir, family_name)
    rows = copy_rows(rows=2, samples_per_row=4, half=96)
    ref_model, _, _ = trainer_model(params, device, "sdpa", fsdp_bf16=None)
    ref = reference(ref_model, rows, device)
    del ref_model
    attention, _ = choose_attention("auto", device, 1, bf16=True)
    result: dict = {"tolerance": {"grad": GRAD_TOLERANCE, "loss": LOSS_TOLERANCE}}
    for name, text_attention, liger in (
        ("varlen_bf16", attention, False),
        ("broken_bf16", BROKEN, False),
        ("varlen_liger_bf16", attention, True),  # last: Liger's patches stay in this process
    ):
        model, kernels, note = trainer_model(params, device, text_attention, fsdp_bf16=True, liger=liger)
        result[name] = {**compare(packed(model, rows, device, kernels), ref), "liger_note": note}
        del model
    Path(out).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
    exit_now(0)
