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
from stages.decode import run as decode
from stages.decode.sampling import SamplingOptions
from stages.decode.shards import FrameStore
from stages.families import family
from stages.validate import run as validate
from tests.conftest import REPO

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
            "decode": {"workers": 2},
        }
    )


@pytest.fixture
def video_project(project):
    for name, spec in EXTRA_CLIPS.items():
        make_clip(project / "data/demo/videos" / name, *spec)
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
    by_clip = {(Path(r["path"]).name, r["video_start"], r["video_end"]): key for key, r in store.index.items()}
    for name, start, end in CLIPS:
        mine = store.get(by_clip[(name, start, end)])
        ele = {"video": str(video_project / "data/demo/videos" / name), **opts.element(start, end)}
        ref, meta = qvu.fetch_video(ele, image_patch_size=family(family_name).patch_size, return_video_metadata=True)
        ref = ref.permute(0, 2, 3, 1).numpy()
        assert mine.frames.shape == ref.shape, name
        assert mine.info["frames_indices"] == list(meta["frames_indices"]), name
        assert mine.info["total_frames"] == meta["total_num_frames"]
        assert mine.info["video_fps"] == pytest.approx(meta["fps"])
        assert np.abs(mine.frames.astype(np.float64) - ref).mean() <= 1.0, name
        assert mine.frames.shape[0] % 2 == 0  # an even count: the temporal patch reshape never breaks


def test_frame_list_video_equals_fetch_video(project):
    from qwen_vl_utils import fetch_video

    params = parse_params(
        {
            "dataset_config": {
                "datasets": [
                    {"path": "data/demo/qwen_utils.parquet", "data_folder": "data/demo", "data_type": "parquet"}
                ]
            },
            "validate": {"media_cache": ".cache/media.duckdb"},
        }
    )
    validate(params, project)
    decode(params, project)
    store = FrameStore(project / "data/frames")
    (key,) = [k for k, r in store.index.items() if r["is_frame_list"]]
    frames = [str(project / f"data/demo/frames/clip/{i:03d}.jpg") for i in range(6)]
    opts = SamplingOptions.from_config(params.dataset_config, family("qwen2_5_vl"))
    ref = fetch_video({"video": frames, **opts.element()}, image_patch_size=14).permute(0, 2, 3, 1).numpy()
    assert store.get(key).frames.shape == ref.shape
    assert np.abs(store.get(key).frames.astype(float) - ref).mean() <= 0.5


def test_demo_truncated_video_is_rejected_with_its_samples(project):
    params = parse_params(
        {
            "dataset_config": {"datasets": [{"path": "data/demo/chat.jsonl", "data_folder": "data/demo"}]},
            "validate": {"media_cache": ".c/m.duckdb"},
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
    assert len(FrameStore(project / "data/frames").index) == result.decoded
    first = (project / "data/frames/rejects.parquet").read_bytes()
    decode(params, project)  # a reject's detail holds no per-run value (ffmpeg's object addresses are stripped)
    assert (project / "data/frames/rejects.parquet").read_bytes() == first
    assert " @ 0x" not in rejects[0]["detail"]


def test_output_is_byte_identical_on_rerun(video_project):
    params = video_params("qwen2_5_vl", video_min_pixels=12544, video_max_pixels=50176)
    validate(params, video_project)
    decode(params, video_project)
    first = {p.name: p.read_bytes() for p in (video_project / "data/frames").iterdir()}
    decode(params, video_project)
    assert {p.name: p.read_bytes() for p in (video_project / "data/frames").iterdir()} == first


def test_missing_validate_output_is_a_clear_error(project):
    with pytest.raises(StageInputError, match="run `qvl validate` first"):
        decode(video_params("qwen2_5_vl"), project)


def test_inconsistent_pixel_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="video_max_pixels"):
        SamplingOptions.from_config(
            video_params("qwen2_5_vl", video_max_pixels=1000).dataset_config, family("qwen2_5_vl")
        )


def test_disk_full_is_reported_and_nothing_replaced(tmp_path):
    import errno

    from stages.io import atomic_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(PipelineError, match="disk full"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "partial").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp directory left behind


def test_killed_run_leaves_old_output_or_nothing_and_rerun_completes(video_project):
    """SIGKILL the stage at several moments; the visible output is always absent or complete."""
    params_file = video_project / "params.yaml"
    params_file.write_text(json.dumps(video_params("qwen2_5_vl").model_dump(by_alias=True, mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def stage(name: str) -> list[str]:
        return [sys.executable, "-m", f"stages.{name}", "--params", str(params_file)]

    def frames() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (video_project / "data/frames").iterdir()}

    for name in ("validate", "decode"):
        subprocess.run(stage(name), cwd=video_project, env=env, check=True, capture_output=True)
    reference = frames()
    shutil.rmtree(video_project / "data/frames")
    for delay in (0.5, 1.5, 2.5, 3.5):
        proc = subprocess.Popen(
            stage("decode"),
            cwd=video_project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if (video_project / "data/frames").exists():  # then it is a complete output, equal to the reference
            assert frames() == reference
    subprocess.run(stage("decode"), cwd=video_project, env=env, check=True, capture_output=True)
    assert frames() == reference
    assert not [p for p in (video_project / "data").iterdir() if p.name.startswith(".frames.tmp")]
