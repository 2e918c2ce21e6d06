"""Sharded, resumable checkpoints (torch.distributed.checkpoint) and the consolidated Hugging Face export.

A checkpoint is written into `.checkpoint-<step>.tmp/` by every rank and renamed to `checkpoint-<step>/` by
rank 0 once all ranks are done: a directory without the `.tmp` suffix is always complete. DCP reshards on load,
so a run resumes on a different number of ranks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from stages.train.distributed import Distributed
from stages.train.loading import checkpoint_dtype

STATE_FILE = "trainer_state.json"
EXPORT_FILE = "qvl_export.json"  # in the Hugging Face export: the step (checkpoint) its weights are from
NAME = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := NAME.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def eval_loss_of(ckpt: Path) -> float | None:
    """The eval loss a checkpoint's step was evaluated at (None: that step was not evaluated)."""
    history = json.loads((ckpt / STATE_FILE).read_text()).get("history") or [{}]
    return history[-1].get("eval_loss")


def best_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest eval loss (the earliest of equals), or None if none was evaluated."""
    found = enumerate(complete_checkpoints(run_dir))
    scored = [(loss, i, c) for i, c in found if (loss := eval_loss_of(c)) is not None]
    return min(scored)[2] if scored else None


def run_fingerprint(params, root: Path) -> str:
    """What a checkpoint depends on besides its own step: the training arguments, the model path, the training
    code, the packs, the tokenized samples and the frame index. A resumed run may change how long it runs, how
    often it saves, and how the global batch is laid out over processes (ranks, sequence-parallel degree,
    per-device batch, accumulation): the loader counts packs, not steps, and the checkpoints are layout-free."""
    import hashlib

    args = params.trainer_args.model_dump(
        exclude={
            "max_steps",
            "save_steps",
            "save_total_limit",
            "report_to",
            "nproc_per_node",
            "nnodes",
            "dataloader_num_workers",
            "sp_ulysses_degree",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
        }
    )
    digest = hashlib.sha256(json.dumps([args, params.model_config_.model_dump()], sort_keys=True).encode())
    code = sorted(Path(__file__).parent.glob("*.py"))
    inputs = ["data/packed/packs.parquet", "data/tokenized/samples.parquet", "data/frames/index.parquet"]
    for path in [*code, *(root / p for p in inputs)]:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def discard_stale(run_dir: Path, fingerprint: str) -> bool:
    """Remove checkpoints written under another fingerprint (rank 0), so a changed run never resumes from them."""
    stale = [
        c
        for c in complete_checkpoints(run_dir)
        if json.loads((c / STATE_FILE).read_text()).get("fingerprint") != fingerprint
    ]
    dist.barrier()
    if stale and dist.get_rank() == 0:
        for c in stale:
            shutil.rmtree(c)
    dist.barrier()
    return bool(stale)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _PortableWriter(dcp.FileSystemWriter):
    """DCP's file writer without its storage metadata (the absolute checkpoint path and a random save id, which
    made every checkpoint's `.metadata` differ between runs and checkout directories); loading does not need it."""

    def storage_meta(self) -> None:
        return None


def _tensor_bytes(tree) -> int:
    """Bytes of this rank's share of every tensor in a (nested) state dict."""
    from torch.distributed.tensor import DTensor  # (imports kept local: the module's import block is shared work)

    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if isinstance(tree, DTensor) else tree
        return local.numel() * local.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def checkpoint_bytes(run_dir: Path, state: dict, world: int) -> int:
    """An estimate of a checkpoint's size: the newest complete one's, else this rank's tensor bytes x ranks."""
    if existing := complete_checkpoints(run_dir):
        return sum(f.stat().st_size for f in existing[-1].rglob("*") if f.is_file())
    return _tensor_bytes(state) * world


def space_warning(run_dir: Path, need: int) -> str | None:
    """A warning when the run directory's filesystem has less free space than a checkpoint needs, else None."""
    free = _free_bytes(run_dir)
    if free >= need:
        return None
    return (
        f"warning: {_size(free)} free on the filesystem of {run_dir}, a checkpoint needs about {_size(need)}: "
        "the next checkpoint write will likely fail (free some space or lower trainer_args.save_total_limit)"
    )


