"""Decode exactly the planned frames of a video file with ffmpeg, then resize them the way qwen-vl-utils does.

ffmpeg (imageio-ffmpeg's binary, driven by ffmpeg-python) decodes and selects the frames and converts them to
RGB; the resize is torchvision's bicubic with antialias, the call qwen-vl-utils' fetch_video makes, so the
pixels match Qwen's own pipeline instead of approximating it with ffmpeg's scaler.
"""

from __future__ import annotations

import re

import ffmpeg
import imageio_ffmpeg
import numpy as np

from stages.decode.sampling import FramePlan

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


def decode_rgb(path: str, indices: list[int], src_height: int, src_width: int, threads: int = 1) -> np.ndarray:
    """Frames ``indices`` (presentation order, from 0) of ``path`` at source size: uint8 (T, H, W, 3)."""
    wanted = sorted(set(indices))
    select = "+".join(f"eq(n,{i})" for i in wanted)  # ffmpeg-python escapes the commas
    stream = (
        ffmpeg.input(path, threads=threads, nostdin=None)
        .filter("select", select)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough", threads=threads)
        .global_args("-v", "error")
    )
    try:
        out, err = stream.run(cmd=imageio_ffmpeg.get_ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        message = ffmpeg_lines(exc.stderr)
        raise DecodeError("decode_error", f"ffmpeg failed: {message[-1] if message else exc}") from None
    frame_bytes = src_height * src_width * 3
    got = len(out) // frame_bytes
    if got < len(wanted):
        first_error = ffmpeg_lines(err)[:1]
        raise DecodeError(
            "truncated_video",
            f"decoded {got} of the {len(wanted)} sampled frames (last wanted: frame "
            f"{wanted[-1]}){': ' + first_error[0] if first_error else ''}",
        )
    frames = np.frombuffer(out, np.uint8, count=len(wanted) * frame_bytes).reshape(
        len(wanted), src_height, src_width, 3
    )
    position = {frame: i for i, frame in enumerate(wanted)}
    return frames[[position[i] for i in indices]]


def resize_like_qwen(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision bicubic + antialias resize of uint8 (T, H, W, 3)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if video.shape[-2:] != (height, width):  # on uint8, as fetch_video calls it (the result stays uint8)
        video = tvf.resize(video, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return video.permute(0, 2, 3, 1).contiguous().numpy()


def decode_planned(path: str, plan: FramePlan, src_height: int, src_width: int, threads: int = 1) -> np.ndarray:
    """The plan's frames at the plan's size: uint8 (T, H, W, 3)."""
    return resize_like_qwen(decode_rgb(path, plan.indices, src_height, src_width, threads), plan.height, plan.width)
