"""The measuring core of the training benchmarks (benchmarks/train_gpu.py, benchmarks/train_cpu.py).

One configuration per process: the parent (benchmarks/train_runner.py) starts the benchmark script again with
``--config NAME --out FILE.json`` for each configuration and collects the JSON, so no kernel patch, registered
attention or allocator state of one configuration reaches another. Every child trains the same samples (one
pack's samples per optimizer step) from the same checkpoint, set up in the trainer's order
(stages/train/worker.py): ``init_distributed``, the attention ``choose_attention`` picks, ``build_model`` on the
meta device, ``apply_liger``, ``wrap_fsdp2`` (bf16 mixed precision on CUDA), ``materialize`` (weights loaded
from rank 0), the trainer's AdamW (``build_optimizer``) and gradient clipping.

Configurations (`CONFIGS`):
- full path: the packed row through ``row_loss_sum`` (``qvl_packed`` varlen attention, logits only at label
  positions), the Liger kernel set from ``apply_liger`` (Liger on CUDA, its torch stand-ins on CPU);
- full path without Liger;
- baseline, what a user runs with the Hugging Face Trainer: the same samples sorted by length (as
  ``group_by_length`` does) and cut into micro-batches of at most ``--budget`` padded tokens, right-padded, sdpa,
  full-vocabulary logits and the model's own loss (``labels`` + ``num_items_in_batch``, the Trainer's gradient
  accumulation), no Liger;
- SP=2: the full path with Ulysses sequence parallelism on two GPUs (started through torchrun; skipped with
  fewer GPUs).

Counting: only real tokens, the samples' own ``input_ids``: not the padding of the baseline, not the label-free
image/video filler segments the row builder appends to rows without images or videos (``RowBuilder._dummy``), not
the SP padding. FLOPs are counted from the real samples too, identically for every configuration.

Out of memory is a result: a step that raises ``torch.OutOfMemoryError`` is reported as ``{"oom": true, "at":
tokens}`` and the child goes on (FSDP2's ``reset_iter_state`` recovers the model). ``--mem-cap-tokens`` makes a
forward pre-hook on the language model raise that same error above a token count, so the OOM path runs on CPU.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.train_batches import label_positions, micro_batches, padded_batch, real_lengths, real_patches
from benchmarks.train_workspace import load_workspace_params
from stages.families import family
from stages.train.data import Row, RowBuilder
from stages.train.distributed import init_distributed
from stages.train.forward import row_loss_sum
from stages.train.liger import apply_liger
from stages.train.loading import materialize
from stages.train.model import build_model, choose_attention, wrap_fsdp2
from stages.train.optim import build_optimizer
from stages.train.telemetry import MFU_CONVENTION, parameter_counts, peak_flops, step_flops


@dataclass(frozen=True)
class Setup:
    packed: bool
    liger: bool
    sp: int
    about: str


CONFIGS = {
    "full_path": Setup(True, True, 1, "packed rows, qvl_packed (varlen) attention, logits at labels only, Liger"),
    "full_path_no_liger": Setup(True, False, 1, "packed rows, qvl_packed (varlen) attention, logits at labels only"),
    "baseline": Setup(
        False, False, 1, "HF-style: length-sorted padded micro-batches of <= budget tokens, sdpa, full logits"
    ),
    "sp2": Setup(True, True, 2, "full path with Ulysses sequence parallelism over 2 GPUs (one row per 2 GPUs)"),
}

CONVENTIONS = {
    "tokens": "real tokens only: the samples' own input_ids; no padding, no label-free image/video filler "
    "segments (stages/train/data.py RowBuilder._dummy), no sequence-parallel padding",
    "step": "one optimizer step = the samples of one pack (packed: one row; baseline: its micro-batches)",
    "tokens_per_s": "real tokens of the measured steps / their wall time (synchronised); warm-up steps excluded",
    "flops": "the trainer's own count (stages/train/telemetry.py step_flops): " + MFU_CONVENTION + "; from the "
    "real samples (lengths, label positions, patches), so the same FLOPs for every configuration (the baseline's "
    "logits at non-label positions are not counted as useful work)",
    "mfu": "flops_lm / (seconds * peak bf16 dense FLOP/s of the device * ranks); null where the peak is unknown (CPU)",
    "mfu_with_vision": "(flops_lm + flops_vision) / (seconds * peak)",
    "peak_mem_gib": "CUDA: torch.cuda.max_memory_allocated, reset after the model, FSDP and optimizer are built "
    "(includes the optimizer state made at the first step); CPU: the process's peak resident set (VmHWM), "
    "reset at the same point",
    "first_step_loss": "mean cross-entropy over the first step's label tokens, before any update",
    "longest_row": "longest micro-batch (tokens through the language model) that trains one full step: sizes double "
    "from --search-start until out of memory or --search-limit, then bisection",
}


class MemoryCap:
    """Raises torch.OutOfMemoryError, as the CUDA caching allocator does, when more than ``cap`` tokens enter the
    language model: a forward pre-hook, so the error comes mid-step like a real one (CPU tests of the OOM path)."""

    def __init__(self, text_model: torch.nn.Module, cap: int):
        self.cap = cap
        text_model.register_forward_pre_hook(self._check, with_kwargs=True)

    def _check(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        tokens = embeds.shape[0] * embeds.shape[1] if embeds is not None else 0
        if tokens > self.cap:
            raise torch.OutOfMemoryError(f"--mem-cap-tokens {self.cap}: {tokens} tokens (forced out of memory)")
        return args, kwargs


class Trainer:
    """One configuration: the model as the trainer builds it, and its training step."""

    def __init__(self, root: Path, setup: Setup, device: torch.device, mem_cap_tokens: int):
        from transformers import AutoProcessor

        from stages.train.sequence_parallel import build_layout, check_degree, shard_text_model_inputs

        self.setup, self.device = setup, device
        self.params = params = load_workspace_params(root)
        self.fam = fam = family(params.dataset_config.processor_config.processor_type)
        self.world = dist.get_world_size()
        args = params.trainer_args
        attention, _ = choose_attention("auto" if setup.packed else "sdpa", device, setup.sp, args.bf16)
        self.attention = attention
        self.model = build_model(params, fam, attention)  # meta device: weights come after sharding
        check_degree(setup.sp, self.world, self.model.config.text_config)
        self.sp = build_layout(setup.sp).sp
        text_model = self.model.get_submodule(fam.text_model_prefix)
        if self.sp is not None:
            shard_text_model_inputs(text_model, self.sp)
        if mem_cap_tokens:
            MemoryCap(text_model, mem_cap_tokens)
        # the kernel set row_loss_sum takes (Liger on CUDA, torch stand-ins elsewhere), or None
        self.kernels, self.liger_note = apply_liger(self.model, fam, device) if setup.liger else (None, "not used")
        self.counts = parameter_counts(self.model, fam.vision_tower_prefix)
        self.takes_seconds = "second_per_grid_ts" in inspect.signature(self.model.forward).parameters
        wrap_fsdp2(self.model, params, fam, mixed_precision=args.bf16 and device.type == "cuda")
        cls = fam.transformers_class(fam.model_class)
        materialize(self.model, cls, params.model_config_.load_from_pretrained_path, device)
        self.optimizer = build_optimizer(self.model, args, fam, device)
        processor = AutoProcessor.from_pretrained(params.dataset_config.processor_config.processor_name)
        self.pad_id = processor.tokenizer.pad_token_id or 0
        self.builder = RowBuilder.for_family(root, processor, params.dataset_config, fam, self.model.config)
        self.size = 0  # tokens of the micro-batch in flight (the "at" of an OOM)

    def batches(self, sample_ids: list[str], budget: int) -> list:
        """What one step trains on: the packed row, or the baseline's padded micro-batches."""
        if self.setup.packed:
            row = self.builder.build_samples(sample_ids)
            lengths = real_lengths(self.builder, sample_ids)
            if row.seq_lengths()[: len(lengths)] != lengths:
                raise AssertionError("the packed row's segments are not the samples (token counting would be off)")
            return [row]
        return [
            padded_batch(self.builder, ids, self.pad_id, self.takes_seconds)
            for ids in micro_batches(self.builder, sample_ids, budget)
        ]

    def step(self, batches: list) -> float:
        """One optimizer step; the mean loss over the step's label tokens."""
        label_tokens = sum(b.label_tokens for b in batches)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in batches:
            self.size = b.tokens
            if isinstance(b, Row):
                loss_sum = row_loss_sum(self.model, b, self.device, self.sp, self.kernels, self.pad_id)
                # FSDP averages gradients over ranks: scale by world, as the worker does.
                (loss_sum * self.world / max(label_tokens, 1)).backward()
                total += loss_sum.detach().double()
            else:
                inputs = {k: v.to(self.device) for k, v in b.inputs.items()}
                loss = self.model(**inputs, use_cache=False, num_items_in_batch=label_tokens).loss
                loss.backward()
                total += loss.detach().double() * label_tokens
        if self.world > 1:
            dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.params.trainer_args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total) / max(label_tokens, 1)

    def recover(self) -> None:
        """After an out-of-memory error (call outside the except block, so its frames are gone)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.reset_iter_state()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def try_step(self, batches: list) -> float | None:
        """The step's loss, or None when it ran out of memory (the model is recovered)."""
        try:
            return self.step(batches)
        except torch.OutOfMemoryError as exc:
            print(f"out of memory at {self.size} tokens: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        self.recover()
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def measure(tr: Trainer, steps: list[list[str]], warmup: int, budget: int, peak: float | None) -> dict:
    """tokens/s, FLOPs, MFU both ways, peak memory and the first step's loss, or ``{"oom": true, "at": n}``."""
    batches = [tr.batches(ids, budget) for ids in steps]  # built before timing (the loader runs ahead in training)
    reset_peak(tr.device)
    losses, started = [], 0.0
    for i, step_batches in enumerate(batches):
        if i == warmup:
            sync(tr.device)
            started = time.perf_counter()
        loss = tr.try_step(step_batches)
        if loss is None:
            return {"oom": True, "at": tr.size}
        losses.append(loss)
    sync(tr.device)
    seconds = time.perf_counter() - started
    peak = peak * tr.world if peak else None  # the ranks of an SP group share one row
    text = tr.model.config.text_config
    tokens = lm = vis = 0
    for ids in steps[warmup:]:
        lengths = real_lengths(tr.builder, ids)
        a, b = step_flops(tr.counts, text, lengths, label_positions(tr.builder, ids), real_patches(tr.builder, ids))
        tokens, lm, vis = tokens + sum(lengths), lm + a, vis + b
    return {
        "oom": False,
        "steps": len(steps) - warmup,
        "warmup_steps": warmup,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "flops_lm_per_s": lm / seconds,
        "flops_with_vision_per_s": (lm + vis) / seconds,
        "mfu": lm / seconds / peak if peak else None,
        "mfu_with_vision": (lm + vis) / seconds / peak if peak else None,
        "peak_mem_gib": peak_gib(tr.device),
        "first_step_loss": losses[0],
        "losses": losses,
        "micro_batches_per_step": sum(len(b) for b in batches[warmup:]) / len(batches[warmup:]),
        "tokens_through_model_per_step": sum(x.tokens for b in batches[warmup:] for x in b) / len(batches[warmup:]),
    }


def probe_batch(tr: Trainer, pool: list[str], size: int) -> list:
    """One micro-batch of about ``size`` tokens from the pool (samples repeat when the pool is short)."""
    lengths = [len(tr.builder.samples[s]["input_ids"]) for s in pool]
    if tr.setup.packed:
        ids, total, i = [], 0, 0
        while not ids or total + lengths[i % len(pool)] <= size:
            ids.append(pool[i % len(pool)])
            total, i = total + lengths[i % len(pool)], i + 1
        return [tr.builder.build_samples(ids)]
    longest = max(lengths)
    count = max(1, size // longest)
    ordered = sorted(pool, key=lambda s: -len(tr.builder.samples[s]["input_ids"]))
    return [padded_batch(tr.builder, [ordered[i % len(ordered)] for i in range(count)], tr.pad_id, tr.takes_seconds)]


def longest_row(tr: Trainer, pool: list[str], start: int, limit: int, bisections: int, deadline: float) -> dict:
    """Doubling from ``start`` until a step runs out of memory (or ``limit``), then bisection."""
    probes: list[dict] = []

    def fits(size: int) -> bool:
        batch = probe_batch(tr, pool, size)
        ok = tr.try_step(batch) is not None
        probes.append({"size": size, "tokens": batch[0].tokens, "oom": not ok})
        return ok

    def out_of_time() -> bool:
        return bool(deadline) and time.monotonic() > deadline

    ok, fail, size = 0, None, start
    while size <= limit and not out_of_time():
        if not fits(size):
            fail = size
            break
        ok, size = size, size * 2
    while fail is not None and ok == 0 and size > 64 and not out_of_time():  # even the start did not fit
        size //= 2
        ok, fail = (size, fail) if fits(size) else (0, size)
    for _ in range(bisections):
        if fail is None or fail - ok <= 1 or out_of_time():
            break
        mid = (ok + fail) // 2
        ok, fail = (mid, fail) if fits(mid) else (ok, mid)
    trained = [p["tokens"] for p in probes if not p["oom"]]
    return {
        "tokens": max(trained) if trained else 0,
        "oom_at": min((p["tokens"] for p in probes if p["oom"]), default=None),
        "limit": limit,
        "stopped_by_deadline": out_of_time(),
        "probes": probes,
    }


def child_main(args: argparse.Namespace) -> None:
    """Measure one configuration and write its JSON (rank 0)."""
    started = time.monotonic()
    setup = CONFIGS[args.config]
    device = init_distributed().device  # torchrun's environment (run_configs sets it for one process)
    torch.manual_seed(0)
    root = Path(args.workspace)
    tr = Trainer(root, setup, device, args.mem_cap_tokens)
    packing = tr.params.dataset_config.packing_length
    pack_ids = sorted(tr.builder.packs)
    need = args.warmup + args.steps
    if len(pack_ids) < need:
        raise SystemExit(f"only {len(pack_ids)} packs for {need} steps: the workspace needs more samples")
    steps = [tr.builder.packs[p] for p in pack_ids[:need]]
    budget = args.budget or packing
    result = {
        "config": args.config,
        "about": setup.about,
        "attention": tr.attention,
        "liger": tr.kernels is not None,
        "liger_note": tr.liger_note,
        "world_size": tr.world,
        "budget_tokens": None if setup.packed else budget,
        **measure(tr, steps, args.warmup, budget, peak_flops(device)),
    }
    pool = [s for ids in steps for s in ids]
    deadline = started + args.child_deadline_s if args.child_deadline_s else 0.0
    result["longest_row"] = longest_row(
        tr, pool, args.search_start or packing // 4, args.search_limit or 8 * packing, args.bisections, deadline
    )
    result["seconds_total"] = time.monotonic() - started
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
