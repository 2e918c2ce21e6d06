"""Uncompressed Arrow IPC files: written once by a stage, memory-mapped by every reader (zero-copy, so a process
pages in only the rows it uses, and the processes of one machine share the page cache)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from schemas.errors import StageInputError

BATCH_ROWS = 65536  # rows per record batch


def write_arrow(table: pa.Table, path: Path) -> None:
    """``table`` as an uncompressed Arrow IPC file, in record batches of BATCH_ROWS rows."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for start in range(0, table.num_rows, BATCH_ROWS):
            writer.write_table(table.slice(start, BATCH_ROWS).combine_chunks())


def open_arrow(path: Path, stage: str) -> pa.Table:
    """The table of an Arrow IPC file, memory-mapped: nothing is read until a row is used."""
    if not path.is_file():
        raise StageInputError(f"{path} not found: run `qvl {stage}`")
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
