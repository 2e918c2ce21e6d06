"""The decode worker: Qwen's resize without torchvision, and a worker process that imports none of the stage."""

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from stages.decode.video_frames import QwenResize, Targets, decode_planned
from tests.conftest import REPO
from tests.stages.test_decode import make_clip


@pytest.mark.parametrize(
    "size, target",
    [
        ((360, 640), (364, 644)),
        ((720, 1280), (252, 448)),
        ((1080, 1920), (448, 812)),
        ((97, 131), (196, 252)),
        ((240, 320), (240, 448)),
        ((480, 270), (476, 280)),
    ],
)
def test_resize_equals_torchvision_bit_for_bit(size, target):
    """The call fetch_video makes (torchvision, uint8 in and out) on random frames: every value equal, downscale,
    upscale and one side only."""
    frames = np.random.default_rng(0).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    expected = tvf.resize(video, list(target), interpolation=InterpolationMode.BICUBIC, antialias=True)
    resize = QwenResize()  # one for the clip, as a worker uses it: its float buffer is reused frame to frame
    mine = np.stack([resize(frame, target) for frame in frames])
    assert mine.shape == (3, *target, 3)
    assert np.array_equal(mine, expected.permute(0, 2, 3, 1).numpy())


def test_the_exact_path_holds_the_clip_at_its_resized_size(tmp_path):
    """Each frame is resized as it is decoded: 30 sampled 1280x720 frames resized to 196x112 never have the 30
    source frames in memory at once (768 sampled 1080p frames would be 4.8 GB in every worker)."""
    make_clip(tmp_path / "clip.mp4", 1.0, 30, 1280, 720)
    tracemalloc.start()
    try:
        frames = decode_planned(str(tmp_path / "clip.mp4"), list(range(30)), Targets((112, 196), (196, 112)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frames.shape == (30, 112, 196, 3)
    assert peak < 12 * 1280 * 720 * 3  # a frame in float (4 source frames' bytes), one source frame, the output


def test_worker_decodes_without_the_stage_libraries(tmp_path):
    """A worker process importing the task module and decoding a video exactly loads neither torchvision nor
    qwen-vl-utils nor the stage's DuckDB / pyarrow / pydantic (seconds of start-up in every worker)."""
    make_clip(tmp_path / "clip.mp4", 1.0, 10, 160, 96)
    script = f"""
import json, sys
from stages.decode.video_frames import Targets
from stages.decode.worker import VideoTask, decode_task
task = VideoTask({str(tmp_path / "clip.mp4")!r}, (0, 5, 9), Targets((112, 196), (196, 112)), {{}})
out = decode_task(task)
heavy = [m for m in ("torchvision", "qwen_vl_utils", "duckdb", "pyarrow", "pydantic") if m in sys.modules]
print(json.dumps({{"shape": list(out.frames.shape), "heavy": heavy}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"shape": [3, 112, 196, 3], "heavy": []}


def test_a_video_pyav_cannot_read_is_a_decode_error(tmp_path):
    """PyAV's InvalidDataError is a ValueError: it becomes the video's reject, not the stage's crash."""
    from stages.decode.video_frames import DecodeError
    from stages.decode.worker import VideoTask, decode_task

    (tmp_path / "bad.mp4").write_bytes(b"\x00\x01not a video" * 64)
    result = decode_task(VideoTask(str(tmp_path / "bad.mp4"), (0,), Targets((112, 196), (196, 112)), {}))
    assert isinstance(result, DecodeError) and result.reason == "decode_error"
    assert result.detail.startswith("InvalidDataError: ")


def test_frames_come_back_through_a_spool_file_or_the_pipe_where_it_cannot_be_written(tmp_path):
    """A local pool's worker writes the frames to the stage's spool file; the stage maps them back and the file is
    gone. A file that cannot be written (here: its folder is missing, as on a full disk) leaves the frames in the
    result, so the video is still decoded, not lost."""
    from stages.decode.worker import Decoded

    frames = np.random.default_rng(1).integers(0, 256, (4, 6, 10, 3), dtype=np.uint8)
    spooled = Decoded(frames.copy(), {"nframes": 4}).spooled(str(tmp_path / "0.rgb"))
    assert spooled.frames is None and (tmp_path / "0.rgb").stat().st_size == frames.nbytes
    assert np.array_equal(spooled.take_frames(), frames) and not (tmp_path / "0.rgb").exists()
    assert spooled.fields == {"nframes": 4}
    kept = Decoded(frames.copy(), {}).spooled(str(tmp_path / "missing" / "1.rgb"))
    assert kept.spool is None and np.array_equal(kept.take_frames(), frames)


def test_the_worker_thread_limit_can_be_undone():
    """The stage process decodes the first videos itself with the workers' thread limit, then gets its own back
    (else everything it runs after, a benchmark's baseline included, would run on one thread)."""
    from stages.decode.worker import limit_torch_threads

    before = torch.get_num_threads()
    undo = limit_torch_threads(1)
    assert torch.get_num_threads() == 1
    undo()
    assert torch.get_num_threads() == before
