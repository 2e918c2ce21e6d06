"""GPU training benchmark (issue 6): this project's path against the baseline users start from, one run.

(a) full path: first-fit-decreasing packed rows of --packing-length tokens, padding-free ``qvl_packed`` attention
    (varlen kernel), Liger kernels (fused linear cross-entropy, RMSNorm, RoPE), logits only at label positions;
(b) baseline: the same samples, one per row, padded to the longest in the step, sdpa, full logits, no Liger.
Both: a randomly initialised model with a released architecture (stages/released_configs.py), FSDP2 on one rank,
bf16 compute with fp32 master weights, gradient checkpointing, this project's AdamW groups. Data: image+text and
text-only chat samples made like the demo's, run through the real validate -> tokenize -> pack stages.

Prints and writes (--out) tokens/s, MFU (language model only, the lmms-engine convention; and with the vision
tower), peak memory, and the longest packed row that trains on the card with and without Liger.

    python benchmarks/train_gpu.py                          # one H100/H200: Qwen2.5-VL-3B architecture
    python benchmarks/train_gpu.py --model qwen3_vl_4b      # Qwen3-VL-4B architecture (H200: more memory)
    python benchmarks/train_gpu.py --smoke                  # any machine: tiny model, tiny rows (script check)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from schemas.params import parse_params  # noqa: E402
from stages.families import family  # noqa: E402
from stages.released_configs import RELEASED, released_config  # noqa: E402
from stages.tiny_model import build_config, build_processor  # noqa: E402
from stages.train import free_port  # noqa: E402
from stages.train.attention import ATTENTION_NAME, kernel_name  # noqa: E402
from stages.train.data import IGNORE, RowBuilder  # noqa: E402
from stages.train.forward import row_loss_sum  # noqa: E402
from stages.train.liger import apply_liger  # noqa: E402
from stages.train.model import wrap_fsdp2  # noqa: E402
from stages.train.optim import build_optimizer  # noqa: E402
from stages.train.telemetry import parameter_counts, peak_flops, step_flops  # noqa: E402

WORDS = "the a image shows person car tree house road sky blue red green small large left right near far"


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


def prepare(root: Path, processor_dir: Path, processor_type: str, packing_length: int, samples: int):
    """The real validate -> tokenize -> pack stages over the synthetic dataset."""
    from stages.pack import run as pack
    from stages.tokenize import run as tokenize
    from stages.validate import run as validate

    write_dataset(root / "data/bench", samples, seed=0)
    params = parse_params(
        {
            "dataset_config": {
                "datasets": [{"path": "data/bench/chat.jsonl", "data_folder": "data/bench", "data_type": "jsonl"}],
                "processor_config": {"processor_name": str(processor_dir), "processor_type": processor_type},
                "packing_length": packing_length,
                "packing_strategy": "first_fit_decreasing",
            },
            "trainer_args": {"bf16": True, "gradient_checkpointing": True, "learning_rate": 1e-5},
            "validate": {"media_cache": ".cache/media.duckdb"},
        }
    )
    for stage in (validate, tokenize, pack):
        stage(params, root)
    return params


class Bench:
    """One model configuration on one rank: build, wrap, step, measure."""

    def __init__(self, params, fam, config, device, packed: bool, liger: bool):
        self.device, self.packed = device, packed
        cls = fam.transformers_class(fam.model_class)
        attention = {"text_config": ATTENTION_NAME, "vision_config": "sdpa"} if packed else "sdpa"
        torch.manual_seed(0)
        with device:
            self.model = cls._from_config(config, attn_implementation=attention, dtype=torch.float32)
        self.model.config.use_cache = False
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.liger = apply_liger(self.model, fam, device)[0] if liger else False
        self.lm_params, self.vision_params = parameter_counts(self.model, fam.vision_tower_prefix)
        wrap_fsdp2(self.model, params, fam, mixed_precision=device.type == "cuda")
        self.optimizer = build_optimizer(self.model, params.trainer_args, fam)

    def packed_step(self, row) -> None:
        loss = row_loss_sum(self.model, row, self.device, None, self.liger) / max(row.label_tokens, 1)
        loss.backward()
        self._finish()

    def padded_step(self, rows) -> None:
        """One sample per row, right-padded to the longest; the model's own positions and full logits."""
        longest = max(r.tokens for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : r.tokens], labels[i, : r.tokens], mask[i, : r.tokens] = r.input_ids[0], r.targets[0], 1
        vision = {}
        for key in ("pixel_values", "image_grid_thw"):
            if parts := [r.vision[key] for r in rows if key in r.vision]:
                vision[key] = torch.cat(parts).to(self.device)
        image_token = self.model.config.image_token_id
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            mm_token_type_ids=(ids == image_token).int().to(self.device),
            use_cache=False,
            **vision,
        )
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten().to(self.device), ignore_index=IGNORE)
        loss.backward()
        self._finish()

    def _finish(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.model, self.optimizer
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(bench: Bench, steps: list, config, peak: float | None, warmup: int) -> dict:
    """tokens/s over real (non-padding) tokens, MFU both ways, peak memory; the same samples for both paths."""
    run = bench.packed_step if bench.packed else bench.padded_step
    for batch in steps[:warmup]:
        run(batch)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    sync(bench.device)
    started, tokens, lm, vis = time.perf_counter(), 0, 0.0, 0.0
    for batch in steps[warmup:]:
        run(batch)
        rows = [batch] if bench.packed else batch
        seqs = [n for r in rows for n in r.seq_lengths()]
        patches = sum(int(r.vision["image_grid_thw"].prod(-1).sum()) for r in rows if "image_grid_thw" in r.vision)
        a, b = step_flops(bench.lm_params, bench.vision_params, config.text_config, seqs, patches)
        tokens, lm, vis = tokens + sum(seqs), lm + a, vis + b
    sync(bench.device)
    seconds = time.perf_counter() - started
    return {
        "steps": len(steps) - warmup,
        "tokens_per_s": tokens / seconds,
        "mfu": lm / seconds / peak if peak else None,
        "mfu_with_vision": (lm + vis) / seconds / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.device.type == "cuda" else None,
    }


def longest_row(bench: Bench, builder: RowBuilder, pack_ids: list[int], max_packs: int) -> int:
    """The longest row (whole packs concatenated, doubling) that completes a training step."""
    best, n = 0, 1
    while n <= min(max_packs, len(pack_ids)):
        row = builder.build(pack_ids[:n])
        try:
            bench.packed_step(row)
            sync(bench.device)
            best = row.tokens
        except torch.OutOfMemoryError:
            bench.optimizer.zero_grad(set_to_none=True)
            break
        finally:
            gc.collect()
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
        n *= 2
    return best


def one_sample_rows(builder: RowBuilder, pack: int) -> list:
    """The pack's samples as one-sample rows (the baseline's batch), without the FSDP dummy segments."""
    rows = []
    for sample_id in builder.packs[pack]:
        row = builder.build_samples([sample_id], [pack])
        real = row.seq_lengths()[0]
        images = bool(builder.samples[sample_id]["image_paths"])
        rows.append(
            dataclasses.replace(
                row,
                input_ids=row.input_ids[:, :real],
                targets=row.targets[:, :real],
                position_ids=row.position_ids[:, :, :real],
                vision={k: row.vision[k] for k in ("pixel_values", "image_grid_thw")} if images else {},
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(RELEASED), default="qwen2_5_vl_3b")
    ap.add_argument("--packing-length", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=8, help="measured steps per path (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-row-packs", type=int, default=16, help="longest-row search: up to this many packs")
    ap.add_argument("--smoke", action="store_true", help="tiny model and rows on any device (checks the script)")
    ap.add_argument("--out", default="benchmarks/train_gpu.json")
    args = ap.parse_args()
    if args.smoke:
        args.packing_length, args.steps, args.warmup, args.max_row_packs = 2048, 2, 1, 2
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    arch = RELEASED[args.model]
    fam = family(arch.processor_type)
    config = build_config(fam) if args.smoke else released_config(args.model)
    samples = (args.warmup + args.steps + 2 * args.max_row_packs) * args.packing_length // 700

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        processor = build_processor(fam)
        processor.save_pretrained(root / "processor")
        params = prepare(root, root / "processor", fam.processor_type, args.packing_length, samples)
        from stages.tokenize.vision import VisionArgs

        with torch.device("meta"):
            meta_model = fam.transformers_class(fam.model_class)._from_config(config)
        vision = VisionArgs.for_processor(processor, params.dataset_config)
        builder = RowBuilder(root, processor, vision, fam.transformers_class(fam.model_class), meta_model.config)
        pack_ids = sorted(builder.packs)
        need = args.warmup + args.steps
        if len(pack_ids) < need:
            raise SystemExit(f"only {len(pack_ids)} packs for {need} steps: raise the sample count")
        packed_steps = [builder.build([p]) for p in pack_ids[:need]]
        padded_steps = [one_sample_rows(builder, p) for p in pack_ids[:need]]
        peak = peak_flops(device)
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"),
            "model": args.model if not args.smoke else f"tiny {fam.processor_type}",
            "packing_length": args.packing_length,
            "attention_kernel": kernel_name(device),
            "torch": torch.__version__,
        }
        for name, packed, liger, steps in (
            ("full_path", True, True, packed_steps),
            ("baseline", False, False, padded_steps),
        ):
            bench = Bench(params, fam, config, device, packed, liger)
            result[name] = {**measure(bench, steps, config, peak, args.warmup), "liger": bench.liger}
            if packed:
                result["longest_row_with_liger"] = longest_row(bench, builder, pack_ids, args.max_row_packs)
            bench.close()
        bench = Bench(params, fam, config, device, packed=True, liger=False)
        result["longest_row_without_liger"] = longest_row(bench, builder, pack_ids, args.max_row_packs)
        bench.close()
        full, base = result["full_path"], result["baseline"]
        result["speedup_tokens_per_s"] = full["tokens_per_s"] / base["tokens_per_s"]
        if full["peak_mem_gib"] and base["peak_mem_gib"]:
            result["peak_memory_ratio"] = full["peak_mem_gib"] / base["peak_mem_gib"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
