"""One rank (gloo) writing real checkpoints with stages.train.checkpoint.save; prints a JSON report.

Modes: `full RUN_DIR` (checkpoint 1, then fill the filesystem, then checkpoint 2) and `portable DIR_A DIR_B`
(the same state saved under two directories).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from schemas.errors import PipelineError
from stages.fast_exit import exit_now
from stages.train import checkpoint


def setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = LambdaLR(optimizer, lambda _: 1.0)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler) -> None:
    model(torch.ones(2, 256)).sum().backward()
    optimizer.step()
    scheduler.step()


def files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def full(run_dir: Path) -> dict:
    model, optimizer, scheduler = setup()
    step(model, optimizer, scheduler)
    first = checkpoint.save(run_dir, 1, model, optimizer, scheduler, {"history": []}, keep=None)
    before = files(first)
    need = checkpoint.checkpoint_bytes(run_dir, {}, 1)
    free = os.statvfs(run_dir).f_bavail * os.statvfs(run_dir).f_frsize
    with open(run_dir.parent / "filler", "wb") as f:
        f.write(b"\0" * (free - need // 3))
    warning = checkpoint.space_warning(run_dir, need)
    step(model, optimizer, scheduler)
    error = None
    try:
        checkpoint.save(run_dir, 2, model, optimizer, scheduler, {"history": []}, keep=1)
    except PipelineError as exc:
        error = str(exc)
    intact = files(first) == before
    model2, optimizer2, scheduler2 = setup()
    state = checkpoint.load(first, model2, optimizer2, scheduler2)
    return {
        "need": need,
        "warning": warning,
        "error": error,
        "left": sorted(p.name for p in run_dir.iterdir()),
        "intact": intact,
        "loaded_step": state["step"],
    }


def portable(a: Path, b: Path) -> dict:
    model, optimizer, scheduler = setup()
    step(model, optimizer, scheduler)
    saved = [checkpoint.save(d, 1, model, optimizer, scheduler, {"history": []}, keep=None) for d in (a, b)]
    fa, fb = files(saved[0]), files(saved[1])
    return {"same": fa == fb, "differ": sorted(k for k in fa if fa[k] != fb.get(k))}


if __name__ == "__main__":
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mode, *dirs = sys.argv[1:]
    report = full(Path(dirs[0])) if mode == "full" else portable(Path(dirs[0]), Path(dirs[1]))
    dist.destroy_process_group()
    print(json.dumps(report))
    exit_now(0)
