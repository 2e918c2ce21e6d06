"""The training loop, one process per rank (started by torchrun; see stages/train/__init__.py).

Read top to bottom: set up -> model (built on the meta device, sharded, then loaded) -> optimizer -> data ->
resume -> for each step: micro-batches, loss over the global batch's label tokens, backward (gradients reduced
once, after the last micro-batch), clip, step, one host read -> eval loss when due -> checkpoints -> Hugging Face
export.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from schemas.errors import PipelineError
from schemas.params import load_params
from stages.families import family
from stages.fast_exit import exit_now
from stages.train import checkpoint
from stages.train.balance import pack_costs, straggler_ratio
from stages.train.data import LoaderState, PrefetchLoader, RowBuilder, epoch_order, micro_batches, step_assignment
from stages.train.distributed import init_distributed
from stages.train.evaluation import eval_due, eval_loss, eval_plan
from stages.train.forward import row_losses
from stages.train.liger import apply_liger
from stages.train.loading import materialize
from stages.train.model import build_model, choose_attention, freeze, trainable_summary, wrap_fsdp2
from stages.train.optim import build_optimizer, build_scheduler
from stages.train.reporters import Reporters
from stages.train.router import balance_weight
from stages.train.samples import EVAL_PACKS, PACKS
from stages.train.sequence_parallel import build_layout, check_degree, shard_text_model_inputs
from stages.train.telemetry import parameter_counts, peak_flops, speed, step_flops, summarize, write_outputs


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def train(params_path: str) -> None:
    params = load_params(params_path)
    args, cfg = params.trainer_args, params.dataset_config
    root = Path.cwd()
    fam = family(cfg.processor_config.processor_type)
    env = init_distributed()
    device, rank, world = env.device, env.rank, env.world
    seed_everything(args.seed + rank)

    # Model on the meta device, sequence-parallel layout, kernels, freezing, sharding; then the weights
    requested = params.model_config_.attn_implementation
    attention, why = choose_attention(requested, device, args.sp_ulysses_degree, args.bf16)
    model = build_model(params, fam, attention)
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
    counts = parameter_counts(model, fam.vision_tower_prefix)
    text_config = model.config.get_text_config()
    router_weight = balance_weight(fam.moe, params.model_config_.router_aux_loss_coef, text_config)
    if fam.moe:
        log(
            f"mixture of experts: {text_config.num_experts} experts, {text_config.num_experts_per_tok} per token; "
            f"router load-balancing loss weight {router_weight:g}"
        )
    wrap_fsdp2(model, params, fam, mixed_precision=args.bf16 and device.type == "cuda")
    started = time.perf_counter()
    materialize(model, fam.transformers_class(fam.model_class), params.model_config_.load_from_pretrained_path, device)
    log(f"loaded {params.model_config_.load_from_pretrained_path} in {time.perf_counter() - started:.1f} s")

    # Data and schedule
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(cfg.processor_config.processor_name)
    builder = RowBuilder.for_family(root, processor, cfg, fam, model.config)
    pack_ids = sorted(builder.packs)
    if args.eval_strategy != "no":  # preflight checked that eval packs exist
        eval_builder = builder.for_packs(root / EVAL_PACKS)
        eval_rows = eval_plan(sorted(eval_builder.packs), layout.dp_size, layout.dp_rank)
    cost = pack_costs(root / PACKS, counts, model.config.text_config)  # estimated FLOPs of each pack
    balance = cost if args.balance_packs else None
    pad_id = processor.tokenizer.pad_token_id or 0  # SP padding: a label-free segment of its own, any id works
    global_batch = layout.dp_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(pack_ids) / global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    optimizer = build_optimizer(model, args, fam, device)
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

    targets = [t for t in args.report_to if t != "none"] if rank == 0 else []
    reporters = Reporters(targets, root / "logs" / args.run_name, args.run_name, params.to_yaml_dict())
    peak = peak_flops(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak_mem_gb is training's, not loading's
    seconds: dict[int, float] = {}  # step -> wall time, of the steps this process ran (never saved: not an input)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=rank != 0 or None)
    while step < total_steps:
        remaining = epoch_order(pack_ids, state.epoch, cfg.seed)[state.packs_done :]
        steps_left = math.ceil(len(remaining) / global_batch)
        layout_of = partial(
            step_assignment,
            remaining,
            world=layout.dp_size,
            per_device=args.per_device_train_batch_size,
            accumulation=args.gradient_accumulation_steps,
        )
        assignments = [layout_of(s, cost=balance) for s in range(steps_left)]  # what every rank trains, per step
        plan = [mb for a in assignments for mb in micro_batches(a[layout.dp_rank], remaining)]
        # The DataLoader draws its workers' base seed from the global RNG when iterated: forked, so a resumed run
        # saves the same RNG state in its checkpoints as an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            rows = iter(PrefetchLoader(builder, plan, args.dataloader_num_workers, pin=device.type == "cuda"))
        for s in range(steps_left):
            if step >= total_steps:
                break
            started = time.perf_counter()
            micro = [next(rows) for _ in range(args.gradient_accumulation_steps)]
            # Counters live on the training device (NCCL takes no CPU tensor); the host reads them once per step.
            totals = step_counters(micro, counts, model.config.text_config, device) * float(leads_sp_group)
            dist.all_reduce(totals)
            label_tokens, real_rows = totals[0].clamp(min=1), totals[4].clamp(min=1)
            sums = torch.zeros(2, dtype=torch.float64, device=device)  # cross-entropy, balance loss
            for i, row in enumerate(micro):
                model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once, after the last
                parts = row_losses(model, row, device, sp, liger, pad_id, router=router_weight > 0)
                # FSDP averages gradients over ranks: scale by world so the result is sum / global label tokens.
                objective = parts.cross_entropy * (world / label_tokens)
                if parts.router_balance is not None:  # MoE: + weight x the mean balance loss of the step's rows
                    counted = not row.is_dummy  # (every rank of an SP group holds the row's whole balance loss)
                    share = router_weight * world / (real_rows * layout.sp_size) if counted else 0.0
                    objective = objective + parts.router_balance * share
                    sums[1] += parts.router_balance.detach().double() * float(counted and leads_sp_group)
                objective.backward()
                sums[0] += parts.cross_entropy.detach().double()
            dist.all_reduce(sums)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_total, balance_total, label_count, tokens, lm_flops, vis_flops, row_count = torch.cat(
                [sums, totals]
            ).tolist()
            router_balance = balance_total / max(row_count, 1)
            loss = loss_total / max(label_count, 1) + router_weight * router_balance
            if not math.isfinite(loss):
                packs = [r.pack_ids for r in micro]
                raise PipelineError(
                    f"non-finite loss {loss} at step {step + 1} (rank {rank} packs {packs}); "
                    "stopping, the last good checkpoint is kept"
                )
            step += 1
            batch = remaining[s * global_batch : (s + 1) * global_batch]  # every rank's packs of this step
            state.packs_done += len(batch)
            seconds[step] = time.perf_counter() - started
            history.append(
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "tokens": int(tokens),
                    "label_tokens": int(label_count),
                    "epoch": state.epoch,
                    "packs": sorted(batch),
                    "lm_flops": lm_flops,
                    "vision_flops": vis_flops,
                    "straggler": straggler_ratio(assignments[s], cost),
                    "straggler_in_order": straggler_ratio(layout_of(s, cost=None), cost),
                    **({"router_balance": router_balance} if router_weight > 0 else {}),
                }
            )
            reporters.log(
                {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/tokens_per_s": tokens / seconds[step],
                    "train/label_tokens": label_count,
                    **({"train/router_balance_loss": router_balance} if router_weight > 0 else {}),
                },
                step,
            )
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds[step]:.0f}")
            log(f"step {step}/{total_steps} loss {loss:.6f} lr {lr:.3e} tokens/s {tokens / seconds[step]:.0f}")
            if eval_due(args, step, total_steps, epoch_done=state.packs_done >= len(pack_ids)):
                held_out, held_out_labels = eval_loss(
                    model,
                    eval_builder,
                    eval_rows,
                    device,
                    sp,
                    liger,
                    pad_id,
                    leads_sp_group,
                    args.dataloader_num_workers,
                )
                history[-1] |= {"eval_loss": held_out, "eval_label_tokens": held_out_labels}
                reporters.log({"eval/loss": held_out}, step)
                progress.set_postfix(loss=f"{loss:.4f}", eval_loss=f"{held_out:.4f}", lr=f"{lr:.2e}")
                log(f"eval at step {step}: loss {held_out:.6f} over {held_out_labels} label tokens")
            if step % args.save_steps == 0 or step == total_steps:
                trainer_state = {"loader": vars(state), "history": history, "fingerprint": fingerprint}
                checkpoint.save(
                    run_dir,
                    step,
                    model,
                    optimizer,
                    scheduler,
                    trainer_state,
                    args.save_total_limit,
                    keep_best=args.load_best_model_at_end,
                )
                if rank == 0:
                    write_outputs(
                        root, history, summarize(history), speed(history, seconds, peak, world, peak_memory_gb(device))
                    )
        if state.packs_done >= len(pack_ids):
            state = LoaderState(state.epoch + 1, 0)
    if rank == 0 and history:  # also when a resumed run was already complete: DVC removed the old metrics
        write_outputs(root, history, summarize(history), speed(history, seconds, peak, world, peak_memory_gb(device)))
    progress.close()
    reporters.close()
    exported = step
    if args.load_best_model_at_end and (best := checkpoint.best_checkpoint(run_dir)):
        checkpoint.load_weights(best, model)
        exported = int(best.name.split("-")[1])
        log(f"load_best_model_at_end: exporting {best.name} (eval loss {checkpoint.eval_loss_of(best):.6f})")
    base = params.model_config_.load_from_pretrained_path
    model_class = fam.transformers_class(fam.model_class)
    checkpoint.export_hf(model, model_class, base, processor, run_dir / "hf", env, exported)
    log(f"exported {run_dir / 'hf'} (the weights of step {exported})")
    dist.destroy_process_group()


def step_counters(micro: list, counts: dict[str, int], text_config, device: torch.device) -> torch.Tensor:
    """(label tokens, tokens, LM FLOPs, vision FLOPs, rows of real packs) of this rank's micro-batches, from
    host-side row metadata."""
    seqs = [n for r in micro for n in r.seq_lengths()]
    patches = sum(int(g.prod(-1).sum()) for r in micro for k, g in r.vision.items() if k.endswith("grid_thw"))
    label_tokens = sum(r.label_tokens for r in micro)
    flops = step_flops(counts, text_config, seqs, label_tokens, patches)
    values = [label_tokens, sum(r.tokens for r in micro), *flops, sum(not r.is_dummy for r in micro)]
    return torch.tensor(values, dtype=torch.float64, device=device)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators: a rerun saves the same RNG state in its checkpoints."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


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
    exit_now(main())  # every output is written and closed by now
