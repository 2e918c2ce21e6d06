"""Tokenize's output files, written as the chunks come back: data/tokenized/samples.parquet (zstd) and the same
rows as samples.arrow (an uncompressed Arrow IPC file that the trainer memory-maps, see stages/arrowfile.py).

Chunks are buffered up to WRITE_ROWS rows and written as one Parquet row group and one Arrow record batch, so the
memory held does not grow with the dataset and the files do not depend on the chunk size or the worker count.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WRITE_ROWS = 4096  # ~35 MB of token columns at 1,000 tokens per sample


class TokenizedWriter:
    """``write(table)`` appends rows to both files; ``close()`` writes what is buffered and the footers."""

    def __init__(self, folder: Path, schema: pa.Schema):
        self.schema = schema
        self.parquet = pq.ParquetWriter(folder / "samples.parquet", schema, compression="zstd")
        self.arrow = pa.ipc.new_file(str(folder / "samples.arrow"), schema)  # owns and closes the file
        self.buffered: list[pa.Table] = []
        self.buffered_rows = 0

    def write(self, table: pa.Table) -> None:
        self.buffered.append(table.replace_schema_metadata(self.schema.metadata))
        self.buffered_rows += table.num_rows
        while self.buffered_rows >= WRITE_ROWS:
            self._flush(WRITE_ROWS)

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` buffered rows as one row group / record batch; keep the rest."""
        table = pa.concat_tables(self.buffered)
        head = table.slice(0, rows).combine_chunks()
        self.parquet.write_table(head, row_group_size=rows)
        self.arrow.write_table(head)
        rest = table.slice(rows)
        self.buffered, self.buffered_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.buffered_rows:
            self._flush(self.buffered_rows)
        self.parquet.close()
        self.arrow.close()

    def __enter__(self) -> TokenizedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
