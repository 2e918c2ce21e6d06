"""The decode worker: Qwen's resize without torchvision, and a worker process that imports none of the stage."""

import pickle
import subprocess
import sys
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from stages.decode.exact_resize import QwenResize, plan_resize
from stages.decode.video_frames import Targets, decode_planned
from stages.decode.worker import VideoTask
from tests.conftest import REPO
from tests.stages.test_decode import make_clip

# torch's CPU builds whose summation order exact_resize.py was checked against (read off on these machines)
REPRODUCED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX")


def planned(src, dst):
    """The compiled resize's plan for the pair, or the test skipped where torch's build here is not reproduced."""
    plan = plan_resize(src, dst)
    if plan is None:
        pytest.skip(f"no grouping reproduces torch's {torch.backends.cpu.get_cpu_capability()} build here")
    return plan


@pytest.mark.parametrize(
    "size, target",
    [
        ((360, 640), (364, 644)),
        ((720, 1280), (252, 448)),
        ((1080, 1920), (448, 812)),
        ((97, 131), (196, 252)),
        ((240, 320), (240, 448)),
        ((480, 270), (476, 280)),
        ((448, 320), (252, 320)),
    ],
)
def test_resize_equals_torchvision_bit_for_bit(size, target):
    """The call fetch_video makes (torchvision, uint8 in and out) on random frames: every value equal, by the
    compiled passes and by torch's own call, downscale, upscale and one side only."""
    frames = np.random.default_rng(0).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    expected = tvf.resize(video, list(target), interpolation=InterpolationMode.BICUBIC, antialias=True)
    expected = expected.permute(0, 2, 3, 1).numpy()
    plan = plan_resize(size, target)
    assert plan is not None or not REPRODUCED  # the builds whose arithmetic was read off must be reproduced
    for resize in (QwenResize({(size, target): plan} if plan else {}), QwenResize()):  # compiled, then torch
        mine = np.stack([resize(frame, target) for frame in frames])  # one resize a clip: buffers reused
        assert mine.shape == (3, *target, 3)
        assert np.array_equal(mine, expected)


def test_a_plan_that_does_not_reproduce_torch_is_not_used(monkeypatch, capsys):
    """Each axis's grouping of plain additions and fused multiply-adds is checked against torch's float sums before
    a plan is handed out: every other grouping is caught on random data, and where none reproduces torch (a CPU
    build of torch that sums another way) the pair is left to torch, with a message, never given other pixels."""
    from stages.decode import exact_resize

    plan = planned((720, 1280), (252, 448))  # 7-12 term windows: plain and fused terms in both groupings
    for axis, n_in, width in ((plan.width, 1280, True), (plan.height, 720, False)):
        assert exact_resize._checked(axis, n_in, width)
        others = {tuple(exact_resize.plain_terms(axis.sizes, widths)) for widths in exact_resize.GROUPINGS}
        others -= {tuple(axis.plain)}
        assert len(others) >= 3
        for plain in others:
            assert not exact_resize._checked(replace(axis, plain=np.array(plain)), n_in, width)
    width_plain = {w: exact_resize.plain_terms(plan.width.sizes, w) for w in exact_resize.GROUPINGS}
    wrong = tuple(w for w, plain in width_plain.items() if not np.array_equal(plain, plan.width.plain))
    monkeypatch.setattr(exact_resize, "GROUPINGS", wrong)  # only groupings that sum this width another way
    exact_resize._axis_plan.cache_clear()
    plan_resize.cache_clear()
    try:
        assert plan_resize((720, 1280), (252, 448)) is None
    finally:
        exact_resize._axis_plan.cache_clear()
        plan_resize.cache_clear()
    assert "not reproduced here; torch does it" in capsys.readouterr().err


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
    """A worker process importing the task module and decoding a video exactly, with the plan the stage made for its
    sizes, loads neither torch nor torchvision nor qwen-vl-utils nor the stage's DuckDB / pyarrow / pydantic
    (seconds of start-up in every worker), and gives the frames torch's resize gives."""
    make_clip(tmp_path / "clip.mp4", 1.0, 10, 160, 96)
    targets = Targets((112, 196), (196, 112))
    plan = planned((96, 160), (112, 196))
    plans = {((96, 160), (112, 196)): plan}
    task = VideoTask(str(tmp_path / "clip.mp4"), (0, 5, 9), targets, {}, plans=plans)
    (tmp_path / "task.pickle").write_bytes(pickle.dumps(task))
    script = f"""
import pickle, sys
from stages.decode.worker import decode_task
out = decode_task(pickle.loads(open({str(tmp_path / "task.pickle")!r}, "rb").read()))
heavy = [m for m in ("torch", "torchvision", "qwen_vl_utils", "duckdb", "pyarrow", "pydantic") if m in sys.modules]
out.frames.tofile({str(tmp_path / "frames.rgb")!r})
print(heavy)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    frames = np.fromfile(tmp_path / "frames.rgb", np.uint8).reshape(3, 112, 196, 3)
    assert np.array_equal(frames, decode_planned(str(tmp_path / "clip.mp4"), [0, 5, 9], targets))  # by torch


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


def test_the_torch_resize_keeps_to_its_threads_and_gives_them_back():
    """A size pair without a plan is resized by torch on the worker's share of the cores; the process gets its own
    thread count back after (else the stage process, which decodes the first videos itself, and everything it
    runs after, a benchmark's baseline included, would run on one thread)."""
    before = torch.get_num_threads()
    seen = []
    resize = QwenResize(threads=1)
    real = torch.nn.functional.interpolate
    try:
        torch.set_num_threads(2)
        torch.nn.functional.interpolate = lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k)
        resize(np.zeros((40, 30, 3), np.uint8), (56, 28))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.nn.functional.interpolate = real
        torch.set_num_threads(before)


def test_frames_of_another_size_than_planned_are_resized_by_torch_and_said(capsys):
    """A video whose decoded frames are not the size validate probed (no plan for them) still gets torch's
    pixels, and the worker says once that torch resized them."""
    plan = planned((96, 160), (112, 196))
    frame = np.random.default_rng(1).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    mine = QwenResize({((96, 160), (112, 196)): plan})
    assert np.array_equal(mine(frame, (112, 196)), QwenResize()(frame, (112, 196)))
    mine(frame, (112, 196))
    assert capsys.readouterr().err.count("160x90 frames (not the size planned)") == 1
