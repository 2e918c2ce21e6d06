"""The tokenize stage: every accepted sample to token ids, labels and vision grids, with the real processor.

Recipe: read accepted samples, drop those whose video failed to decode (recorded as rejects) -> render and
tokenise in parallel worker processes (render.py; a local pool, or Dask with orchestration.task_runner: dask)
-> reject samples longer than packing_length (or stop, when filter_overlong is false) -> write
data/tokenized/{samples,rejects}.parquet, samples.arrow (the same rows as an uncompressed Arrow IPC file, which
the trainer memory-maps) and metrics/tokenize.json.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from schemas.errors import PipelineError, StageInputError
from schemas.params import Params
from schemas.tables import TOKENIZE_REJECTS_SCHEMA, TOKENIZED_SCHEMA
from stages.arrowfile import write_arrow
from stages.executor import map_chunks
from stages.io import atomic_dir, write_json

SAMPLES = Path("data/validated/samples.parquet")
FRAMES = Path("data/frames")
OUT_DIR = Path("data/tokenized")
METRICS = Path("metrics/tokenize.json")
REJECTS = Path("metrics/tokenize_rejects.json")  # counts by reason: a table of its own, not DVC metrics
CHUNK = 256

_renderer = None  # one per worker process
_loaded = None  # (processor_name, processor) that run() loaded, reused when the chunks run in its own process


def load_processor(params: Params):
    """The processor named in params (a local directory; nothing is downloaded)."""
    from transformers import AutoProcessor

    name = params.dataset_config.processor_config.processor_name
    if not Path(name).is_dir():
        raise StageInputError(
            f"processor directory not found: {name} (dataset_config.processor_config."
            "processor_name must be a local model directory; run `qvl setup-demo` for the demo)"
        )
    try:
        return AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise StageInputError(f"cannot load the processor from {name}: {exc}") from None


def _init_worker(params_json: str, root: str, video_keys: dict) -> None:
    from schemas.params import Params
    from stages.decode.shards import FrameStore
    from stages.tokenize.render import SampleRenderer
    from stages.tokenize.vision import VisionArgs

    global _renderer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker per core already
    params = Params.model_validate_json(params_json)
    name = params.dataset_config.processor_config.processor_name
    processor = _loaded[1] if _loaded and _loaded[0] == name else load_processor(params)
    frames_dir = Path(root) / FRAMES
    store = FrameStore(frames_dir) if (frames_dir / "index.parquet").exists() else None
    _renderer = SampleRenderer(processor, VisionArgs.for_processor(processor, params.dataset_config), store, video_keys)


def _render_chunk(chunk: list[tuple]) -> pa.Table:
    """Runs in a worker: one chunk of samples as an Arrow table (cheap to send back, unlike Python lists)."""
    rows = [asdict(t) for t in _renderer.render(chunk)]
    for r in rows:
        r["length"] = len(r["input_ids"])
        r["label_tokens"] = sum(1 for x in r["labels"] if x != -100)
    return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)


@dataclass
class TokenizeResult:
    input: int
    tokenized: int
    rejected: int
    by_reason: dict[str, int]
    tokens: int
    label_tokens: int
    seconds: float

    def metrics(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("seconds", "by_reason")}


def _read_inputs(root: Path, params: Params) -> tuple[list[dict], dict[str, dict], dict]:
    """Accepted samples, samples excluded by decode (id -> reject row), and (sha, start, end) -> video_key."""
    from stages.decode.sampling import SamplingOptions, video_key
    from stages.families import family

    if not (root / SAMPLES).is_file():
        raise StageInputError(f"{root / SAMPLES} not found: run `qvl validate` first")
    samples = pq.read_table(root / SAMPLES, columns=["sample_id", "source", "row", "messages", "media"]).to_pylist()
    has_video = any(m["kind"] == "video" for s in samples for m in s["media"])
    if has_video and not (root / FRAMES / "index.parquet").is_file():
        raise StageInputError(f"{root / FRAMES} not found: run `qvl decode` first (samples hold videos)")
    excluded, keys = {}, {}
    if has_video:
        for r in pq.read_table(root / FRAMES / "rejects.parquet").to_pylist():
            for sid in r["sample_ids"]:
                excluded[sid] = {"reason": r["reason"], "detail": f"video {r['path']}: {r['detail']}"}
        options = SamplingOptions.from_config(
            params.dataset_config, family(params.dataset_config.processor_config.processor_type)
        )
        keys = {
            (m["sha256"], m["video_start"], m["video_end"]): video_key(
                m["sha256"], options, m["video_start"], m["video_end"]
            )
            for s in samples
            for m in s["media"]
            if m["kind"] == "video"
        }
    return samples, excluded, keys


def run(params: Params, root: Path = Path(".")) -> TokenizeResult:
    global _loaded
    start = time.perf_counter()
    processor = load_processor(params)  # fail fast, in this process, with a clear message
    # Workers may run in another directory (Dask): they get the processor directory as an absolute path.
    worker_params = params.model_copy(deep=True)
    name = str(Path(params.dataset_config.processor_config.processor_name).resolve())
    worker_params.dataset_config.processor_config.processor_name = name
    _loaded = (name, processor)
    vocab_size = len(processor.tokenizer)
    samples, excluded, keys = _read_inputs(root, params)
    rejects = [
        {"sample_id": s["sample_id"], "source": s["source"], "row": s["row"], **excluded[s["sample_id"]]}
        for s in samples
        if s["sample_id"] in excluded
    ]
    todo = [s for s in samples if s["sample_id"] not in excluded]
    chunks = [
        [(s["sample_id"], s["messages"], s["media"]) for s in todo[i : i + CHUNK]] for i in range(0, len(todo), CHUNK)
    ]
    workers = max(1, min(os.cpu_count() or 1, len(chunks)))
    init_args = (worker_params.model_dump_json(by_alias=True), str(root.resolve()), keys)
    # One worker for a small dataset: worker start-up (seconds) would cost more than the work.
    results = map_chunks(
        _render_chunk,
        chunks,
        workers=workers,
        config=params.orchestration,
        name="tokenize",
        init=_init_worker,
        init_args=init_args,
    )
    tables = list(tqdm(results, total=len(chunks), desc="tokenize", unit="chunk", disable=None))
    table = pa.concat_tables(tables) if tables else TOKENIZED_SCHEMA.empty_table()
    cap = params.dataset_config.packing_length
    too_long = pc.greater(table.column("length"), cap)
    overlong = table.filter(too_long).select(["sample_id", "length"]).to_pylist()
    if overlong and not params.dataset_config.filter_overlong:
        listed = ", ".join(f"{r['sample_id']} ({r['length']} tokens)" for r in overlong[:20])
        raise PipelineError(
            f"{len(overlong)} sample(s) longer than packing_length {cap} and filter_overlong is "
            f"false: {listed}{' ...' if len(overlong) > 20 else ''}"
        )
    source_of = {s["sample_id"]: s for s in todo}
    for r in overlong:
        s = source_of[r["sample_id"]]
        rejects.append(
            {
                "sample_id": r["sample_id"],
                "source": s["source"],
                "row": s["row"],
                "reason": "overlong",
                "detail": f"{r['length']} tokens > packing_length {cap}",
            }
        )
    kept = table.filter(pc.invert(too_long))
    with atomic_dir(root / OUT_DIR) as tmp:
        vocab = {b"tokenizer_vocab_size": str(vocab_size).encode()}
        kept = kept.replace_schema_metadata(vocab)
        pq.write_table(kept, tmp / "samples.parquet", compression="zstd")
        write_arrow(kept, tmp / "samples.arrow")  # the same rows, memory-mappable: what the trainer reads
        pq.write_table(pa.Table.from_pylist(rejects, schema=TOKENIZE_REJECTS_SCHEMA), tmp / "rejects.parquet")
    by_reason = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    result = TokenizeResult(
        len(samples),
        kept.num_rows,
        len(rejects),
        by_reason,
        int(pc.sum(kept.column("length")).as_py() or 0),
        int(pc.sum(kept.column("label_tokens")).as_py() or 0),
        time.perf_counter() - start,
    )
    if result.tokenized + result.rejected != result.input:
        raise AssertionError(f"tokenize lost samples: {result.input} != {result.tokenized} + {result.rejected}")
    write_json(root / METRICS, result.metrics())
    write_json(root / REJECTS, result.by_reason)
    return result