def _free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the error (DCP wraps each rank's error in a CheckpointException), or torch's zip writer's
    `unexpected pos` (what torch.save raises when a write comes up short on a full disk)."""
    import errno

    found = [exc]
    if isinstance(exc, dcp.CheckpointException):
        found += [e for e, _ in exc.failures.values()]
    for e in found:
        while e is not None:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                return True
            if "No space left on device" in str(e) or "unexpected pos" in str(e):
                return True
            e = e.__cause__ or e.__context__
    return False


def _agree_or_raise(failure: BaseException | None, tmp: Path, final: Path, need: int) -> None:
    """Every rank learns whether any rank failed; then all raise one clear error, with the temp dir removed (the
    previous checkpoints are never touched before the new one is complete)."""
    from schemas.errors import PipelineError

    flag = torch.tensor([int(failure is not None)], dtype=torch.int32, device="cpu")  # gloo carries CPU tensors
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if failure is None:
        raise PipelineError(f"checkpoint {final} not written: another rank failed (see its error)")
    free = _free_bytes(final.parent)
    if _is_disk_full(failure) or free < need:
        raise PipelineError(
            f"disk full while writing checkpoint {final}: it needs about {_size(need)}, {_size(free)} is free on "
            "its filesystem; earlier checkpoints are untouched (free some space, then rerun to resume)"
        )
    reason = str(failure).strip().splitlines()[-1] if str(failure).strip() else ""
    raise PipelineError(f"could not write checkpoint {final}: {type(failure).__name__}: {reason}")


def save(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    keep: int | None,
    keep_best: bool = False,
) -> Path:
    """Write checkpoint-<step> atomically (all ranks), then keep the newest ``keep`` (and, with ``keep_best``, the
    one of the lowest eval loss besides, as HF's load_best_model_at_end does). Rank 0 prints a warning first when
    free space looks short; a failed write (a full disk above all) raises PipelineError on every rank and leaves
    the previous checkpoints as they were."""
    import sys

    rank = dist.get_rank()
    tmp, final = run_dir / f".checkpoint-{step}.tmp", run_dir / f"checkpoint-{step}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    need = checkpoint_bytes(run_dir, {"model": model_sd, "optim": optim_sd}, dist.get_world_size())
    failure: BaseException | None = None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            failure = exc
        if failure is None and (warning := space_warning(run_dir, need)):
            print(warning, file=sys.stderr, flush=True)
    _agree_or_raise(failure, tmp, final, need)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_PortableWriter(str(tmp)))
        torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
        if rank == 0:
            state = {
                **trainer_state,
                "step": step,
                "scheduler": scheduler.state_dict(),
                "world_size": dist.get_world_size(),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    except (OSError, RuntimeError, dcp.CheckpointException) as exc:
        failure = exc
    _agree_or_raise(failure, tmp, final, need)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        if keep:
            best = best_checkpoint(run_dir) if keep_best else None
            for old in complete_checkpoints(run_dir)[:-keep]:  # the newest complete one is never deleted
                if old != best:
                    shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and (same world size) RNG; returns the trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = json.loads((path / STATE_FILE).read_text())
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / f"rng-rank{dist.get_rank()}.pt"
    if trainer_state["world_size"] == dist.get_world_size() and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def load_weights(path: Path, model) -> None:
    """Only the model weights of checkpoint ``path`` (all ranks; e.g. the best one, before the export)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def export_hf(
    model, model_class: type, base_path: str | Path, processor, out_dir: Path, env: Distributed, step: int
) -> None:
    """Consolidate the sharded weights on rank 0 (one tensor at a time, offloaded to host memory) and write a
    from_pretrained-loadable directory atomically, in the base checkpoint's dtype (bf16 for the released Qwen
    models), with EXPORT_FILE naming the step of the weights. The other ranks wait on a gloo barrier whose
    timeout outlasts a long write."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank == 0:
        dtype = checkpoint_dtype(base_path)
        tmp = out_dir.parent / f".{out_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.device("meta"):
            fresh = model_class._from_config(model.config, dtype=dtype)
        for name in full:  # one tensor at a time: the fp32 copy is freed as its converted one appears
            full[name] = full[name].to(dtype)
        fresh.load_state_dict(full, assign=True)
        if model.config.get_text_config().tie_word_embeddings:
            fresh.tie_weights()
        fresh.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps({"step": step, "checkpoint": f"checkpoint-{step}"}) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    del full
    env.wait_for_rank0()
