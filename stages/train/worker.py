"""The training loop, one process per rank (started by torchrun; see stages/train/__init__.py).

Read top to bottom: set up -> model -> optimizer -> data -> resume -> for each step: micro-batches, loss over
the global batch's label tokens, backward, clip, step -> checkpoints -> Hugging Face export.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from schemas.errors import PipelineError
from schemas.params import load_params
from stages.families import family
from stages.train import checkpoint
from stages.train.data import LoaderState, PrefetchLoader, RowBuilder, epoch_order, rank_micro_batches
from stages.train.forward import row_loss_sum
from stages.train.liger import apply_liger
from stages.train.model import choose_attention, freeze, load_model, trainable_summary, wrap_fsdp2
from stages.train.optim import build_optimizer, build_scheduler
from stages.train.reporters import Reporters
from stages.train.sequence_parallel import build_layout, check_degree, shard_text_model_inputs
from stages.train.telemetry import parameter_counts, peak_flops, step_flops, write_outputs


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def train(params_path: str) -> None:
    params = load_params(params_path)
    args, cfg = params.trainer_args, params.dataset_config
    root = Path.cwd()
    fam = family(cfg.processor_config.processor_type)
    device = (
        torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if torch.cuda.is_available() else torch.device("cpu")
    )
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed + rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    # Model, sequence-parallel layout, kernels
    attention, why = choose_attention(params.model_config_.attn_implementation, device, args.sp_ulysses_degree)
    model = load_model(params, fam, device, attention)
    check_degree(args.sp_ulysses_degree, world, model.config.text_config)
    layout = build_layout(args.sp_ulysses_degree)
    sp = layout.sp
    if sp is not None:
        shard_text_model_inputs(model.get_submodule(fam.text_model_prefix), sp)
    leads_sp_group = sp is None or sp.rank == 0  # one rank per SP group counts tokens and packs
    log(
        f"attention: {attention} ({why}); device {device.type}, world size {world} = "
        f"{layout.dp_size} data-parallel x {args.sp_ulysses_degree} sequence-parallel"
    )
    liger = False
    if args.use_liger_kernel:
        liger, why = apply_liger(model, fam, device)
        log(f"use_liger_kernel: {why}")
    freeze(model, args.freeze_modules)
    for line in trainable_summary(model, fam):
        log(f"  {line}")
    lm_params, vision_params = parameter_counts(model, fam.vision_tower_prefix)
    wrap_fsdp2(model, params, fam, mixed_precision=args.bf16 and device.type == "cuda")

    # Data and schedule
    from transformers import AutoProcessor

    from stages.tokenize.vision import VisionArgs

    processor = AutoProcessor.from_pretrained(cfg.processor_config.processor_name)
    builder = RowBuilder(
        root, processor, VisionArgs.for_processor(processor, cfg), fam.transformers_class(fam.model_class), model.config
    )
    pack_ids = sorted(builder.packs)
    pad_id = processor.tokenizer.pad_token_id or 0  # SP padding: a label-free segment of its own, any id works
    global_batch = layout.dp_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(pack_ids) / global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    optimizer = build_optimizer(model, args, fam)
    scheduler = build_scheduler(optimizer, args, total_steps)
    for group in optimizer.param_groups:
        log(
            f"  lr group {group['name']}: lr {group['initial_lr']:g}, weight decay {group['weight_decay']:g}, "
            f"{sum(p.numel() for p in group['params']):,} parameters"
        )

    # Resume from the newest complete checkpoint, if any
    run_dir = root / args.output_dir / args.run_name
    state, history, step = LoaderState(), [], 0
    shared = [checkpoint.run_fingerprint(params, root) if rank == 0 else None]  # hashes the inputs once, not per rank
    dist.broadcast_object_list(shared, src=0)
    fingerprint = shared[0]
    if checkpoint.discard_stale(run_dir, fingerprint):
        log(f"starting fresh: the config, model, training code or data changed since the checkpoints in {run_dir}")
    if existing := checkpoint.complete_checkpoints(run_dir):
        saved = checkpoint.load(existing[-1], model, optimizer, scheduler)
        state, history, step = LoaderState(**saved["loader"]), saved["history"], saved["step"]
        log(f"resumed from {existing[-1]} at step {step} (epoch {state.epoch}, {state.packs_done} packs done)")

    reporters = Reporters(
        [t for t in args.report_to if t != "none"] if rank == 0 else [], run_dir, args.run_name, params.to_yaml_dict()
    )
    peak = peak_flops(device)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=rank != 0 or None)
    while step < total_steps:
        remaining = epoch_order(pack_ids, state.epoch, cfg.seed)[state.packs_done :]
        steps_left = math.ceil(len(remaining) / global_batch)
        plan = [
            mb
            for s in range(steps_left)
            for mb in rank_micro_batches(
                remaining,
                s,
                layout.dp_size,
                layout.dp_rank,
                args.per_device_train_batch_size,
                args.gradient_accumulation_steps,
            )
        ]
        rows = iter(PrefetchLoader(builder, plan, args.dataloader_num_workers))
        for s in range(steps_left):
            if step >= total_steps:
                break
            started = time.perf_counter()
            micro = [next(rows) for _ in range(args.gradient_accumulation_steps)]
            seqs = [n for r in micro for n in r.seq_lengths()]
            patches = sum(int(g.prod(-1).sum()) for r in micro for k, g in r.vision.items() if k.endswith("grid_thw"))
            counts = torch.tensor(
                [
                    sum(r.label_tokens for r in micro),
                    sum(r.tokens for r in micro),
                    *step_flops(lm_params, vision_params, model.config.text_config, seqs, patches),
                ],
                dtype=torch.float64,
            ) * float(leads_sp_group)
            dist.all_reduce(counts)
            label_tokens, tokens, lm_flops, vis_flops = int(counts[0]), int(counts[1]), *counts[2:].tolist()
            loss_sum = torch.zeros((), dtype=torch.float64)
            for row in micro:
                row_loss = row_loss_sum(model, row, device, sp, liger, pad_id)
                # FSDP averages gradients over ranks: scale by world so the result is sum / global label tokens.
                (row_loss * world / max(label_tokens, 1)).backward()
                loss_sum += row_loss.detach().double().cpu()
            dist.all_reduce(loss_sum)
            trained_packs: list[list[int]] = [[] for _ in range(world)]
            mine = [p for r in micro if not r.is_dummy for p in r.pack_ids] if leads_sp_group else []
            dist.all_gather_object(trained_packs, mine)
            loss = float(loss_sum) / max(label_tokens, 1)
            if not math.isfinite(loss):
                packs = [r.pack_ids for r in micro]
                raise PipelineError(
                    f"non-finite loss {loss} at step {step + 1} (rank {rank} packs {packs}); "
                    "stopping, the last good checkpoint is kept"
                )
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state.packs_done += min(global_batch, len(remaining) - s * global_batch)
            seconds = time.perf_counter() - started
            history.append(
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "tokens": tokens,
                    "label_tokens": label_tokens,
                    "epoch": state.epoch,
                    "packs": sorted(p for ps in trained_packs for p in ps),
                    "seconds": seconds,
                    "lm_flops": lm_flops,
                    "vision_flops": vis_flops,
                }
            )
            reporters.log(
                {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/tokens_per_s": tokens / seconds,
                    "train/label_tokens": label_tokens,
                },
                step,
            )
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            log(f"step {step}/{total_steps} loss {loss:.6f} lr {lr:.3e} tokens/s {tokens / seconds:.0f}")
            if step % args.save_steps == 0 or step == total_steps:
                trainer_state = {"loader": vars(state), "history": history, "fingerprint": fingerprint}
                checkpoint.save(run_dir, step, model, optimizer, scheduler, trainer_state, args.save_total_limit)
                if rank == 0:
                    write_outputs(root, history, summarize(history, peak, device))
        if state.packs_done >= len(pack_ids):
            state = LoaderState(state.epoch + 1, 0)
    if rank == 0 and history:  # also when a resumed run was already complete: DVC removed the old metrics
        write_outputs(root, history, summarize(history, peak, device))
    progress.close()
    reporters.close()
    checkpoint.export_hf(model, fam.transformers_class(fam.model_class), model.config, processor, run_dir / "hf")
    log(f"exported {run_dir / 'hf'}")
    dist.destroy_process_group()


def summarize(history: list[dict], peak: float | None, device: torch.device) -> dict:
    seconds = sum(h["seconds"] for h in history) or 1e-9
    lm = sum(h["lm_flops"] for h in history)
    vis = sum(h["vision_flops"] for h in history)
    world = dist.get_world_size()
    return {
        "final_loss": history[-1]["loss"],
        "steps": history[-1]["step"],
        "tokens_per_s": sum(h["tokens"] for h in history) / seconds,
        "label_tokens_per_s": sum(h["label_tokens"] for h in history) / seconds,
        "mfu": lm / (seconds * peak * world) if peak else None,
        "mfu_with_vision": (lm + vis) / (seconds * peak * world) if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description="one rank of `qvl train` (start it through torchrun)")
    ap.add_argument("--params", default="params.yaml")
    try:
        train(ap.parse_args().params)
    except PipelineError as exc:
        print(f"qvl train (rank {os.environ.get('RANK', '?')}): error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
