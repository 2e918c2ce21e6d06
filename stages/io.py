"""Atomic output helpers: every stage writes to a temp path beside the target, then renames it into place.

A stage killed at any moment leaves either the previous complete output or nothing visible at the target;
leftover temp paths start with a dot and are removed by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from schemas.errors import PipelineError

NO_SPACE = "No space left on device"  # how DuckDB's IOException says ENOSPC (it is not an OSError)


def clean_leftovers(target: Path) -> None:
    """Remove the temp paths a killed writer of ``target`` left beside it."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, as an OSError or as DuckDB's IOException."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC or NO_SPACE in str(exc)
    return isinstance(exc, duckdb.IOException) and NO_SPACE in str(exc)


@contextlib.contextmanager
def disk_full_is_clear(target: Path, need: int | None = None) -> Iterator[None]:
    """A full disk anywhere in the block becomes one clear PipelineError naming ``target`` (and, given ``need``,
    the bytes the write needs and the bytes free on that filesystem)."""
    try:
        yield
    except (OSError, duckdb.IOException) as exc:
        if not is_disk_full(exc):
            raise
        space = ""
        if need is not None:
            existing = next(p for p in Path(target).parents if p.exists())
            space = f": it needs {need:,} bytes, {shutil.disk_usage(existing).free:,} bytes are free on its filesystem"
        raise PipelineError(f"disk full while writing {target}{space}; nothing was replaced") from exc


@contextlib.contextmanager
def _explain_os_errors(target: Path) -> Iterator[None]:
    try:
        with disk_full_is_clear(target):
            yield
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PipelineError(f"no permission to write {target} ({exc.strerror}); nothing was replaced") from None
        raise


# Fault injection for the kill tests (tests/flows/test_reliability.py): set to a directory's name, the process
# holds that directory's complete temp copy unpublished until it is killed, so a test can kill it mid-write for sure.
HOLD_BEFORE_PUBLISH = "QVL_TEST_HOLD_BEFORE_PUBLISH"


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory; on success it replaces ``target`` (old one removed after the swap)."""
    target = Path(target)
    with _explain_os_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)
        try:
            yield tmp
            if os.environ.get(HOLD_BEFORE_PUBLISH) == target.name:
                time.sleep(3600)
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.tmp-old-{os.getpid()}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside ``target``; on success it is renamed over ``target``."""
    target = Path(target)
    with _explain_os_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def write_json(target: str | Path, data: Any) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def relative_to_root(text: str, root: str | Path) -> str:
    """``text`` (a library's message, say) with every absolute path under ``root`` made relative to ``root``:
    what is stored in an output table must read the same in every checkout directory."""
    forms = {os.path.realpath(root), os.path.abspath(root)}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form + os.sep, "")
    return text
