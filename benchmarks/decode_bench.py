"""Decode benchmarks (issues 3 and 19): stage throughput (resize exact and fast) vs the plain ffmpeg CLI, shard
fetch vs on-the-fly decoding, and shard size per frame.

Usage: python benchmarks/decode_bench.py [--videos 12] [--seconds 10] [--repeats 3]
Clips are 640x360 30 fps H.264 with noise added (so they compress like camera footage, not like a test card).
The stage (exact, then fast) and the CLI run interleaved ``--repeats`` times, and the ratios reported are the
medians of each round's: on a shared VM the CLI alone moved 150-193 frames/s between runs of the same clips.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import yaml

REPO = Path(__file__).resolve().parent.parent
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def make_clips(root: Path, n: int, seconds: float) -> list[str]:
    names = []
    for i in range(n):
        name = f"clip{i}.mp4"
        src = ffmpeg.input(f"testsrc2=duration={seconds}:size=640x360:rate=30", f="lavfi")
        src = src.filter("noise", alls=12, allf="t+u").filter("hue", h=i * 30)
        src.output(
            str(root / name), vcodec="libx264", pix_fmt="yuv420p", movflags="+faststart", preset="veryfast", crf=23
        ).overwrite_output().run(cmd=FFMPEG, quiet=True)
        names.append(name)
    return names


def cli_same_frames(root: Path, rows: list[dict], workers: int) -> tuple[int, float]:
    """The plain ffmpeg CLI pulling the same frames at the same size (select + bicubic scale), same parallelism;
    ``rows``: the frame index rows of the stage's output."""
    procs, frames, start = [], 0, time.perf_counter()
    for row in rows:
        select = "+".join(f"eq(n\\,{i})" for i in row["frames_indices"])
        cmd = [
            FFMPEG,
            "-v",
            "error",
            "-threads",
            "1",
            "-i",
            str(root / row["path"]),
            "-vf",
            f"select={select},scale={row['width']}:{row['height']}:flags=bicubic",
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-threads",
            "1",
            "-",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        frames += row["nframes"]
        while sum(p.poll() is None for p in procs) >= workers:
            time.sleep(0.001)
    for p in procs:
        p.wait()
    return frames, time.perf_counter() - start


STAGE = """import json, sys
from pathlib import Path
from schemas.params import load_params
from stages.decode.stage import run
r = run(load_params(sys.argv[2]), Path(sys.argv[1]))
print(json.dumps({**r.metrics(), "seconds": r.seconds}))
"""


def stage_run(root: Path, params_file: Path) -> dict:
    """The decode stage in a fresh interpreter, as DVC and the flows run it (its pool starts cold: the forkserver
    imports the workers' modules each time): its metrics and its own timing (without the interpreter's imports)."""
    cmd = [sys.executable, "-c", STAGE, str(root), str(params_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    # The project's modules, once the repository is on the path (the stage itself runs in fresh interpreters).
    sys.path.insert(0, str(REPO))
    from schemas.params import parse_params
    from stages.cpus import available_cpus
    from stages.decode.shards import FrameStore
    from stages.validate import run as validate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of exact, CLI, fast (medians reported)")
    args = ap.parse_args()
    workers = available_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data/videos").mkdir(parents=True)
        names = make_clips(root / "data/videos", args.videos, args.seconds)
        rows = [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "video", "video": f"videos/{n}"}]},
                        {"role": "assistant", "content": n},
                    ]
                }
            )
            for n in names
        ]
        (root / "data/rows.jsonl").write_text("\n".join(rows) + "\n")
        params = parse_params(
            {
                "dataset_config": {
                    "datasets": [{"path": "data/rows.jsonl", "data_folder": "data"}],
                    "fps": 2.0,
                    "video_max_pixels": 602112,
                },
                "validate": {"media_cache": ".cache/m.duckdb"},
            }
        )
        validate(params, root)
        dumped = params.model_dump(by_alias=True, mode="json")
        files = {resize: root / f"params-{resize}.yaml" for resize in ("exact", "fast")}
        for resize, file in files.items():
            file.write_text(yaml.safe_dump({**dumped, "decode": {**dumped["decode"], "resize": resize}}))
        result = stage_run(root, files["exact"])
        store = FrameStore(root / "data/frames")
        rows = [store[k] for k in store]  # what the CLI is asked for, kept: the fast runs replace the shards
        keys = [row["video_key"] for row in rows]
        start = time.perf_counter()
        fetched = sum(len(store.get(k).frames) for _ in range(5) for k in keys)
        shard_fps = fetched / (time.perf_counter() - start)
        from qwen_vl_utils import fetch_video, vision_process

        start, decoded = time.perf_counter(), 0
        for row in rows:  # the peers' way: decode in the data loader, per sample
            decoded += len(fetch_video({"video": str(root / row["path"]), "fps": 2.0, "max_pixels": 602112}))
        fly_fps = decoded / (time.perf_counter() - start)
        print(
            f"train-time fetch: shards {shard_fps:.0f} frames/s vs on-the-fly qwen-vl-utils "
            f"({vision_process.get_video_reader_backend()}) {fly_fps:.0f} frames/s -> {shard_fps / fly_fps:.0f}x "
            "(goal >= 20x)"
        )
        per_frame, raw = result["shard_bytes"] / result["frames"], result["raw_bytes"] / result["frames"]
        print(
            f"shard size: {per_frame / 1024:.0f} KiB per sampled frame vs {raw / 1024:.0f} KiB raw RGB "
            f"({raw / per_frame:.2f}x smaller; Parquet, zstd level 1, lossless)"
        )
        rounds = []
        for i in range(args.repeats):
            if i:
                result = stage_run(root, files["exact"])
            cli_frames, cli_seconds = cli_same_frames(root, rows, workers)
            fast = stage_run(root, files["fast"])
            fps = (result["frames"] / result["seconds"], fast["frames"] / fast["seconds"], cli_frames / cli_seconds)
            rounds.append(fps)
            print(
                f"round {i + 1}: stage exact {fps[0]:.0f}, fast {fps[1]:.0f}, CLI {fps[2]:.0f} frames/s "
                f"({result['frames']} sampled frames from {result['decoded']} videos, {workers} workers)"
            )
        print(
            f"resize fast against exact: MAD {fast['fast_resize_mad']:.3f}, largest difference "
            f"{fast['fast_resize_max_diff']} ({fast['fast_resize_frames_checked']} frames checked)"
        )
        exact_ratio = statistics.median(e / c for e, _, c in rounds)
        fast_ratio = statistics.median(f / c for _, f, c in rounds)
        print(
            f"median of {len(rounds)} rounds: exact is {exact_ratio:.2f}x the plain ffmpeg CLI (same frames and "
            f"size; goal >= 0.8x), fast {fast_ratio:.2f}x (goal >= 1x)"
        )


if __name__ == "__main__":
    main()
