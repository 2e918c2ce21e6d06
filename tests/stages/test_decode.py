"""The decode stage against qwen-vl-utils' own fetch_video (decord reader), plus rejects, determinism, kill/rerun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.errors import ConfigError, PipelineError, StageInputError
from schemas.params import parse_params
from stages.decode.sampling import SamplingOptions
from stages.decode.shards import FrameStore
from stages.decode.stage import run as decode
from stages.families import family
from stages.validate import run as validate
from tests.conftest import DECODE_IN_PROCESS, REPO, fill_disk

# Extra clips beside the demo's: NTSC fps, odd sizes, a long thin one (name: seconds, fps, width, height).
EXTRA_CLIPS = {"ntsc.mp4": (2.0, 29.97, 333, 251), "long.mp4": (6.0, 15, 160, 96), "odd.mp4": (1.2, 12, 97, 131)}


def make_clip(path: Path, seconds: float, fps: float, width: int, height: int) -> None:
    src = ffmpeg.input(f"testsrc2=duration={seconds}:size={width}x{height}:rate={fps}", f="lavfi")
    out = src.output(str(path), vcodec="libx264", pix_fmt="yuv420p", movflags="+faststart")
    out.overwrite_output().run(cmd=imageio_ffmpeg.get_ffmpeg_exe(), quiet=True)


def video_rows(names_and_clips: list[tuple[str, float | None, float | None]]) -> str:
    rows = []
    for name, start, end in names_and_clips:
        part = {"type": "video", "video": f"videos/{name}"}
        if start is not None:
            part["video_start"] = start
        if end is not None:
            part["video_end"] = end
        rows.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": [part, {"type": "text", "text": name}]},
                        {"role": "assistant", "content": f"{name} {start} {end}"},
                    ]
                }
            )
        )
    return "\n".join(rows) + "\n"


CLIPS = [
    ("walk.mp4", None, None),
    ("talk.mp4", 0.5, 1.5),
    ("slow.mp4", 1.0, 4.0),
    ("tall.mp4", None, None),
    ("ntsc.mp4", 0.3, None),
    ("long.mp4", None, 5.0),
    ("odd.mp4", None, None),
]


def video_params(family_name: str, **video):
    return parse_params(
        {
            "dataset_config": {
                "datasets": [{"path": "data/demo/videos.jsonl", "data_folder": "data/demo"}],
                "processor_config": {"processor_type": family_name},
                **video,
            },
            "validate": {"media_cache": ".cache/media.duckdb"},
            "decode": DECODE_IN_PROCESS,
        }
    )


@pytest.fixture(scope="session")
def extra_clips(tmp_path_factory) -> Path:
    """The extra clips, encoded once per session."""
    folder = tmp_path_factory.mktemp("extra-clips")
    for name, spec in EXTRA_CLIPS.items():
        make_clip(folder / name, *spec)
    return folder


@pytest.fixture
def video_project(project, extra_clips):
    for name in EXTRA_CLIPS:
        shutil.copy(extra_clips / name, project / "data/demo/videos" / name)
    (project / "data/demo/videos.jsonl").write_text(video_rows(CLIPS))
    return project


OPTION_SETS = [
    {"video_min_pixels": 12544, "video_max_pixels": 50176, "video_max_frames": 16},
    {"fps": 4.0, "video_max_frames": 8},
    {},
]


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=["small", "fps4", "defaults"])
def test_frames_equal_qwen_vl_utils_fetch_video(video_project, family_name, options):
    from qwen_vl_utils import vision_process as qvu

    assert qvu.get_video_reader_backend() == "decord"  # the reference reader works here; torchvision's does not
    params = video_params(family_name, **options)
    validate(params, video_project)
    result = decode(params, video_project)
    assert result.decoded == len(CLIPS) and result.rejected == 0
    store = FrameStore(video_project / "data/frames")
    opts = SamplingOptions.from_config(params.dataset_config, family(family_name))
    by_clip = {(Path(r["path"]).name, r["video_start"], r["video_end"]): key for key, r in store.items()}
    for name, start, end in CLIPS:
        mine = store.get(by_clip[(name, start, end)])
        ele = {"video": str(video_project / "data/demo/videos" / name), **opts.element(start, end)}
        ref, meta = qvu.fetch_video(ele, image_patch_size=family(family_name).patch_size, return_video_metadata=True)
        ref = ref.permute(0, 2, 3, 1).numpy()
        assert mine.frames.shape == ref.shape, name
        assert mine.info["frames_indices"] == list(meta["frames_indices"]), name
        assert mine.info["total_frames"] == meta["total_num_frames"]
        assert mine.info["video_fps"] == pytest.approx(meta["fps"])
        worst = np.abs(mine.frames.astype(np.int16) - np.rint(ref).astype(np.int16)).max(axis=(1, 2, 3))
        assert worst.max() <= 1, f"{name}: frames {np.flatnonzero(worst > 1).tolist()} differ by up to {worst.max()}"
        assert mine.frames.shape[0] % 2 == 0  # an even count: the temporal patch reshape never breaks


def decode_with_ffmpeg_cli(path: Path) -> np.ndarray:
    """One image decoded by the ffmpeg command line at its own size: uint8 (H, W, 3)."""
    from PIL import Image

    width, height = Image.open(path).size  # the header only; the pixels come from ffmpeg
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(height, width, 3)


def resize_like_torchvision(image: np.ndarray, height: int, width: int) -> np.ndarray:
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    chw = torch.from_numpy(image.copy()).permute(2, 0, 1)
    return tvf.resize(chw, [height, width], InterpolationMode.BICUBIC, antialias=True).permute(1, 2, 0).numpy()


def test_frame_list_video_equals_independently_decoded_frames(project):
    """A video given as a list of JPEG frames: each stored frame is its source JPEG, decoded by the ffmpeg
    command line and resized (bicubic, antialias) to the stored size; frames in order, the last one repeated
    to reach an even count, the size a multiple of the family's factor."""
    params = parse_params(
        {
            "dataset_config": {
                "datasets": [
                    {"path": "data/demo/qwen_utils.parquet", "data_folder": "data/demo", "data_type": "parquet"}
                ]
            },
            "validate": {"media_cache": ".cache/media.duckdb"},
            "decode": DECODE_IN_PROCESS,
        }
    )
    validate(params, project)
    decode(params, project)
    store = FrameStore(project / "data/frames")
    (key,) = [k for k, r in store.items() if r["is_frame_list"]]
    mine = store.get(key).frames
    sources = [project / f"data/demo/frames/clip/{i:03d}.jpg" for i in range(6)]
    assert mine.shape[0] == 6 and mine.shape[0] % 2 == 0
    height, width = mine.shape[1:3]
    factor = family("qwen2_5_vl").image_factor
    assert height % factor == 0 and width % factor == 0
    for i, source in enumerate(sources):
        ref = resize_like_torchvision(decode_with_ffmpeg_cli(source), height, width)
        errors = [np.abs(frame.astype(np.int16) - ref.astype(np.int16)).mean() for frame in mine]
        assert errors[i] < 2.0, f"frame {i} is not {source.name} (mean error {errors[i]:.2f})"
        assert int(np.argmin(errors)) == i, f"{source.name} is closest to stored frame {int(np.argmin(errors))}"


