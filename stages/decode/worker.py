"""What a decode worker process runs: one planned video in, its frames out.

The stage process plans every video (qwen-vl-utils' arithmetic) and hands a worker plain data, so a worker
imports numpy, PyAV and, for the exact resize, torch, but not the stage's DuckDB, pyarrow, pydantic,
torchvision or qwen-vl-utils (a worker's start-up 7.0 -> 0.3 s, measured; torch adds 3.4-4 s, for the exact resize
only). Only a list of frame images, which qwen-vl-utils' fetch_video builds itself, imports it, in the worker that
meets one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stages.decode.video_frames import DecodeError, Targets, decode_planned


@dataclass(frozen=True)
class VideoTask:
    """A video file and its plan, resolved for both display orientations (the rotation is read in the worker)."""

    path: str  # absolute
    indices: tuple[int, ...]  # the planned frames, presentation order
    targets: Targets  # the resize target (height, width), shown at the coded size and rotated
    fields: dict  # the plan's index fields (frames_indices, timestamps, ...), returned as they are
    threads: int = 1
    resize: str = "exact"


@dataclass(frozen=True)
class FrameListTask:
    """A list of frame images: qwen-vl-utils' fetch_video reads and resizes them."""

    frame_paths: tuple[str, ...]  # absolute
    element: dict  # the qwen-vl-utils video element of the sampling options
    patch_size: int


@dataclass
class Decoded:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    fields: dict = field(default_factory=dict)  # index fields


def limit_torch_threads(threads: int) -> None:
    """A worker's start (exact resize): torch keeps to the worker's share of the cores, where it would take them
    all in every worker."""
    import torch

    torch.set_num_threads(threads)


def decode_task(task: VideoTask | FrameListTask | DecodeError) -> Decoded | DecodeError:
    """The task's frames, or a DecodeError (one the stage met while planning passes through unchanged)."""
    if isinstance(task, DecodeError):
        return task
    try:
        if isinstance(task, FrameListTask):
            return _decode_frame_list(task)
        frames = decode_planned(task.path, list(task.indices), task.targets, task.threads, task.resize)
        return Decoded(frames, task.fields)
    except DecodeError as exc:
        return exc
    except (ValueError, OSError) as exc:  # PyAV's InvalidDataError (a ValueError), unreadable frame files
        return DecodeError("decode_error", f"{type(exc).__name__}: {exc}")


def _decode_frame_list(task: FrameListTask) -> Decoded:
    import torch
    from qwen_vl_utils import fetch_video

    try:
        video, meta = fetch_video(
            {"video": list(task.frame_paths), **task.element},
            image_patch_size=task.patch_size,
            return_video_metadata=True,
        )
    except ValueError as exc:  # qwen-vl-utils' frame-count checks
        raise DecodeError("decode_error", f"ValueError: {exc}") from None
    frames = video.round().clamp(0, 255).to(dtype=torch.uint8).permute(0, 2, 3, 1).numpy()
    fps = float(meta["fps"])
    fields = {
        "frames_indices": list(meta["frames_indices"]),
        "timestamps": [i / fps for i in meta["frames_indices"]],
        "video_fps": fps,
        "total_frames": int(round(meta["total_num_frames"])),
        "fps_sampled": fps,
    }
    return Decoded(frames, fields)
