"""PyAV's decode of the sampled frames, skipping the unsampled non-reference ones, against the ffmpeg command line
decoding every frame (an independent reference): bit for bit, upright, and damaged files as rejects."""

import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from stages.decode.video_frames import DecodeError, Targets, decode_planned, decode_rgb
from tests.conftest import REPO

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SIZE = (96, 160)  # (height, width) as coded


def ffmpeg_cli(*args: str) -> bytes:
    return subprocess.run([FFMPEG, "-v", "error", "-y", *args], check=True, capture_output=True).stdout


def every_frame(path: Path, height: int, width: int, *vf: str) -> np.ndarray:
    """All frames as the command line shows them (autorotated), in RGB: uint8 (N, H, W, 3)."""
    raw = ffmpeg_cli("-i", str(path), *vf, "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-")
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """A 90-frame x264 clip with B-frames (pyramid on: some B-frames are references, some not), and the same
    stream with display rotations and flips, and in AVI."""
    folder = tmp_path_factory.mktemp("clips")
    source = ["-f", "lavfi", "-i", f"testsrc2=duration=3:size={SIZE[1]}x{SIZE[0]}:rate=30"]
    x264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-x264-params", "bframes=3:b-pyramid=normal:keyint=40"]
    ffmpeg_cli(*source, *x264, str(folder / "plain.mp4"))
    ffmpeg_cli("-i", str(folder / "plain.mp4"), "-c", "copy", str(folder / "plain.avi"))
    for name, display in ROTATIONS.items():
        ffmpeg_cli(*display, "-i", str(folder / "plain.mp4"), "-c", "copy", str(folder / f"{name}.mp4"))
    return folder


ROTATIONS = {
    "rot90": ["-display_rotation", "90"],
    "rot270_hflip": ["-display_rotation", "270", "-display_hflip"],
    "rot180_vflip": ["-display_rotation", "180", "-display_vflip"],
    "vflip": ["-display_vflip"],
}
SAMPLES = [[0, 7, 15, 22, 30, 37, 45, 52, 60, 67, 75, 89], [1, 2, 3, 89, 41], [45]]


@pytest.mark.parametrize("indices", SAMPLES, ids=["spread", "unordered", "one"])
def test_sampled_frames_equal_the_command_line_decoding_every_frame(clips, indices):
    reference = every_frame(clips / "plain.mp4", *SIZE)
    frames, to_rgb = decode_rgb(str(clips / "plain.mp4"), indices, Targets(SIZE, SIZE[::-1]))
    assert to_rgb.shown == SIZE
    assert np.array_equal(frames, reference[indices])


@pytest.mark.parametrize("indices", SAMPLES[:2], ids=["spread", "unordered"])
def test_a_container_storing_decode_order_timestamps_is_numbered_by_output(clips, indices):
    """AVI gives H.264 packets decode-order timestamps, so their rank is not the frame number: the decoder's
    out-of-order timestamps are noticed and the file is decoded again, numbered in output order, as the CLI's."""
    reference = every_frame(clips / "plain.avi", *SIZE)
    frames, _ = decode_rgb(str(clips / "plain.avi"), indices, Targets(SIZE, SIZE[::-1]))
    assert np.array_equal(frames, reference[indices])


@pytest.mark.parametrize("name", ROTATIONS)
def test_rotated_and_flipped_videos_are_shown_as_the_command_line_shows_them(clips, name):
    shown = SIZE[::-1] if "90" in name or "270" in name else SIZE
    reference = every_frame(clips / f"{name}.mp4", *shown)
    frames, to_rgb = decode_rgb(str(clips / f"{name}.mp4"), [3, 50], Targets(SIZE, SIZE[::-1]))
    assert to_rgb.shown == shown
    assert np.array_equal(frames, reference[[3, 50]])


@pytest.mark.parametrize(
    ("name", "targets", "shown"),
    [
        ("rot90", Targets((84, 140), (140, 84)), (140, 84)),  # rotated (the target follows it), scaled down
        ("plain", Targets((112, 168), (168, 112)), (112, 168)),  # scaled up, as 640x360 -> 644x364
        ("plain", Targets(SIZE, SIZE[::-1]), SIZE),  # at its own size: YUV to planar RGB alone
    ],
)
def test_fast_resize_equals_the_command_line_scaling_in_rgb(clips, name, targets, shown):
    """The fast path's pixels are the command line's: autorotate, RGB, then swscale's Catmull-Rom bicubic on the
    RGB frame."""
    height, width = shown
    scale = ["-vf", f"format=rgb24,scale={width}:{height}:flags=bicubic:param0=0:param1=0.5"]
    reference = every_frame(clips / f"{name}.mp4", height, width, *scale)
    frames = decode_planned(str(clips / f"{name}.mp4"), [10, 80], targets, resize="fast")
    assert np.array_equal(frames, reference[[10, 80]])


