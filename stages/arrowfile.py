"""Uncompressed Arrow IPC files: written once by a stage (tokenize: stages/tokenize/output.py), memory-mapped by
every reader (zero-copy, so a process pages in only the rows it uses, and the processes of one machine share the
page cache)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from schemas.errors import StageInputError


def open_arrow(path: Path, stage: str) -> pa.Table:
    """The table of an Arrow IPC file, memory-mapped: nothing is read until a row is used."""
    if not path.is_file():
        raise StageInputError(f"{path} not found: run `qvl {stage}`")
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
