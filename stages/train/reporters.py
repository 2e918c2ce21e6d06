"""`report_to` targets: tensorboard and wandb (offline unless configured), both writing under ``logs/<run_name>``.

The logs live outside the run directory: that directory is the train stage's DVC output, and event files (with
their wall-clock times and host names) would make its hash differ on every run.

Each reporter logs the same per-step scalars; both libraries are imported only when asked for, and a missing
one is a clear error before training starts.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from schemas.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_available(report_to: list[str]) -> None:
    for target in report_to:
        if target in PACKAGES and importlib.util.find_spec(PACKAGES[target]) is None:
            raise ConfigError(
                f"report_to: {target} needs the {PACKAGES[target]} package: "
                f"pip install {PACKAGES[target]} (or set report_to: none)"
            )


class Reporters:
    """Fan-out of per-step scalars to the configured targets (rank 0 only)."""

    def __init__(self, report_to: list[str], log_dir: Path, run_name: str, config: dict):
        self._sinks, self._closers = [], []
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
            self._sinks.append(lambda scalars, step: [writer.add_scalar(k, v, step) for k, v in scalars.items()])
            self._closers.append(writer.close)
        if "wandb" in report_to:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user configures it
            run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "qwenvl-pipeline"),
                name=run_name,
                dir=str(log_dir),
                config=config,
                resume="allow",
            )
            self._sinks.append(lambda scalars, step: run.log(scalars, step=step))
            self._closers.append(run.finish)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for sink in self._sinks:
            sink(scalars, step)

    def close(self) -> None:
        for close in self._closers:
            close()
