"""The decode stage: every distinct video of the accepted samples, decoded once into lossless frame shards.

Recipe: collect distinct videos (content hash + clip + sampling options) from data/validated/samples.parquet
-> plan each here with qwen-vl-utils' arithmetic -> decode the planned frames in worker processes
(`stages.decode.worker`: ffmpeg, then Qwen's resize; a local pool, or Dask with orchestration.task_runner: dask)
-> write shards, index and rejects atomically. A video that fails becomes a reject row naming the samples that use
it; the other videos go on.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from schemas.errors import StageInputError
from schemas.params import Params
from schemas.tables import DECODE_REJECTS_SCHEMA, FRAME_INDEX_SCHEMA
from stages.cpus import available_cpus
from stages.decode.sampling import SamplingOptions, plan_frames, resize_for, video_key
from stages.decode.shards import INDEX_ARROW, INDEX_FILE, ShardWriter
from stages.decode.video_frames import DecodeError, Targets, fast_resize_error
from stages.decode.worker import FrameListTask, VideoTask, decode_task
from stages.executor import in_local_pool, map_chunks, on_dask
from stages.families import family
from stages.io import atomic_dir, relative_to_root, write_json

SAMPLES = Path("data/validated/samples.parquet")
OUT_DIR = Path("data/frames")
METRICS = Path("metrics/decode.json")


@dataclass(frozen=True)
class VideoJob:
    key: str
    sha256: str
    path: str | None  # a video file, or None for a list of frame images
    frame_paths: tuple[str, ...] | None
    src_frames: int | None
    src_fps: float | None
    src_height: int
    src_width: int
    video_start: float | None
    video_end: float | None


def collect_jobs(root: Path, options: SamplingOptions) -> list[VideoJob]:
    """Distinct videos of the accepted samples, sorted by key (so outputs are deterministic). A job holds no
    sample ids (a video may serve thousands of samples): the rejects look theirs up at the end."""
    samples = root / SAMPLES
    if not samples.is_file():
        raise StageInputError(f"{samples} not found: run `qvl validate` first")
    rows = duckdb.sql(f"""
        SELECT DISTINCT m.sha256, m.path, m.frame_paths, m.nframes, m.fps, m.height, m.width, m.video_start,
               m.video_end
        FROM (SELECT unnest(media) AS m FROM read_parquet('{samples}')) WHERE m.kind = 'video'""").fetchall()
    jobs = [
        VideoJob(
            video_key(sha, options, start, end),
            sha,
            path,
            tuple(frames) if frames else None,
            nframes,
            fps,
            height,
            width,
            start,
            end,
        )
        for sha, path, frames, nframes, fps, height, width, start, end in rows
    ]
    return sorted(jobs, key=lambda j: j.key)


def plan_task(
    job: VideoJob,
    options: SamplingOptions,
    patch_size: int,
    root: Path,
    threads: int,
    resize: str,
    spool: str | None = None,
    compiled: bool = True,
) -> VideoTask | FrameListTask | DecodeError:
    """What a worker decodes for ``job``: its frames and sizes planned here, or the error that stops the plan.
    With ``spool`` the worker hands the frames back through that file (see worker.Decoded); with ``compiled`` the
    exact resize's plans ride in the task."""
    if job.frame_paths:
        paths = tuple(str(root / p) for p in job.frame_paths)
        return FrameListTask(paths, options.element(), patch_size, spool)
    try:
        plan = plan_frames(
            job.src_frames, job.src_fps, job.src_height, job.src_width, options, job.video_start, job.video_end
        )
    except ValueError as exc:  # qwen-vl-utils' range and frame-count checks
        return DecodeError("decode_error", f"{type(exc).__name__}: {exc}")
    fields = {
        "frames_indices": plan.indices,
        "timestamps": plan.timestamps,
        "video_fps": plan.video_fps,
        "total_frames": plan.total_frames,
        "fps_sampled": plan.fps_sampled,
    }
    targets = Targets((plan.height, plan.width), resize_for(len(plan.indices), job.src_width, job.src_height, options))
    plans = exact_plans((job.src_height, job.src_width), targets) if compiled and resize == "exact" else None
    return VideoTask(str(root / job.path), tuple(plan.indices), targets, fields, threads, resize, spool, plans)


