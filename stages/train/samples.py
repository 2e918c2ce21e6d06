"""The trainer's view of the tokenized samples and the packs, without reading either into Python objects.

data/tokenized/samples.arrow (an uncompressed Arrow IPC file that tokenize writes beside samples.parquet) is
memory-mapped: the operating system pages in only the rows a rank builds, and every rank on a node shares the
same page cache. A row is materialised when it is built. The packs name their samples by tokenized row number
(one integer per packed sample), so building a pack never searches by string.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.errors import StageInputError
from stages.arrowfile import open_arrow

TOKENIZED_ARROW = Path("data/tokenized/samples.arrow")
PACKS = Path("data/packed/packs.parquet")
EVAL_PACKS = Path("data/packed/eval_packs.parquet")  # the held-out samples' packs (in-loop eval)
TOKEN_COLUMNS = ("input_ids", "labels")
MEDIA_COLUMNS = ("image_paths", "image_grid_thw", "video_keys", "video_grid_thw", "second_per_grid_ts")


class _Batch:
    """One record batch's list columns as zero-copy numpy views (offsets, values): a row's tokens are two slices,
    and an empty media list is known from its offsets, without building Arrow scalars."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch = batch
        self.tokens = [(batch.column(n).offsets.to_numpy(), batch.column(n).values.to_numpy()) for n in TOKEN_COLUMNS]
        self.media = {n: batch.column(n).offsets.to_numpy() for n in MEDIA_COLUMNS}


class TokenizedSamples(Mapping):
    """sample_id -> the tokenized row as a dict (one row materialised per access); ``row(i)`` by row number."""

    def __init__(self, path: Path):
        self.path = path
        self.table = open_arrow(path, "tokenize")
        self.batches = [_Batch(b) for b in self.table.to_batches()]
        self.starts = np.cumsum([0] + [b.batch.num_rows for b in self.batches])

    def __getstate__(self) -> dict:  # DataLoader workers re-map the file instead of receiving a copy of it
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[str]:
        for chunk in self.table.column("sample_id").chunks:
            yield from chunk.to_pylist()

    def __getitem__(self, sample_id: str) -> dict:
        found = pc.index_in(pa.array([sample_id], pa.string()), value_set=self._ids)[0]
        if not found.is_valid:
            raise KeyError(sample_id)
        return self.row(found.as_py())

    @functools.cached_property
    def _ids(self) -> pa.Array:
        """Every sample id as one array (what pc.index_in searches), assembled once."""
        return self.table.column("sample_id").combine_chunks()

    def rows_of(self, sample_ids: Iterable[str] | pa.Array) -> np.ndarray:
        """The row numbers of ``sample_ids``, in order; a StageInputError names any id not tokenized."""
        wanted = sample_ids if isinstance(sample_ids, pa.Array) else pa.array(list(sample_ids), pa.string())
        found = pc.index_in(wanted, value_set=self._ids)
        if found.null_count:
            missing = wanted.filter(found.is_null())
            raise StageInputError(
                f"{len(missing)} sample(s) are not in the tokenized data (e.g. {missing[0].as_py()}): "
                "re-run pack after tokenize"
            )
        return found.to_numpy().astype(np.int64)

    def row(self, i: int) -> dict:
        """Row ``i`` as to_pylist() gives it."""
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}

    def _locate(self, i: int) -> tuple[_Batch, int]:
        b = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.batches[b], i - int(self.starts[b])

    def media(self, i: int) -> dict:
        """Row ``i``'s MEDIA_COLUMNS (image paths, video keys, grids, seconds per grid), as Python objects."""
        batch, j = self._locate(i)
        return {
            name: batch.batch.column(name)[j].as_py() if offsets[j + 1] > offsets[j] else []
            for name, offsets in batch.media.items()
        }

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i``'s input_ids and labels: read-only int32 views of the mapped file."""
        batch, j = self._locate(i)
        return tuple(values[offsets[j] : offsets[j + 1]] for offsets, values in batch.tokens)

    def ids(self, rows: np.ndarray) -> list[str]:
        return self.table.column("sample_id").take(pa.array(rows, pa.int64())).to_pylist()


def check_pack_rows(packs: pa.Table, tokenized: pa.Table) -> pa.Table:
    """``packs`` if each packed sample's row number (sample_rows) is, in the tokenized data, the row of its id
    (sample_ids); otherwise a StageInputError saying to re-run pack (packs made from other tokenized data, or by
    a version of pack that wrote no row numbers). Arrow compute over the columns: no Python object per sample."""
    if "sample_rows" not in packs.column_names:
        raise StageInputError(f"{PACKS} has no sample_rows (made by an older pack): re-run pack")
    rows, ids = (pc.list_flatten(packs.column(name)) for name in ("sample_rows", "sample_ids"))
    outside = pc.or_(pc.less(rows, 0), pc.greater_equal(rows, tokenized.num_rows))
    rows = pc.if_else(outside, 0, rows)  # so that take() can run; these samples count as mismatched below
    wrong = pc.or_(outside, pc.not_equal(tokenized.column("sample_id").take(rows), ids))
    if pc.any(wrong).as_py():
        bad = ids.filter(wrong)
        raise StageInputError(
            f"{len(bad)} sample(s) in the packs are not at their row of the tokenized data (e.g. {bad[0].as_py()}): "
            "re-run pack after tokenize"
        )
    return packs


class Packs(Mapping):
    """pack_id -> its sample ids (in the pack stage's order); ``rows(pack_id)``: their tokenized row numbers.

    Reads only the packs' integer columns (pack_id, sample_rows: one int64 per packed sample), never the
    samples or their ids; `qvl train`'s preflight has checked that the rows name the packs' samples."""

    def __init__(self, path: Path, samples: TokenizedSamples):
        self.samples = samples
        table = pq.read_table(path, columns=["pack_id", "sample_rows"])
        self.pack_ids = table.column("pack_id").to_numpy()
        lists = table.column("sample_rows").combine_chunks()
        offsets = lists.offsets.to_numpy().astype(np.int64)
        self.offsets = offsets - offsets[0]
        self.sample_rows = lists.flatten().to_numpy()
        self.order = np.argsort(self.pack_ids, kind="stable")

    def __len__(self) -> int:
        return len(self.pack_ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.pack_ids.tolist())

    def _position(self, pack_id: int) -> int:
        at = int(np.searchsorted(self.pack_ids, pack_id, sorter=self.order))
        if at == len(self.order) or self.pack_ids[self.order[at]] != pack_id:
            raise KeyError(pack_id)
        return int(self.order[at])

    def rows(self, pack_id: int) -> np.ndarray:
        k = self._position(pack_id)
        return self.sample_rows[self.offsets[k] : self.offsets[k + 1]]

    def __getitem__(self, pack_id: int) -> list[str]:
        return self.samples.ids(self.rows(pack_id))
