"""Load every dataset file's rows, verbatim, into one Arrow table: (source, row, line, load_reason).

A row is one JSON object as text. JSONL lines are kept byte for byte (invalid UTF-8 is marked, not dropped);
JSON arrays and Parquet rows are serialised to JSON text. A file that is missing or whose rows hold no
messages at all stops the stage with one error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from schemas.errors import StageInputError
from schemas.params import DatasetEntry

RAW_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("line", pa.string()),
        ("load_reason", pa.string()),
    ]
)
MESSAGE_KEYS = ("messages", "conversations")


def _jsonl_lines(path: Path) -> tuple[list[str], list[str | None]]:
    data = path.read_bytes()
    try:
        # Fast path: the whole file decodes; splitting on \n only (not str.splitlines, which also splits
        # on \u2028 and friends that JSON strings may hold).
        raw_lines = data.decode("utf-8").split("\n")
        reasons = [None] * len(raw_lines)
    except UnicodeDecodeError:
        raw_lines, reasons = [], []
        for chunk in data.split(b"\n"):
            try:
                raw_lines.append(chunk.decode("utf-8"))
                reasons.append(None)
            except UnicodeDecodeError:
                raw_lines.append(chunk.decode("utf-8", errors="backslashreplace"))
                reasons.append("invalid_utf8")
    keep = [i for i, line in enumerate(raw_lines) if line.strip()]  # blank lines are not rows
    return [raw_lines[i] for i in keep], [reasons[i] for i in keep]


def _json_array_lines(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageInputError(
            f"{path}: not a valid JSON file ({exc}); use data_type: jsonl for one row a line"
        ) from None
    if not isinstance(data, list):
        raise StageInputError(f"{path}: a JSON dataset must be an array of samples, got {type(data).__name__}")
    return [json.dumps(item, ensure_ascii=False) for item in data]


def _parquet_lines(path: Path) -> list[str]:
    con = duckdb.connect()
    try:
        columns = con.execute("SELECT name, type FROM parquet_schema(?) WHERE name <> 'schema'", [str(path)]).fetchall()
    except duckdb.Error as exc:
        raise StageInputError(f"{path}: not a readable Parquet file ({exc})") from None
    names = {n for n, _ in columns}
    if not names & set(MESSAGE_KEYS):
        raise StageInputError(f"{path}: no `messages` or `conversations` column (columns: {', '.join(sorted(names))})")
    # A messages column stored as JSON text is parsed; a nested (list/struct) column is serialised as is.
    fields = []
    for name, typ in columns:
        quoted = '"' + name.replace('"', '""') + '"'
        if name in MESSAGE_KEYS and typ in ("BYTE_ARRAY", "VARCHAR"):
            fields.append(f"'{name}', CASE WHEN json_valid({quoted}) THEN {quoted}::JSON ELSE to_json({quoted}) END")
        else:
            fields.append(f"'{name}', {quoted}")
    sql = f"SELECT json_object({', '.join(fields)})::VARCHAR FROM read_parquet(?)"
    return [r[0] for r in con.execute(sql, [str(path)]).fetchall()]


def _check_holds_messages(path: Path, lines: list[str]) -> None:
    """A file none of whose rows has a messages key is a wrong file, not a file of bad rows."""
    for line in lines[:1000]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and any(k in row for k in MESSAGE_KEYS):
            return
    if lines:
        raise StageInputError(f"{path}: no row holds `messages` or `conversations`; is this a chat dataset?")


def load_dataset(entry: DatasetEntry, root: Path) -> pa.Table:
    """One dataset file as RAW_SCHEMA rows (row numbers from 0, in file order)."""
    path = (root / entry.path) if not Path(entry.path).is_absolute() else Path(entry.path)
    if not path.is_file():
        raise StageInputError(f"dataset file not found: {path} (dataset_config.datasets path {entry.path!r})")
    folder = data_folder(entry, root)
    if not folder.is_dir():
        raise StageInputError(f"data_folder not found: {folder} (for dataset {entry.path})")
    if entry.data_type == "jsonl":
        lines, reasons = _jsonl_lines(path)
    else:
        lines = _json_array_lines(path) if entry.data_type == "json" else _parquet_lines(path)
        reasons = [None] * len(lines)
    _check_holds_messages(path, lines)
    n = len(lines)
    return pa.table(
        {
            "source": pa.repeat(pa.scalar(entry.path), n),
            "row": pa.array(np.arange(n, dtype=np.int64)),
            "line": pa.array(lines, pa.string()),
            "load_reason": pa.array(reasons, pa.string()),
        },
        schema=RAW_SCHEMA,
    )


def data_folder(entry: DatasetEntry, root: Path) -> Path:
    """Where a dataset's relative media paths point: data_folder, or the dataset file's own folder."""
    path = root / entry.path
    return (root / entry.data_folder if entry.data_folder else path.parent).resolve()


def load_all(entries: list[DatasetEntry], root: Path) -> pa.Table:
    """Every dataset's rows; errors in any file stop before anything is written."""
    if not entries:
        raise StageInputError("dataset_config.datasets is empty: list at least one {path, data_folder, data_type}")
    return pa.concat_tables([load_dataset(e, root) for e in entries])