def exact_plans(shown: tuple[int, int], targets: Targets) -> dict:
    """The exact resize's compiled plans for a video of ``shown`` (height, width) frames, upright or turned a
    quarter (the rotation is known once a frame is decoded); a pair left out is resized by torch in the worker."""
    from stages.decode.exact_resize import plan_resize  # here: a fast-path run never loads numba's kernels

    pairs = {(shown, targets.size), (shown[::-1], targets.rotated_size)}
    return {pair: plan for pair in pairs if pair[0] != pair[1] and (plan := plan_resize(*pair))}


class IndexWriter:
    """index.parquet (FRAME_INDEX_SCHEMA) and the same rows as index.arrow (memory-mapped by FrameStore), written
    ROWS rows at a time as videos finish: a stage over a million videos never holds a million index rows."""

    ROWS = 4096

    def __init__(self, folder: Path):
        self.writer = pq.ParquetWriter(folder / INDEX_FILE, FRAME_INDEX_SCHEMA)
        self.arrow = pa.ipc.new_file(str(folder / INDEX_ARROW), FRAME_INDEX_SCHEMA)  # owns and closes the file
        self.pending: list[dict] = []
        self.rows = 0

    def add(self, row: dict) -> None:
        self.pending.append(row)
        self.rows += 1
        if len(self.pending) == self.ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            table = pa.Table.from_pylist(self.pending, schema=FRAME_INDEX_SCHEMA)
            self.writer.write_table(table)
            self.arrow.write_table(table)
            self.pending = []

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._flush()
        self.writer.close()
        self.arrow.close()


def rejects_table(root: Path, rejected: list[tuple[VideoJob, DecodeError]]) -> pa.Table:
    """DECODE_REJECTS_SCHEMA rows for the videos that failed, each with the ids of the samples that use it (one
    query over the accepted samples for all of them)."""
    failed = pa.Table.from_pylist(
        [
            {
                "video_key": job.key,
                "sha256": job.sha256,
                "path": job.path,
                "frame_paths": list(job.frame_paths) if job.frame_paths else None,
                "video_start": job.video_start,
                "video_end": job.video_end,
                "reason": error.reason,
                "detail": relative_to_root(error.detail, root),
            }
            for job, error in rejected
        ],
        schema=pa.schema(
            [
                ("video_key", pa.string()),
                ("sha256", pa.string()),
                ("path", pa.string()),
                ("frame_paths", pa.list_(pa.string())),
                ("video_start", pa.float64()),
                ("video_end", pa.float64()),
                ("reason", pa.string()),
                ("detail", pa.string()),
            ]
        ),
    )
    con = duckdb.connect()
    con.register("failed", failed)
    table = con.sql(f"""
        SELECT f.video_key, coalesce(f.path, f.frame_paths[1]) AS path, f.reason, f.detail,
               list(DISTINCT s.sample_id ORDER BY s.sample_id) AS sample_ids
        FROM failed f JOIN (SELECT sample_id, unnest(media) AS m FROM read_parquet('{root / SAMPLES}')) s
          ON s.m.kind = 'video' AND s.m.sha256 = f.sha256 AND s.m.path IS NOT DISTINCT FROM f.path
         AND s.m.frame_paths IS NOT DISTINCT FROM f.frame_paths
         AND s.m.video_start IS NOT DISTINCT FROM f.video_start AND s.m.video_end IS NOT DISTINCT FROM f.video_end
        GROUP BY ALL ORDER BY f.video_key""").to_arrow_table()
    return table.cast(DECODE_REJECTS_SCHEMA)


@dataclass
class ResizeCheck:
    """decode.resize fast, measured: one frame of every FAST_CHECK_EVERY-th video (the first video included)
    against the exact resize."""

    abs_diff_sum: int = 0
    values: int = 0
    max_diff: int = 0
    frames: int = 0

    def measure(self, path: str, index: int, fast_frame) -> None:
        """Add how far ``fast_frame`` (frame ``index`` of ``path``) is from its exact resize. Runs in the stage
        process, so the workers never load torch on the fast path; a frame that fails here goes unmeasured."""
        try:
            check = fast_resize_error(path, index, fast_frame)
        except (DecodeError, OSError, ValueError):
            return
        self.abs_diff_sum += check["abs_diff_sum"]
        self.values += check["values"]
        self.max_diff = max(self.max_diff, check["max_diff"])
        self.frames += 1

    def metrics(self) -> dict:
        mad = self.abs_diff_sum / self.values if self.values else None
        return {
            "fast_resize_mad": mad,
            "fast_resize_max_diff": self.max_diff,
            "fast_resize_frames_checked": self.frames,
        }


