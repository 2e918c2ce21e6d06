"""Decode exactly the planned frames of a video file with ffmpeg, then resize them the way qwen-vl-utils does.

ffmpeg (imageio-ffmpeg's binary, driven by ffmpeg-python) decodes and selects the frames and converts them to
RGB; the resize is the bicubic with antialias of qwen-vl-utils' fetch_video (torchvision's resize, as the torch
calls it makes), so the pixels match Qwen's own pipeline instead of approximating it with ffmpeg's scaler.
``decode.resize: fast`` lets ffmpeg scale instead (bicubic in RGB, in its filter graph): about as fast as the
ffmpeg CLI, pixels a little different (scaling the YUV planes instead, ffmpeg's default, was 30-60x further off:
measured).
"""

from __future__ import annotations

import re

import ffmpeg
import imageio_ffmpeg
import numpy as np

FFMPEG_POINTER = re.compile(r" @ 0x[0-9a-f]+")


def ffmpeg_lines(stderr: bytes) -> list[str]:
    """ffmpeg's error lines without the object addresses it prints (`[h264 @ 0x55..]`): they change every run,
    and a reject's detail must not, or the reject tables (and their DVC hashes) would differ between runs."""
    return [FFMPEG_POINTER.sub("", line) for line in stderr.decode(errors="replace").strip().splitlines()]


class DecodeError(Exception):
    """A video that cannot be decoded as planned; ``reason`` is a reject code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)  # both in args, so the error pickles across processes
        self.reason = reason
        self.detail = detail


def displayed_size(path: str, height: int, width: int) -> tuple[int, int]:
    """(height, width) as the video is shown: a display rotation of 90 or 270 degrees swaps the coded size.
    ffmpeg applies the rotation when it decodes, as qwen-vl-utils' reader does."""
    import av

    with av.open(path) as container:
        frame = next(container.decode(video=0), None)
    rotation = getattr(frame, "rotation", 0) or 0
    return (width, height) if rotation % 180 == 90 else (height, width)


def decode_rgb(
    path: str, indices: list[int], height: int, width: int, threads: int = 1, scale: bool = False
) -> np.ndarray:
    """Frames ``indices`` (presentation order, from 0) of ``path``: uint8 (T, H, W, 3). At source size
    (``height`` x ``width`` must be it), or, with ``scale``, scaled to that size by ffmpeg's bicubic scaler."""
    wanted = sorted(set(indices))
    select = "+".join(f"eq(n,{i})" for i in wanted)  # ffmpeg-python escapes the commas
    stream = ffmpeg.input(path, threads=threads, nostdin=None).filter("select", select)
    if scale:  # in RGB, Catmull-Rom (B=0, C=0.5) as torch's antialiased bicubic: MAD 0.03 at 640 -> 448 px, measured
        stream = stream.filter("format", "rgb24").filter("scale", width, height, flags="bicubic", param0=0, param1=0.5)
    stream = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough", threads=threads)
    stream = stream.global_args("-v", "error")
    try:
        out, err = stream.run(cmd=imageio_ffmpeg.get_ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        message = ffmpeg_lines(exc.stderr)
        raise DecodeError("decode_error", f"ffmpeg failed: {message[-1] if message else exc}") from None
    frame_bytes = height * width * 3
    got = len(out) // frame_bytes
    if got < len(wanted):
        first_error = ffmpeg_lines(err)[:1]
        raise DecodeError(
            "truncated_video",
            f"decoded {got} of the {len(wanted)} sampled frames (last wanted: frame "
            f"{wanted[-1]}){': ' + first_error[0] if first_error else ''}",
        )
    frames = np.frombuffer(out, np.uint8, count=len(wanted) * frame_bytes).reshape(len(wanted), height, width, 3)
    position = {frame: i for i, frame in enumerate(wanted)}
    return frames[[position[i] for i in indices]]


def resize_like_qwen(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Qwen's resize of uint8 (T, H, W, 3): torchvision's ``resize(BICUBIC, antialias=True)`` on uint8, written as
    the torch calls it makes (float32, interpolate, clamp, round, uint8), so a decode worker imports torch but not
    torchvision (2.9 s of start-up a worker, measured). tests/stages/test_decode_worker.py holds it equal to
    torchvision's call."""
    import torch
    from torch.nn.functional import interpolate

    if frames.shape[1:3] == (height, width):
        return np.ascontiguousarray(frames)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    out = np.empty((len(frames), height, width, 3), np.uint8)
    # One frame at a time: the same pixels as the whole clip in one call (each frame is resized alone either way),
    # 1.8x faster, since the float copy of one frame stays in cache (measured: 9 vs 16 ms a 640x360 frame to
    # 644x364, one thread).
    for i in range(len(frames)):
        one = video[i : i + 1].to(torch.float32)
        one = interpolate(one, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
        out[i] = one.clamp_(0, 255).round_().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    return out


def decode_planned(
    path: str,
    indices: list[int],
    src_size: tuple[int, int],
    size: tuple[int, int],
    threads: int = 1,
    resize: str = "exact",
) -> np.ndarray:
    """Frames ``indices`` of ``path`` (shown at ``src_size``) at ``size`` (height, width): uint8 (T, H, W, 3),
    resized exactly or (``fast``) by ffmpeg."""
    if resize == "fast":
        return decode_rgb(path, indices, *size, threads, scale=True)
    return resize_like_qwen(decode_rgb(path, indices, *src_size, threads), *size)


def fast_resize_error(path: str, index: int, src_size: tuple[int, int], fast_first: np.ndarray) -> dict:
    """How far ``fast_first`` (the fast resize of frame ``index``) is from the exact resize of that frame: the sum
    and count of absolute differences (for a mean over many videos) and the largest one."""
    exact = decode_planned(path, [index], src_size, fast_first.shape[:2])[0]
    diff = np.abs(exact.astype(np.int16) - fast_first.astype(np.int16))
    return {"abs_diff_sum": int(diff.sum()), "values": int(diff.size), "max_diff": int(diff.max(initial=0))}
