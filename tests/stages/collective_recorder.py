"""Started by torchrun from test_train_collectives.py: one rank of the real `qvl train` worker, with every
``torch.distributed`` collective that the training code calls recorded (operation, tensor devices), written to
``$QVL_COLLECTIVES.rank<N>.json`` when the rank ends. NCCL takes CUDA tensors only: a CPU tensor reaching a
collective is the first-step failure this guards against (on a CUDA machine the same test runs against NCCL)."""

import atexit
import functools
import json
import os
import sys

import torch
import torch.distributed as dist

OPERATIONS = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_single",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
)
calls: list[dict] = []


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors(item)


def recorded(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        found = [t for v in (*args, *kwargs.values()) for t in tensors(v)]
        calls.append({"op": name, "devices": sorted({str(t.device) for t in found})})
        return function(*args, **kwargs)

    return wrapper


def write() -> None:
    if dist.is_initialized() or calls:
        rank = os.environ.get("RANK", "0")
        with open(f"{os.environ['QVL_COLLECTIVES']}.rank{rank}.json", "w") as f:
            json.dump(calls, f)


for op in OPERATIONS:
    if hasattr(dist, op):
        setattr(dist, op, recorded(op, getattr(dist, op)))
atexit.register(write)

if __name__ == "__main__":
    from stages.train.worker import main

    sys.exit(main())