def test_demo_truncated_video_is_rejected_with_its_samples(project):
    params = parse_params(
        {
            "dataset_config": {"datasets": [{"path": "data/demo/chat.jsonl", "data_folder": "data/demo"}]},
            "validate": {"media_cache": ".c/m.duckdb"},
            "decode": DECODE_IN_PROCESS,
        }
    )
    validate(params, project)
    result = decode(params, project)
    rejects = pq.read_table(project / "data/frames/rejects.parquet").to_pylist()
    assert [r["reason"] for r in rejects] == ["truncated_video"]
    assert rejects[0]["path"].endswith("truncated.mp4") and "decoded" in rejects[0]["detail"]
    samples = pq.read_table(project / "data/validated/samples.parquet").to_pylist()
    truncated = [
        s["sample_id"] for s in samples if any((m["path"] or "").endswith("truncated.mp4") for m in s["media"])
    ]
    assert rejects[0]["sample_ids"] == truncated
    metrics = json.loads((project / "metrics/decode.json").read_text())
    assert metrics["videos"] == metrics["decoded"] + metrics["rejected"] == result.videos
    assert metrics["samples_excluded"] == 1
    assert len(FrameStore(project / "data/frames")) == result.decoded
    first = (project / "data/frames/rejects.parquet").read_bytes()
    decode(params, project)  # a reject's detail holds no per-run value (ffmpeg's object addresses are stripped)
    assert (project / "data/frames/rejects.parquet").read_bytes() == first
    assert " @ 0x" not in rejects[0]["detail"]