FAST_CHECK_EVERY = 8


@dataclass
class DecodeResult:
    videos: int
    decoded: int
    rejected: int
    frames: int
    samples_excluded: int
    shard_bytes: int
    raw_bytes: int
    resize: str
    resize_check: ResizeCheck | None
    seconds: float

    def metrics(self) -> dict:
        figures = {k: v for k, v in vars(self).items() if k not in ("seconds", "resize_check")}
        return figures | (self.resize_check.metrics() if self.resize_check else {})


def run(params: Params, root: Path = Path(".")) -> DecodeResult:
    start = time.perf_counter()
    fam = family(params.dataset_config.processor_config.processor_type)
    options = SamplingOptions.from_config(params.dataset_config, fam)
    jobs = collect_jobs(root, options)
    resize = params.decode.resize
    check = ResizeCheck() if resize == "fast" else None
    cpus = available_cpus()
    workers = params.decode.workers or cpus
    threads = max(1, cpus // workers)
    project = root.resolve()
    rejected, frames_total, raw_bytes = [], 0, 0
    with atomic_dir(root / OUT_DIR) as tmp, IndexWriter(tmp) as index:
        spool = tmp / ".spool" if in_local_pool(workers, params.orchestration) else None
        # No resize plans in Dask's tasks: Dask pickles every task apart (~0.1-0.2 MB of plans each, against ~1 KB);
        # its workers resize by torch, as before
        compiled = not on_dask(params.orchestration)
        if spool:
            spool.mkdir()
        tasks = (
            plan_task(
                job, options, fam.patch_size, project, threads, resize, spool and str(spool / f"{i}.rgb"), compiled
            )
            for i, job in enumerate(jobs)  # by position: two files of the same content are two jobs of one key
        )
        writer = ShardWriter(tmp, params.decode.shard_target_mb * 1024 * 1024)
        exact = resize == "exact"
        results = map_chunks(  # closed on the way out, so no worker writes a spool file after the temp dir goes
            decode_task,
            tasks,
            workers=workers,
            config=params.orchestration,
            name="decode",
            preload=("stages.decode.worker", *(("stages.decode.exact_resize",) if exact else ())),
            start_here=True,  # this process has the worker's modules already
        )
        with contextlib.closing(results):
            for i, (job, result) in enumerate(
                tqdm(zip(jobs, results, strict=True), total=len(jobs), desc="decode", unit="video", disable=None)
            ):
                if isinstance(result, DecodeError):
                    rejected.append((job, result))
                    continue
                frames, fields = result.take_frames(), result.fields
                if check and job.path and i % FAST_CHECK_EVERY == 0:
                    check.measure(str(project / job.path), fields["frames_indices"][0], frames[0])
                shard, group = writer.add(job.key, frames)
                frames_total += len(frames)
                raw_bytes += frames.nbytes
                index.add(
                    {
                        "video_key": job.key,
                        "sha256": job.sha256,
                        "path": job.path or job.frame_paths[0],
                        "is_frame_list": job.frame_paths is not None,
                        "shard": shard,
                        "row_group": group,
                        "nframes": len(frames),
                        "height": frames.shape[1],
                        "width": frames.shape[2],
                        "video_start": job.video_start,
                        "video_end": job.video_end,
                        **fields,
                    }
                )
        writer.close()
        if spool:
            shutil.rmtree(spool)  # empty: each result's file went when it was read
        rejects = rejects_table(root, rejected)
        pq.write_table(rejects, tmp / "rejects.parquet")
    excluded = len(set(rejects.column("sample_ids").combine_chunks().flatten().to_pylist()))
    result = DecodeResult(
        len(jobs),
        index.rows,
        len(rejected),
        frames_total,
        excluded,
        writer.bytes_written,
        raw_bytes,
        resize,
        check,
        time.perf_counter() - start,
    )
    write_json(root / METRICS, result.metrics())
    return result
