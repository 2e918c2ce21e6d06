"""Run one DVC stage as a subprocess: stream its lines to a logger, kill its whole process group on
cancellation or failure, and turn a failure into one readable error (the stage's own message)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

ERROR_LINE = re.compile(r"(qvl \w+.*error: .*|ERROR: .*)")


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is the stage's own error line."""


def run_stage(
    stage: str, project_dir: Path, log: Callable[[str], None], on_line: Callable[[str], None] | None = None
) -> None:
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=project_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        bufsize=1,
    )
    tail: deque[str] = deque(maxlen=40)
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            log(line)
            if on_line:
                on_line(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # cancelled or crashed: stop the stage and everything it started (torchrun ranks)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if code != 0:
        errors = [m.group(1) for line in tail if (m := ERROR_LINE.search(line))]
        reason = next((e for e in errors if e.startswith("qvl")), errors[0] if errors else tail[-1] if tail else "")
        raise StageFailed(f"stage {stage} failed (exit {code}): {reason}")
