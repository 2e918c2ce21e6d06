"""Training throughput on CPU (issue 5): packed padding-free rows vs one-sample-per-row padded batches, and the
row builder's throughput against the trainer's consumption. One process, the tiny Qwen2.5-VL model, fp32.

Usage: python benchmarks/train_cpu.py [--steps 6]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from stages.demo import write_demo  # noqa: E402
from stages.families import family  # noqa: E402
from stages.tiny_model import make_tiny_model  # noqa: E402
from tests.conftest import pipeline_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    from transformers import AutoProcessor

    from stages.decode import run as decode
    from stages.pack import run as pack
    from stages.tokenize import run as tokenize
    from stages.tokenize.vision import VisionArgs
    from stages.train.data import RowBuilder
    from stages.train.forward import row_loss_sum
    from stages.validate import run as validate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo(root / "data/demo")
        model_dir = make_tiny_model("qwen2_5_vl", root / "model")
        params = pipeline_params(model_dir, "qwen2_5_vl")
        for stage in (validate, decode, tokenize, pack):
            stage(params, root)
        fam = family("qwen2_5_vl")
        cls = fam.transformers_class(fam.model_class)
        model = cls.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(model_dir)
        builder = RowBuilder(
            root, processor, VisionArgs.for_processor(processor, params.dataset_config), cls, model.config
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        packs = sorted(builder.packs)

        start = time.perf_counter()
        rows = [builder.build([p]) for p in packs]
        build_s = time.perf_counter() - start
        print(
            f"row builder: {len(rows) / build_s:.1f} packed rows/s ({sum(r.tokens for r in rows) / build_s:,.0f} "
            "tokens/s) in one process"
        )

        def packed_step(row) -> int:
            loss = row_loss_sum(model, row, torch.device("cpu")) / max(row.label_tokens, 1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return row.tokens

        samples = {s["sample_id"]: s for s in pq.read_table(root / "data/validated/samples.parquet").to_pylist()}
        vision = VisionArgs.for_processor(processor, params.dataset_config)

        def padded_step(sample_ids: list[str]) -> int:
            """The baseline users start from: the processor's padded batch of the same samples, full logits."""
            tok = [builder.samples[s] for s in sample_ids]
            texts = [
                processor.apply_chat_template(json.loads(samples[s]["messages"]), tokenize=False) for s in sample_ids
            ]
            images = [Image.open(root / p).convert("RGB") for t in tok for p in t["image_paths"]]
            videos = [builder.frames.get(k) for t in tok for k in t["video_keys"]]
            kwargs = {}
            if images:
                kwargs["images_kwargs"] = vision.images_kwargs()
            if videos:
                kwargs["videos_kwargs"] = vision.videos_kwargs(videos)
            batch = processor(
                text=texts,
                images=images or None,
                videos=[v.frames for v in videos] or None,
                padding=True,
                return_tensors="pt",
                **kwargs,
            )
            labels = torch.full_like(batch["input_ids"], -100)
            for i, t in enumerate(tok):
                labels[i, : len(t["labels"])] = torch.tensor(t["labels"])  # right padding: ids line up
            out = model(**batch, use_cache=False)
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return int(batch["attention_mask"].sum())

        packed_step(rows[0])  # warm-up
        start, tokens = time.perf_counter(), 0
        for i in range(args.steps):
            tokens += packed_step(rows[i % len(rows)])
        packed_s = time.perf_counter() - start
        start, padded_tokens = time.perf_counter(), 0
        for i in range(args.steps):
            padded_tokens += padded_step(builder.packs[packs[i % len(packs)]])
        padded_s = time.perf_counter() - start
        print(f"packed rows:  {args.steps / packed_s:.2f} steps/s, {tokens / packed_s:,.0f} real tokens/s")
        print(
            f"padded batch: {args.steps / padded_s:.2f} steps/s, {padded_tokens / padded_s:,.0f} real tokens/s "
            "(the same samples per step, padded to the longest, full-vocabulary logits)"
        )
        print(f"trainer consumption: {args.steps / packed_s:.2f} rows/s vs builder {len(rows) / build_s:.1f} rows/s")
        shutil.rmtree(root / "data")


if __name__ == "__main__":
    main()