def test_a_planar_rgb_source_shown_flipped_at_its_own_size(tmp_path):
    """H.264 coded in RGB decodes to planar gbrp; flipped by its display matrix and not rescaled, the fast path's
    frame comes out of the graph bottom-up (a negative line size). Its pixels are still the command line's."""
    coded = tmp_path / "rgb.mp4"
    source = ["-f", "lavfi", "-i", f"testsrc2=duration=1:size={SIZE[1]}x{SIZE[0]}:rate=30"]
    ffmpeg_cli(*source, "-c:v", "libx264rgb", "-pix_fmt", "bgr24", str(coded))
    flipped = tmp_path / "vflip.mp4"
    ffmpeg_cli("-display_vflip", "-i", str(coded), "-c", "copy", str(flipped))
    reference = every_frame(flipped, *SIZE)
    frames = decode_planned(str(flipped), [3, 20], Targets(SIZE, SIZE[::-1]), resize="fast")
    assert np.array_equal(frames, reference[[3, 20]])


THREADS_STARTED = """
import sys
from pathlib import Path
import av
from stages.decode.video_frames import RgbFilter, Targets
def threads():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("Threads:")).split()[1])
with av.open(sys.argv[1]) as container:
    first = next(container.decode(video=0))
    before = threads()
    scale = RgbFilter(first, Targets((112, 168), (168, 112)), scale=True, threads=int(sys.argv[2]))
    assert scale(first).shape == (112, 168, 3)
    print(threads() - before)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="FFmpeg starts no slice threads on one core")
@pytest.mark.parametrize("threads", [1, 2])
def test_the_fast_scale_keeps_to_the_workers_thread_share(clips, threads):
    """The scale filter's graph runs on the worker's share of the cores (FFmpeg's default starts a slice thread
    per core in every worker's graph, which cost 5% more CPU a clip, measured), on one thread where given one.
    Counted in a process of its own: no other test's threads come or go there."""
    run = [sys.executable, "-c", THREADS_STARTED, str(clips / "plain.mp4"), str(threads)]
    started = int(subprocess.run(run, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert (started > 0) == (threads > 1)


def test_a_cut_file_keeps_its_frames_and_rejects_the_missing_ones(clips, tmp_path):
    """A file cut in half (its index first, so the cut keeps it) decodes the frames it still has, and a sampled
    frame past the cut is a truncated_video reject."""
    whole = (clips / "plain.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    faststart = tmp_path / "faststart.mp4"
    ffmpeg_cli("-i", str(clips / "plain.mp4"), "-c", "copy", "-movflags", "+faststart", str(faststart))
    cut.write_bytes(faststart.read_bytes()[: len(whole) // 2])
    reference = every_frame(clips / "plain.mp4", *SIZE)
    frames, _ = decode_rgb(str(cut), [0, 10], Targets(SIZE, SIZE))
    assert np.array_equal(frames, reference[[0, 10]])
    with pytest.raises(DecodeError) as error:
        decode_rgb(str(cut), [0, 10, 85], Targets(SIZE, SIZE))
    assert error.value.reason == "truncated_video"
    assert "decoded 2 of the 3 sampled frames (first missing: frame 85)" in error.value.detail


def test_av1_samples_come_out_whichever_frame_comes_first(tmp_path):
    """dav1d reads skip_frame once, when it opens: AV1 is decoded without skipping (else every unsampled
    non-reference frame of the file is dropped, sampled ones included, when frame 0 is not sampled)."""
    path = tmp_path / "av1.mkv"
    ffmpeg_cli("-f", "lavfi", "-i", "testsrc2=duration=1:size=160x96:rate=30", "-c:v", "libsvtav1", "-preset", "12",
               str(path))  # fmt: skip
    reference = every_frame(path, *SIZE)
    indices = list(range(1, len(reference), 4))
    frames, _ = decode_rgb(str(path), indices, Targets(SIZE, SIZE[::-1]))
    assert np.array_equal(frames, reference[indices])
