"""The parent side of the training benchmarks: one child process per configuration (benchmarks/train_core.py
measures), the options the children receive, the environment, and the comparison with the targets."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.train_core import CONFIGS
from stages.train import free_port
from stages.train.attention import kernel_name
from stages.train.telemetry import peak_flops


def add_measure_args(ap: argparse.ArgumentParser) -> None:
    """Options every child receives from its parent (``forward_args``), and the child-mode flags."""
    ap.add_argument("--steps", type=int, default=4, help="measured steps per configuration (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=int, default=0, help="baseline: padded tokens per micro-batch (0: packing length)")
    ap.add_argument("--search-start", type=int, default=0, help="longest-row search: first size (0: packing / 4)")
    ap.add_argument("--search-limit", type=int, default=0, help="longest-row search: largest size (0: 8 x packing)")
    ap.add_argument("--bisections", type=int, default=3)
    ap.add_argument("--mem-cap-tokens", type=int, default=0, help="raise torch.OutOfMemoryError above this many tokens")
    ap.add_argument("--child-deadline-s", type=float, default=0, help="stop the row search after this (0: never)")
    ap.add_argument("--config", help=argparse.SUPPRESS)  # child mode: measure this configuration only
    ap.add_argument("--workspace", help=argparse.SUPPRESS)


def forward_args(args: argparse.Namespace) -> list[str]:
    names = ("steps", "warmup", "budget", "search_start", "search_limit", "bisections", "mem_cap_tokens")
    return [x for n in names + ("child_deadline_s",) for x in (f"--{n.replace('_', '-')}", str(getattr(args, n)))]


def run_configs(
    script: Path,
    workspace: Path,
    names: list[str],
    extra: list[str],
    out: Path,
    timeout_s: float,
    on_result: Callable[[dict[str, dict]], None] = lambda results: None,
) -> dict[str, dict]:
    """Start ``script --config NAME`` per configuration (torchrun for SP) and collect what each wrote;
    ``on_result`` sees the results so far after each (the parent writes them, in case it is stopped)."""
    results: dict[str, dict] = {}
    gpus = torch.cuda.device_count()
    for name in names:
        setup = CONFIGS[name]
        if setup.sp > 1 and gpus < setup.sp:
            results[name] = {"skipped": f"needs {setup.sp} CUDA GPUs, this machine has {gpus}"}
            continue
        path = out.with_name(f"{out.stem}.{name}.json")
        path.unlink(missing_ok=True)
        child = [str(script), "--config", name, "--workspace", str(workspace), "--out", str(path), *extra]
        launcher = [sys.executable]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        if setup.sp > 1:
            env = dict(os.environ)
            launcher += [
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={setup.sp}",
                "--master_addr=127.0.0.1",
                f"--master_port={free_port()}",
            ]
        print(f"== {name}: {setup.about}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(launcher + child, stdout=sys.stderr, env=env, timeout=timeout_s, check=False)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if path.is_file():
            results[name] = json.loads(path.read_text())
        else:
            results[name] = {"error": f"the child process ended with {code} and wrote no result"}
        on_result(results)
    return results


def environment(device: torch.device) -> dict:
    import transformers

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "gpus": torch.cuda.device_count(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attention_kernel": kernel_name(device),
        "peak_flops": peak_flops(device),
    }


TARGETS = {"speedup_tokens_per_s_min": 2.0, "peak_memory_ratio_max": 0.7, "mfu_lm_min": 0.45}


def compare(configs: dict[str, dict]) -> dict:
    """The full path against the baseline, read against the targets (None where a side has no figure)."""
    full, base = configs.get("full_path", {}), configs.get("baseline", {})
    measured = all("tokens_per_s" in c for c in (full, base))
    speedup = full["tokens_per_s"] / base["tokens_per_s"] if measured else None
    memory = full["peak_mem_gib"] / base["peak_mem_gib"] if measured else None
    loss_diff = abs(full["first_step_loss"] - base["first_step_loss"]) if measured else None
    mfu = full.get("mfu")
    return {
        "speedup_tokens_per_s": speedup,
        "peak_memory_ratio": memory,
        "first_step_loss_abs_diff": loss_diff,
        "targets": TARGETS,
        "meets": {
            "speedup": None if speedup is None else speedup >= TARGETS["speedup_tokens_per_s_min"],
            "peak_memory": None if memory is None else memory <= TARGETS["peak_memory_ratio_max"],
            "mfu_lm": None if mfu is None else mfu >= TARGETS["mfu_lm_min"],
        },
    }
