"""Host memory and time to load a checkpoint into the FSDP2-sharded model, per rank: the trainer's path (meta
build, shard, rank 0 reads and broadcasts; stages/train/loading.py) against the previous one (every rank runs
``from_pretrained`` in fp32, then shards).

    python benchmarks/load_memory.py                      # a 1.1 GB random Qwen2.5-VL checkpoint, 2 ranks
    python benchmarks/load_memory.py --size small --out load.json

Each mode runs in its own torchrun job (2 gloo ranks on CPU, or one per GPU where there are GPUs). Peak RSS is
sampled every millisecond from /proc/self/statm while the load runs, after the imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Many layers and a small vocabulary, so no single tensor is a large part of the checkpoint.
SIZES = {
    "small": {"num_hidden_layers": 24, "intermediate_size": 2048},  # about 170 MB in fp32
    "1gb": {"num_hidden_layers": 48, "intermediate_size": 6144},  # about 1.1 GB in fp32
}
LAYER_HEAVY = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
MODES = ("sharded", "legacy")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """This process's resident memory before the block and its peak during it (sampled every millisecond)."""

    def __enter__(self) -> PeakRss:
        self.before, self.peak, self._running = rss_bytes(), 0, True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def make_checkpoint(size: str, cache: Path) -> Path:
    from stages.tiny_model import make_tiny_model

    path = cache / f"layer-heavy-{size}"
    if not (path / "config.json").exists():
        make_tiny_model("qwen2_5_vl", path, text_overrides={**LAYER_HEAVY, **SIZES[size]})
    return path


def shard(model, fam) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ in (fam.decoder_layer_class, fam.vision_block_class):
            fully_shard(module)
    fully_shard(model)


def worker(mode: str, model_dir: str, out: str) -> None:
    """One rank: load ``model_dir`` the ``mode`` way and write its memory and time."""
    import torch
    import torch.distributed as dist

    from stages.families import family
    from stages.train.distributed import init_distributed
    from stages.train.loading import build_on_meta, materialize

    env = init_distributed()
    fam = family("qwen2_5_vl")
    cls = fam.transformers_class(fam.model_class)
    build_on_meta(cls, model_dir, "sdpa")  # the imports, before measuring
    with PeakRss() as rss:
        started = time.perf_counter()
        if mode == "sharded":
            model = build_on_meta(cls, model_dir, "sdpa")
            shard(model, fam)
            materialize(model, cls, model_dir, env.device)
        else:
            model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(env.device)
            shard(model, fam)
        dist.barrier()
        seconds = time.perf_counter() - started
    record = {"mode": mode, "rank": env.rank, "rss_before": rss.before, "rss_peak": rss.peak, "seconds": seconds}
    Path(f"{out}.rank{env.rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def launch(mode: str, model_dir: Path, out: Path, nproc: int) -> list[dict]:
    from stages.train import local_torchrun

    cmd = local_torchrun(nproc, __file__, "--worker", mode, str(model_dir), str(out))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{mode}: torchrun failed\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=SIZES, default="1gb")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: sharded, legacy")
    ap.add_argument("--nproc", type=int, default=0, help="ranks (default: the GPUs, else 2)")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache/benchmarks")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    import torch

    nproc = args.nproc or torch.cuda.device_count() or 2
    model_dir = make_checkpoint(args.size, args.cache)
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    results = {"checkpoint_bytes": size, "nproc": nproc, "modes": {}}
    print(f"checkpoint {model_dir.name}: {size / 2**20:.0f} MiB, {nproc} ranks")
    for mode in args.modes.split(","):
        ranks = launch(mode, model_dir, args.cache / f"load-{mode}", nproc)
        results["modes"][mode] = ranks
        for r in ranks:
            grown = (r["rss_peak"] - r["rss_before"]) / 2**20
            print(
                f"{mode:8s} rank {r['rank']}: peak RSS +{grown:7.0f} MiB ({grown * 2**20 / size:.2f}x the checkpoint), "
                f"{r['seconds']:.1f} s"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
