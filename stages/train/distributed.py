"""The process group, set up the same way on both devices, and the wait that tolerates a long rank-0 write.

CUDA: the device is set first, then one group serves both kinds of tensors ("cpu:gloo,cuda:nccl") with
``device_id`` (NCCL connects eagerly, at start, not at the first collective). The training loop keeps every
tensor it hands to a collective on the training device, since NCCL takes CUDA tensors only. CPU: gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stages.cpus import available_cpus

LONG_WAIT = timedelta(hours=3)  # rank 0 writing a consolidated 70B export can take tens of minutes


@dataclass(frozen=True)
class Distributed:
    device: torch.device
    rank: int
    world: int
    long_wait: dist.ProcessGroup  # gloo, with LONG_WAIT as its timeout: the other ranks wait here for rank 0

    def wait_for_rank0(self) -> None:
        """A barrier that outlasts NCCL's 10-minute default while rank 0 alone does slow host work."""
        dist.barrier(group=self.long_wait)


def init_distributed() -> Distributed:
    """Choose the device from LOCAL_RANK, set it, then start the process group (torchrun's environment)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, available_cpus() // local_world))
    long_wait = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    return Distributed(device, dist.get_rank(), dist.get_world_size(), long_wait)