def test_output_is_byte_identical_on_rerun_and_from_a_worker_pool(video_project):
    params = video_params("qwen2_5_vl", video_min_pixels=12544, video_max_pixels=50176)
    validate(params, video_project)
    decode(params, video_project)
    first = {p.name: p.read_bytes() for p in (video_project / "data/frames").iterdir()}
    pool = params.model_copy(update={"decode": params.decode.model_copy(update={"workers": 2})})
    decode(pool, video_project)
    assert {p.name: p.read_bytes() for p in (video_project / "data/frames").iterdir()} == first


def test_fast_resize_is_close_to_exact_and_reports_how_close(video_project):
    """decode.resize fast (ffmpeg's bicubic scaler): the same frames and sizes as exact, pixels close; the stage's
    metrics report the difference it measured, which equals the difference of the first video's first frame."""
    exact_params = video_params("qwen2_5_vl", video_min_pixels=12544, video_max_pixels=50176)
    fast_params = exact_params.model_copy(update={"decode": exact_params.decode.model_copy(update={"resize": "fast"})})
    validate(exact_params, video_project)
    decode(exact_params, video_project)
    exact_metrics = json.loads((video_project / "metrics/decode.json").read_text())
    assert exact_metrics["resize"] == "exact" and "fast_resize_mad" not in exact_metrics
    exact = FrameStore(video_project / "data/frames")
    exact_frames = {key: exact.get(key).frames.copy() for key in exact}
    decode(fast_params, video_project)
    fast = FrameStore(video_project / "data/frames")
    assert sorted(fast) == sorted(exact_frames)
    for key, frames in exact_frames.items():
        mine = fast.get(key)
        assert mine.frames.shape == frames.shape and mine.info["frames_indices"] == exact[key]["frames_indices"]
        diff = np.abs(mine.frames.astype(np.int16) - frames.astype(np.int16))
        assert 0 < diff.mean() < 1, key  # close, and not the exact path by mistake
    first = sorted(exact_frames)[0]  # FAST_CHECK_EVERY: the first video in key order is always checked
    diff = np.abs(fast.get(first).frames[0].astype(np.int16) - exact_frames[first][0].astype(np.int16))
    metrics = json.loads((video_project / "metrics/decode.json").read_text())
    assert metrics["resize"] == "fast" and metrics["fast_resize_frames_checked"] == 1
    assert metrics["fast_resize_mad"] == pytest.approx(diff.mean()) and metrics["fast_resize_max_diff"] == diff.max()


def test_missing_validate_output_is_a_clear_error(project):
    with pytest.raises(StageInputError, match="run `qvl validate` first"):
        decode(video_params("qwen2_5_vl"), project)


def test_inconsistent_pixel_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="video_max_pixels"):
        SamplingOptions.from_config(
            video_params("qwen2_5_vl", video_max_pixels=1000).dataset_config, family("qwen2_5_vl")
        )


def test_full_disk_is_reported_and_nothing_replaced(small_fs, demo_dir):
    """A real full filesystem while the frame shards are written: one clear error, the previous frames kept,
    no temp directory left."""
    root = small_fs / "project"
    shutil.copytree(demo_dir, root / "data/demo")
    (root / "data/demo/videos.jsonl").write_text(video_rows(CLIPS[:4]))
    params = video_params("qwen2_5_vl", video_min_pixels=12544, video_max_pixels=50176)
    validate(params, root)
    decode(params, root)
    before = {p.name: p.read_bytes() for p in (root / "data/frames").iterdir()}
    fill_disk(small_fs)
    with pytest.raises(PipelineError, match=r"disk full while writing .*data/frames; nothing was replaced"):
        decode(params, root)
    assert {p.name: p.read_bytes() for p in (root / "data/frames").iterdir()} == before
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".frames.tmp")]


