"""The validate stage: load chat datasets into DuckDB, apply the SQL rules, write accepted samples and rejects.

Recipe: load rows verbatim -> explode into parts (schemas/validate_normalize.sql) -> check each distinct media
reference once (media.py) -> apply the rules (schemas/validate_rules.sql) -> write atomically. Every input row
ends up either accepted or rejected with one reason code: input == accepted + rejected.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import duckdb
import pyarrow as pa

from schemas.errors import PipelineError
from schemas.params import Params
from schemas.reasons import REASON_CODES
from stages.cpus import available_cpus
from stages.families import family
from stages.io import atomic_dir, disk_full_is_clear, write_json
from stages.tokenizer_build import SPECIAL_TOKENS
from stages.validate.load import data_folder, load_all
from stages.validate.media import MediaChecker, MediaRules, ProbeCache

OUT_DIR = Path("data/validated")
MEDIA_STORE = Path("data/media")
METRICS = Path("metrics/validate.json")
SAMPLES_SORT = "ORDER BY source_order, row"
SPILL_DIR = Path(".cache/duckdb-tmp")


def connect(params: Params, root: Path) -> duckdb.DuckDBPyConnection:
    """A bounded DuckDB: validate.memory_limit, spilling to .cache/duckdb-tmp above it, and no insertion order
    kept (every output is written with an explicit ORDER BY, every list aggregate sorts its own items)."""
    (root / SPILL_DIR).mkdir(parents=True, exist_ok=True)
    return duckdb.connect(
        config={
            "memory_limit": params.validate_.memory_limit,
            "temp_directory": str(root / SPILL_DIR),
            "preserve_insertion_order": False,
            "threads": available_cpus(),  # DuckDB's own default counts the host's cores, not this process's
        }
    )


@dataclass
class ValidateResult:
    input: int
    accepted: int
    rejected: int
    duplicates: int
    eval_samples: int  # accepted samples held out for evaluation
    by_reason: dict[str, int]
    seconds: float

    def metrics(self) -> dict:
        return {
            "input": self.input,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "eval_samples": self.eval_samples,
            "by_reason": self.by_reason,
        }


def _sql(name: str) -> list[str]:
    text = files("schemas").joinpath(name).read_text(encoding="utf-8")
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s for s in (part.strip() for part in text.split(";")) if s]


def _run_sql(con: duckdb.DuckDBPyConnection, name: str) -> None:
    for statement in _sql(name):
        con.execute(statement)


def special_token_regex() -> str:
    return "|".join(re.escape(t) for t in SPECIAL_TOKENS)


@contextlib.contextmanager
def _memory_is_clear(limit: str):
    """DuckDB running out of memory (after spilling what it can) becomes one PipelineError naming the setting."""
    try:
        yield
    except duckdb.OutOfMemoryException as exc:
        first = str(exc).splitlines()[0]
        raise PipelineError(
            f"validate needs more memory than validate.memory_limit {limit} (spilling to {SPILL_DIR}); "
            f"raise validate.memory_limit ({first})"
        ) from None


def validate_into(con: duckdb.DuckDBPyConnection, params: Params, root: Path) -> None:
    """Fill ``con`` with the tables `raw` and `rejects` and the view `accepted` for ``params``."""
    cfg = params.dataset_config
    entries = cfg.all_datasets()
    load_all(con, [d for d, _ in entries], root)
    datasets = pa.table(
        {
            "source": [d.path for d, _ in entries],
            "source_order": list(range(len(entries))),
            "data_folder": [str(data_folder(d, root)) for d, _ in entries],
            "split": [split for _, split in entries],
        }
    )
    con.register("datasets", datasets)
    # A training sample is held out when the first 32 bits of a hash of its id fall under eval_ratio x 2^32.
    con.execute("SET VARIABLE eval_threshold = ?", [int(cfg.eval_ratio * 2**32)])
    con.execute(
        "CREATE OR REPLACE TEMP TABLE reasons AS SELECT unnest(?) AS code, generate_subscripts(?, 1) AS priority",
        [list(REASON_CODES), list(REASON_CODES)],
    )
    con.execute("SET VARIABLE special_token_regex = ?", [special_token_regex()])
    _run_sql(con, "validate_normalize.sql")

    vcfg = params.validate_
    fam = family(cfg.processor_config.processor_type)
    rules = MediaRules(
        min_side=vcfg.min_image_side or fam.image_factor,
        max_aspect_ratio=vcfg.max_aspect_ratio,
        allow_remote=vcfg.allow_remote_media,
        project_root=root,
        store_dir=root / MEDIA_STORE,
        workers=vcfg.workers or available_cpus(),
    )
    (root / MEDIA_STORE).mkdir(parents=True, exist_ok=True)
    cache = ProbeCache(root / vcfg.media_cache)
    refs = con.execute("SELECT kind, is_frame_list, data_folder, ref FROM media_refs ORDER BY ALL").fetchall()
    con.execute("DROP TABLE media_refs")  # read once, here: its memory goes back to DuckDB before the rules
    con.register("media_checks", MediaChecker(rules, cache).check_all(refs))
    cache.save()
    _run_sql(con, "validate_rules.sql")


def run(params: Params, root: Path = Path(".")) -> ValidateResult:
    """Run the stage and write its outputs under ``root``."""
    start = time.perf_counter()
    con, limit = connect(params, root), params.validate_.memory_limit
    with _memory_is_clear(limit), disk_full_is_clear(root / OUT_DIR):  # the media store and probe cache too
        validate_into(con, params, root)
    n_input = con.execute("SELECT count(*) FROM raw").fetchone()[0]
    with _memory_is_clear(limit), atomic_dir(root / OUT_DIR) as tmp:
        for table in ("accepted", "rejects"):
            name = "samples.parquet" if table == "accepted" else "rejects.parquet"
            con.execute(
                f"COPY (SELECT * EXCLUDE (source_order) FROM {table} {SAMPLES_SORT}) "
                f"TO '{tmp / name}' (FORMAT parquet, COMPRESSION zstd)"
            )
    accepted, held_out = con.execute("SELECT count(*), count(*) FILTER (WHERE split = 'eval') FROM accepted").fetchone()
    by_reason = dict(con.execute("SELECT reason, count(*) FROM rejects GROUP BY reason ORDER BY reason").fetchall())
    rejected = sum(by_reason.values())
    if accepted + rejected != n_input:  # the stage's promise; a broken rule must never lose rows silently
        raise AssertionError(f"validate lost rows: input {n_input} != accepted {accepted} + rejected {rejected}")
    result = ValidateResult(
        n_input, accepted, rejected, by_reason.get("duplicate", 0), held_out, by_reason, time.perf_counter() - start
    )
    # Counts by reason are a table of their own (not DVC metrics: `dvc metrics show` stays a few columns).
    write_json(root / METRICS, {k: v for k, v in result.metrics().items() if k != "by_reason"})
    write_json(root / "metrics/validate_rejects.json", by_reason)
    return result
