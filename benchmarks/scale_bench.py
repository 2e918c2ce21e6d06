"""Dataset scale (issue 21): each stage's peak RSS and time at growing N, so growth with the dataset is visible.

Usage: python benchmarks/scale_bench.py [--samples 20000,200000] [--packs 16] [--memory-limit 1GB] [--keep DIR]
       python benchmarks/scale_bench.py --stage NAME --root DIR   (one stage in this process; prints one JSON line)

N synthetic text-only chats (a question of 5-60 words, an answer of 20-300) go through the real validate ->
tokenize -> pack stages, then the trainer's row builder (stages/train/data.py RowBuilder: its start-up, then the
first --packs packs built in order, twice: cold, then warm), with the tiny Qwen2.5-VL model (offline). Each stage
runs in its own child process; the figures are that process's peak RSS (VmHWM) after its imports and at its end,
the peak of its own worker processes (tokenize's pool; ru_maxrss, which a forked child starts at its parent's
RSS), and the time.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = "the a image shows person car tree house road sky blue red green small large left right near far"
STAGES = ("validate", "tokenize", "pack", "train_rows")
PARAMS = "scale_params.json"


def rss_mb(field: str = "VmRSS") -> float:
    """This process's RSS now (VmRSS) or its peak (VmHWM: unlike ru_maxrss, not inherited across fork + exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1]) / 1024


def peak_mb() -> float:
    return rss_mb("VmHWM")


def workers_peak_mb() -> float:
    """The largest peak RSS of this process's finished children (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def write_chats(path: Path, samples: int, seed: int = 0) -> None:
    rng, words = random.Random(seed), WORDS.split()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(samples):
            question = f"question {i}: " + " ".join(rng.choices(words, k=rng.randint(5, 60)))
            answer = " ".join(rng.choices(words, k=rng.randint(20, 300)))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


def workspace_params(model_dir: Path, memory_limit: str | None = None) -> dict:
    return {
        "dataset_config": {
            "datasets": [{"path": "data/chats.jsonl", "data_folder": "data", "data_type": "jsonl"}],
            "processor_config": {"processor_name": str(model_dir), "processor_type": "qwen2_5_vl"},
            "packing_length": 4096,
            "packing_strategy": "first_fit_decreasing",
        },
        "model_config": {"load_from_pretrained_path": str(model_dir)},
        "validate": {"media_cache": ".cache/media.duckdb", **({"memory_limit": memory_limit} if memory_limit else {})},
    }


def row_builder(params, root: Path, packs: int) -> dict:
    """The trainer's data path on one rank: RowBuilder start-up, then ``packs`` rows."""
    from transformers import AutoConfig, AutoProcessor

    from stages.families import family
    from stages.train.data import RowBuilder

    model_dir = params.model_config_.load_from_pretrained_path
    fam = family(params.dataset_config.processor_config.processor_type)
    processor = AutoProcessor.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    before = rss_mb()
    started = time.perf_counter()
    builder = RowBuilder.for_family(root, processor, params.dataset_config, fam, config)
    startup = time.perf_counter() - started
    after_startup = rss_mb()
    ids = list(builder.packs)[:packs]
    rates = []
    for _ in range(2):  # cold (the mapped pages read in), then warm
        started = time.perf_counter()
        tokens = sum(builder.build([p]).tokens for p in ids)
        seconds = time.perf_counter() - started
        rates.append((len(ids) / seconds, tokens / seconds))
    return {
        "startup_s": round(startup, 3),
        "startup_rss_growth_mb": round(after_startup - before, 1),
        "rows_per_s_cold": round(rates[0][0], 1),
        "rows_per_s": round(rates[1][0], 1),
        "tokens_per_s": round(rates[1][1]),
    }


def child(stage: str, root: Path, packs: int) -> None:
    """Run one stage in this process and print its figures as one JSON line."""
    from schemas.params import parse_params

    params = parse_params(json.loads((root / PARAMS).read_text()))
    if stage == "train_rows":
        import torch  # noqa: F401  (imports are not the stage's memory)
        import transformers.models.qwen2_5_vl  # noqa: F401

        run = None
    else:
        run = __import__(f"stages.{stage}", fromlist=["run"]).run
    base = peak_mb()
    started = time.perf_counter()
    extra = row_builder(params, root, packs) if run is None else {}
    if run is not None:
        run(params, root)
    figures = {
        "stage": stage,
        "seconds": round(time.perf_counter() - started, 2),
        "rss_after_imports_mb": round(base),
        "peak_rss_mb": round(peak_mb()),
        # at the end: anonymous memory (the process's own) and mapped file pages (page cache, shared by processes
        # mapping the same file and reclaimable; mmap faults read ahead, so this grows with how spread the rows are)
        "rss_anon_end_mb": round(rss_mb("RssAnon")),
        "rss_file_end_mb": round(rss_mb("RssFile")),
        "workers_peak_rss_mb": round(workers_peak_mb()),
        **extra,
    }
    print(json.dumps(figures), flush=True)


def measure(root: Path, samples: int, model_dir: Path, packs: int, memory_limit: str | None) -> list[dict]:
    write_chats(root / "data/chats.jsonl", samples)
    (root / PARAMS).write_text(json.dumps(workspace_params(model_dir, memory_limit)))
    results = []
    for stage in STAGES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--root", str(root)]
        out = subprocess.run(cmd + ["--packs", str(packs)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{stage} failed at N={samples}:\n{out.stderr[-3000:]}")
        figures = {"samples": samples, **json.loads(out.stdout.strip().splitlines()[-1])}
        print(json.dumps(figures), flush=True)
        results.append(figures)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="20000,200000")
    ap.add_argument("--packs", type=int, default=128)
    ap.add_argument("--memory-limit", help="validate.memory_limit (default: the stage's own)")
    ap.add_argument("--keep", type=Path, help="build the workspaces under this folder and keep them")
    ap.add_argument("--stage", choices=STAGES)
    ap.add_argument("--root", type=Path)
    args = ap.parse_args()
    if args.stage:
        child(args.stage, args.root, args.packs)
        return
    from stages.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        model_dir = make_tiny_model("qwen2_5_vl", base / "model")
        for n in (int(x) for x in args.samples.split(",")):
            root = base / f"n{n}"
            root.mkdir(parents=True, exist_ok=True)
            measure(root, n, model_dir.resolve(), args.packs, args.memory_limit)


if __name__ == "__main__":
    main()