def kill_when(proc: subprocess.Popen, ready, seconds: float = 300) -> None:
    """SIGKILL ``proc``'s process group as soon as ``ready()`` holds; fail if it exited first."""
    deadline = time.time() + seconds
    while not ready():
        assert proc.poll() is None, f"the stage exited ({proc.returncode}) before the moment to kill it"
        assert time.time() < deadline, "the moment to kill never came"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the kill did not land: the stage had already finished"


@pytest.mark.slow
def test_killed_run_leaves_old_output_or_nothing_and_rerun_completes(video_project):
    """SIGKILL the stage while it is provably writing (its temp directory exists, then once it holds a shard):
    right after the kill the temp directory is there and the visible output is the previous one or absent;
    the rerun removes the leftover and writes the same bytes as an uninterrupted run."""
    params_file = video_project / "params.yaml"
    params_file.write_text(json.dumps(video_params("qwen2_5_vl").model_dump(by_alias=True, mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    data = video_project / "data"

    def stage(name: str) -> list[str]:
        return [sys.executable, "-m", f"stages.{name}", "--params", str(params_file)]

    def frames() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (data / "frames").iterdir()}

    def temps() -> list[Path]:
        return [p for p in data.iterdir() if p.name.startswith(".frames.tmp")]

    for name in ("validate", "decode"):
        subprocess.run(stage(name), cwd=video_project, env=env, check=True, capture_output=True)
    reference = frames()
    shutil.rmtree(data / "frames")
    moments = {
        "temp directory created": lambda: bool(temps()),
        "a shard written": lambda: any(t.iterdir() for t in temps() if t.exists()),
    }
    for previous_output, (moment, ready) in zip((False, True), moments.items(), strict=True):
        for leftover in temps():
            shutil.rmtree(leftover)
        if previous_output:
            (data / "frames").mkdir()
            for name, content in reference.items():
                (data / "frames" / name).write_bytes(content)
        proc = subprocess.Popen(
            stage("decode"),
            cwd=video_project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        kill_when(proc, ready)
        assert temps(), f"killed at '{moment}': the temp directory should still be there"
        if previous_output:
            assert frames() == reference, f"killed at '{moment}': the previous output changed"
        else:
            assert not (data / "frames").exists(), f"killed at '{moment}': a half output was published"
    subprocess.run(stage("decode"), cwd=video_project, env=env, check=True, capture_output=True)
    assert frames() == reference
    assert not temps()


def ffmpeg_cli(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def edge_clips(tmp_path_factory) -> Path:
    """A clip with a 90-degree display rotation, a variable-frame-rate clip (30 fps, then 7.5, then 30 again)
    and a one-frame clip, made with the ffmpeg command line."""
    folder = tmp_path_factory.mktemp("edge-clips")
    src = ["-f", "lavfi", "-i"]
    x264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    ffmpeg_cli(*src, "testsrc2=duration=2:size=160x96:rate=10", *x264, str(folder / "plain.mp4"))
    ffmpeg_cli("-display_rotation", "90", "-i", str(folder / "plain.mp4"), "-c", "copy", str(folder / "rotated.mp4"))
    vfr = "setpts='if(lt(N,30),N/30,if(lt(N,45),1+(N-30)/7.5,3+(N-45)/30))/TB'"
    ffmpeg_cli(
        *src, "testsrc2=duration=3:size=160x96:rate=30", "-vf", vfr, "-fps_mode", "vfr", *x264, str(folder / "vfr.mp4")
    )
    ffmpeg_cli(*src, "testsrc2=duration=0.1:size=160x96:rate=10", *x264, str(folder / "one_frame.mp4"))
    return folder


EDGE_CLIPS = [
    ("vfr.mp4", None, None),
    ("vfr.mp4", 0.5, 2.5),
    ("one_frame.mp4", None, None),
    ("rotated.mp4", None, None),
]
PAST_THE_END = ("walk.mp4", 0.5, 99.0)  # video_end past the end of the clip: validate rejects it (no clamping)


@pytest.mark.parametrize("options", [{"fps": 2.0}, {"video_sampling_strategy": "frame_num", "frame_num": 6}])
def test_edge_clips_follow_fetch_video(project, edge_clips, options):
    """Where qwen-vl-utils' fetch_video decodes a clip, the stored frames equal its frames (every frame within 1);
    where it refuses one, the stage rejects that video with a reason instead of failing."""
    from qwen_vl_utils import vision_process as qvu

    for name in ("rotated.mp4", "vfr.mp4", "one_frame.mp4"):
        shutil.copy(edge_clips / name, project / "data/demo/videos" / name)
    (project / "data/demo/videos.jsonl").write_text(video_rows([*EDGE_CLIPS, PAST_THE_END]))
    params = video_params("qwen2_5_vl", video_min_pixels=12544, video_max_pixels=50176, **options)
    validate(params, project)
    decode(params, project)
    store = FrameStore(project / "data/frames")
    by_clip = {(Path(r["path"]).name, r["video_start"], r["video_end"]): key for key, r in store.items()}
    rejected = {Path(r["path"]).name: r for r in pq.read_table(project / "data/frames/rejects.parquet").to_pylist()}
    validate_rejects = pq.read_table(project / "data/validated/rejects.parquet").to_pylist()
    assert [(r["reason"], r["detail"]) for r in validate_rejects] == [
        ("bad_clip_range", "clip 0.5-99.0 s of a 3.0 s video")
    ]
    opts = SamplingOptions.from_config(params.dataset_config, family("qwen2_5_vl"))
    for name, start, end in EDGE_CLIPS:
        ele = {"video": str(project / "data/demo/videos" / name), **opts.element(start, end)}
        try:
            ref, meta = qvu.fetch_video(ele, image_patch_size=14, return_video_metadata=True)
        except Exception as exc:  # noqa: BLE001 (any refusal of the reference must be a reject here)
            assert name in rejected and (name, start, end) not in by_clip, f"{name}: fetch_video refused ({exc})"
            assert rejected[name]["reason"] and rejected[name]["detail"]
            continue
        assert (name, start, end) in by_clip, (
            f"{name} {start}-{end}: rejected, fetch_video decodes it: {rejected.get(name)}"
        )
        mine = store.get(by_clip[(name, start, end)])
        ref = np.rint(ref.permute(0, 2, 3, 1).numpy()).astype(np.int16)
        assert mine.frames.shape == ref.shape, name
        assert mine.info["frames_indices"] == list(meta["frames_indices"]), name
        worst = np.abs(mine.frames.astype(np.int16) - ref).max(axis=(1, 2, 3))
        assert worst.max() <= 1, f"{name} {start}-{end}: frames {np.flatnonzero(worst > 1).tolist()} differ"


def test_frame_store_finds_every_video_by_key_from_an_index_written_in_batches(tmp_path, monkeypatch):
    """Keys out of order, an index written a few rows at a time: each key finds its own frames and index row,
    an unknown key is a KeyError, and a pickled store (what worker processes receive) re-maps the index; the
    Parquet index holds the same rows as the mapped one."""
    import pickle

    from stages.decode.shards import ShardWriter
    from stages.decode.stage import IndexWriter

    monkeypatch.setattr(IndexWriter, "ROWS", 2)
    rng = np.random.default_rng(0)
    videos = {f"{k:020x}": rng.integers(0, 256, (int(rng.integers(1, 4)), 4, 6, 3), np.uint8) for k in (9, 3, 7, 1, 5)}
    shards = ShardWriter(tmp_path, target_bytes=200)
    with IndexWriter(tmp_path) as index:
        for key, frames in videos.items():
            shard, group = shards.add(key, frames)
            index.add(
                {
                    "video_key": key,
                    "shard": shard,
                    "row_group": group,
                    "nframes": len(frames),
                    "height": 4,
                    "width": 6,
                    "frames_indices": list(range(len(frames))),
                }
            )
    shards.close()
    assert pq.ParquetFile(tmp_path / "index.parquet").num_row_groups == 3
    assert pq.read_table(tmp_path / "index.parquet").equals(FrameStore(tmp_path).table)
    store = pickle.loads(pickle.dumps(FrameStore(tmp_path)))
    assert len(store) == len(videos) and sorted(store) == sorted(videos)
    for key, frames in videos.items():
        assert store[key]["nframes"] == len(frames) and store[key]["frames_indices"] == list(range(len(frames)))
        np.testing.assert_array_equal(store.get(key).frames, frames)
    for missing in ("0" * 20, "f" * 20, "0" * 19 + "4"):
        with pytest.raises(KeyError):
            store[missing]
