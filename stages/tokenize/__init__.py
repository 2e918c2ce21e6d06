"""The tokenize stage: every accepted sample to token ids, labels and vision grids, with the real processor.

Recipe: read accepted samples in batches, drop those whose video failed to decode (recorded as rejects) ->
render and tokenise in parallel worker processes (render.py; a local pool, or Dask with
orchestration.task_runner: dask) -> reject samples longer than packing_length (or stop, when filter_overlong is
false) -> write data/tokenized/samples.parquet and samples.arrow as the chunks come back (output.py: the same
rows, the second an uncompressed Arrow IPC file the trainer memory-maps), then rejects.parquet and
metrics/tokenize.json. Memory does not grow with the dataset (beyond one id per rejected sample).
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from schemas.errors import PipelineError, StageInputError
from schemas.params import Params
from schemas.tables import TOKENIZE_REJECTS_SCHEMA, TOKENIZED_SCHEMA
from stages.cpus import available_cpus
from stages.executor import map_chunks
from stages.io import atomic_dir, write_json
from stages.tokenize.output import TokenizedWriter

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


def _init_worker(params_json: str, root: str) -> None:
    from schemas.params import Params
    from stages.decode.sampling import SamplingOptions
    from stages.decode.shards import FrameStore
    from stages.families import family
    from stages.tokenize.render import SampleRenderer
    from stages.tokenize.vision import VisionArgs

    global _renderer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker per core already
    params = Params.model_validate_json(params_json)
    name = params.dataset_config.processor_config.processor_name
    processor = _loaded[1] if _loaded and _loaded[0] == name else load_processor(params)
    frames_dir = Path(root) / FRAMES
    store = FrameStore(frames_dir) if (frames_dir / "index.parquet").exists() else None
    fam = family(params.dataset_config.processor_config.processor_type)
    sampling = SamplingOptions.from_config(params.dataset_config, fam)
    _renderer = SampleRenderer(processor, VisionArgs.for_processor(processor, params.dataset_config), store, sampling)


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


def _open_inputs(root: Path) -> tuple[pq.ParquetFile, dict[str, dict]]:
    """The accepted samples (read later in batches), and the samples decode excluded (id -> reject fields)."""
    if not (root / SAMPLES).is_file():
        raise StageInputError(f"{root / SAMPLES} not found: run `qvl validate` first")
    samples = pq.ParquetFile(root / SAMPLES)
    has_video = any(
        pc.any(pc.equal(pc.struct_field(pc.list_flatten(batch.column("media")), "kind"), "video")).as_py()
        for batch in samples.iter_batches(batch_size=65536, columns=["media"])
    )
    if has_video and not (root / FRAMES / "index.parquet").is_file():
        raise StageInputError(f"{root / FRAMES} not found: run `qvl decode` first (samples hold videos)")
    excluded = {}
    if has_video:
        for r in pq.read_table(root / FRAMES / "rejects.parquet").to_pylist():
            for sid in r["sample_ids"]:
                excluded[sid] = {"reason": r["reason"], "detail": f"video {r['path']}: {r['detail']}"}
    return samples, excluded


class _Chunks:
    """The samples to tokenize, CHUNK at a time, read from the Parquet file as they are needed; samples decode
    excluded become rejects. ``origins`` holds sample_id -> (source, row) for each chunk handed out and not yet
    collected (a few: the pool reads ahead only as far as it has workers)."""

    COLUMNS = ["sample_id", "source", "row", "messages", "media"]

    def __init__(self, samples: pq.ParquetFile, excluded: dict[str, dict]):
        self.samples, self.excluded = samples, excluded
        self.rejects: list[dict] = []
        self.origins: deque[dict[str, tuple[str, int]]] = deque()

    def __iter__(self) -> Iterator[list[tuple]]:
        for batch in self.samples.iter_batches(batch_size=CHUNK, columns=self.COLUMNS):
            todo, origin = [], {}
            for s in batch.to_pylist():
                if s["sample_id"] in self.excluded:
                    self.rejects.append(
                        {k: s[k] for k in ("sample_id", "source", "row")} | self.excluded[s["sample_id"]]
                    )
                else:
                    todo.append((s["sample_id"], s["messages"], s["media"]))
                    origin[s["sample_id"]] = (s["source"], s["row"])
            if todo:
                self.origins.append(origin)
                yield todo


def run(params: Params, root: Path = Path(".")) -> TokenizeResult:
    global _loaded
    start = time.perf_counter()
    processor = load_processor(params)  # fail fast, in this process, with a clear message
    # Workers may run in another directory (Dask): they get the processor directory as an absolute path.
    worker_params = params.model_copy(deep=True)
    name = str(Path(params.dataset_config.processor_config.processor_name).resolve())
    worker_params.dataset_config.processor_config.processor_name = name
    _loaded = (name, processor)
    vocab = {b"tokenizer_vocab_size": str(len(processor.tokenizer)).encode()}
    samples, excluded = _open_inputs(root)
    chunks = _Chunks(samples, excluded)
    total = samples.metadata.num_rows
    # One worker for a small dataset: worker start-up (seconds) would cost more than the work.
    workers = max(1, min(available_cpus(), -(-total // CHUNK)))
    results = map_chunks(
        _render_chunk,
        chunks,
        workers=workers,
        config=params.orchestration,
        name="tokenize",
        init=_init_worker,
        init_args=(worker_params.model_dump_json(by_alias=True), str(root.resolve())),
    )
    cap = params.dataset_config.packing_length
    overlong, tokens, label_tokens, kept = [], 0, 0, 0
    with (
        atomic_dir(root / OUT_DIR) as tmp,
        TokenizedWriter(tmp, TOKENIZED_SCHEMA.with_metadata(vocab)) as out,
        tqdm(total=total - len(excluded), desc="tokenize", unit="sample", disable=None) as bar,
    ):
        for table in results:
            origin = chunks.origins.popleft()
            too_long = pc.greater(table.column("length"), cap)
            for r in table.filter(too_long).select(["sample_id", "length"]).to_pylist():
                source, row = origin[r["sample_id"]]
                overlong.append({"sample_id": r["sample_id"], "source": source, "row": row, "length": r["length"]})
            table = table.filter(pc.invert(too_long))
            out.write(table)
            kept += table.num_rows
            tokens += int(pc.sum(table.column("length")).as_py() or 0)
            label_tokens += int(pc.sum(table.column("label_tokens")).as_py() or 0)
            bar.update(len(origin))
        if overlong and not params.dataset_config.filter_overlong:
            listed = ", ".join(f"{r['sample_id']} ({r['length']} tokens)" for r in overlong[:20])
            raise PipelineError(
                f"{len(overlong)} sample(s) longer than packing_length {cap} and filter_overlong is "
                f"false: {listed}{' ...' if len(overlong) > 20 else ''}"
            )
        rejects = chunks.rejects + [
            r | {"reason": "overlong", "detail": f"{r['length']} tokens > packing_length {cap}"} for r in overlong
        ]
        pq.write_table(pa.Table.from_pylist(rejects, schema=TOKENIZE_REJECTS_SCHEMA), tmp / "rejects.parquet")
    by_reason = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    result = TokenizeResult(total, kept, len(rejects), by_reason, tokens, label_tokens, time.perf_counter() - start)
    if result.tokenized + result.rejected != result.input:
        raise AssertionError(f"tokenize lost samples: {result.input} != {result.tokenized} + {result.rejected}")
    write_json(root / METRICS, result.metrics())
    write_json(root / REJECTS, result.by_reason)
    return result
