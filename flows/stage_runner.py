"""Run one DVC stage as a subprocess: stream its lines to a logger, kill its whole process group on
cancellation or failure, and turn a failure into one readable error (the stage's own message)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

ERROR_LINE = re.compile(r"(qvl \w+.*error: .*|ERROR: .*)")
WARNING_LINE = re.compile(r"^WARNING: |^warning: |\b[A-Z]\w*Warning: ")  # DVC's, and Python's warnings module
# DVC's advice after each stage, addressed to a person at a shell: noise in a flow run's log.
DVC_BOILERPLATE = re.compile(
    r"^(To track the changes with git, run:|To enable auto staging, run:|git add \S|dvc config core\.autostage|"
    r"Use `dvc push` to send your updates to remote storage\.)"
)


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is the stage's own error line."""


def heal_dvc_state(project_dir: Path) -> None:
    """DVC writes `.dvc/tmp/rwlock` in place: a dvc process killed mid-write leaves it truncated and every later
    dvc command fails ("JSON structure is corrupted"). A truncated file records only dead holders (its writer
    died), so it is removed; a readable one is left to DVC. dvc.lock is rewritten in place too (below)."""
    lock = project_dir / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(lock.read_text())
    except FileNotFoundError:
        pass
    except ValueError:
        lock.unlink(missing_ok=True)
    heal_lockfile(project_dir / "dvc.lock")
    remove_stale_temps(project_dir)


def _live_dvc_writer(project_dir: Path) -> bool:
    """Whether DVC's rwlock names a live process holding a write lock (then a stage may be writing now)."""
    try:
        holders = json.loads((project_dir / ".dvc" / "tmp" / "rwlock").read_text()).get("write", {}).values()
    except (OSError, ValueError, AttributeError):
        return False
    for holder in holders:
        try:
            os.kill(int(holder["pid"]), 0)
            return True
        except (ProcessLookupError, KeyError, TypeError, ValueError):
            continue
        except PermissionError:
            return True
    return False


def remove_stale_temps(project_dir: Path) -> None:
    """A stage killed mid-write leaves its temp output (`.<out>.tmp-*`, see stages/io.py) beside each output.
    The stage removes it when it runs again, but DVC may restore that output from its run cache instead of
    running the stage: so the leftovers beside every output in dvc.yaml are removed here, unless a live dvc
    process holds a write lock (a stage may be writing them now)."""
    import yaml

    from stages.io import clean_leftovers

    try:
        stages = (yaml.safe_load((project_dir / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return
    if _live_dvc_writer(project_dir):
        return
    for stage in stages.values():
        for out in (stage or {}).get("outs") or []:
            clean_leftovers(project_dir / (out if isinstance(out, str) else next(iter(out))))


def heal_lockfile(path: Path) -> None:
    """A dvc.lock cut short by a kill fails DVC's schema ("dvc.lock validation failed") and blocks every run.
    Keep the stage entries that are complete; the dropped ones simply run again. A file that does not parse at
    all is removed (every stage then runs again, and DVC skips none wrongly)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return
    except yaml.YAMLError:
        path.unlink()
        return
    import voluptuous
    from dvc.schema import COMPILED_LOCK_FILE_STAGE_SCHEMA, COMPILED_LOCKFILE_SCHEMA

    try:
        COMPILED_LOCKFILE_SCHEMA(data)
        return
    except voluptuous.Invalid:
        pass
    stages = data.get("stages") if isinstance(data, dict) else None
    kept = {}
    for name, entry in (stages if isinstance(stages, dict) else {}).items():
        try:
            COMPILED_LOCK_FILE_STAGE_SCHEMA(entry)
        except voluptuous.Invalid:
            continue
        kept[name] = entry
    path.write_text(yaml.safe_dump({"schema": "2.0", "stages": kept}, sort_keys=False))


def dvc(*args: str, project_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    """`dvc <args>` in ``project_dir`` after healing its lock state."""
    heal_dvc_state(project_dir)
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project_dir, **kwargs)


def run_stage(
    stage: str,
    project_dir: Path,
    log: Callable[[str], None],
    on_line: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    force: bool = False,
) -> None:
    """`dvc repro --single-item <stage>` (with ``--force`` if ``force``): each non-blank line goes to ``on_line``
    and, unless it is DVC's git advice, to ``log`` (warnings to ``warn`` where given); a non-zero exit raises
    StageFailed. However the call ends (an exception, Prefect's cancellation signal), the stage's process group
    is stopped (SIGTERM, then SIGKILL after 20 s): `qvl train` passes the SIGTERM on to torchrun's group, which
    stops every rank."""
    heal_dvc_state(project_dir)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **_prefect_api_env()}
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
            if not line.strip():
                continue
            tail.append(line)
            if not DVC_BOILERPLATE.match(line.strip()):
                (warn if warn and WARNING_LINE.search(line) else log)(line)
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


def _prefect_api_env() -> dict[str, str]:
    """Inside a flow run without PREFECT_API_URL (ephemeral mode): the URL of the flow's temporary server, so a
    stage that maps its chunks through Prefect (orchestration.task_runner: dask) reports to the same server
    instead of starting one of its own (seconds)."""
    if os.environ.get("PREFECT_API_URL"):
        return {}
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return {}
    return {"PREFECT_API_URL": str(get_client(sync_client=True).api_url)}


class StagePlan:
    """Which stages of the linear DAG must go through `dvc repro`: one `dvc status` up front says which are
    unchanged; those before the first changed stage are skipped without starting a DVC process each (what
    keeps a cached rerun fast). From the first stage that runs on, every later stage goes through DVC."""

    def __init__(self, project_dir: Path):
        out = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json"], cwd=project_dir, capture_output=True, text=True
        )
        self.changed = set(json.loads(out.stdout or "{}")) if out.returncode == 0 else None  # None: unknown
        self.started = False

    def needs_run(self, stage: str) -> bool:
        if self.started or self.changed is None or stage in self.changed:
            self.started = True
        return self.started
