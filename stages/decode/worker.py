"""What a decode worker process runs: one planned video in, its frames out.

The stage process plans every video (qwen-vl-utils' arithmetic, and the exact resize's compiled plans) and hands
a worker plain data, so a worker imports numpy, PyAV and, for the exact resize, numba (0.7 s), but not torch,
the stage's DuckDB, pyarrow, pydantic, torchvision or qwen-vl-utils (a worker's start-up 7.0 -> 0.3 s, measured;
torch would add 3.4-4 s). Only a list of frame images, which qwen-vl-utils' fetch_video builds itself, imports
them, in the worker that meets one; a size pair without a plan loads torch for its resize.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace

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
    spool: str | None = None  # a file for the frames (see Decoded), where the stage gives one
    plans: dict | None = None  # the exact resize's compiled plans, by (source, target) size (exact_resize.py)


@dataclass(frozen=True)
class FrameListTask:
    """A list of frame images: qwen-vl-utils' fetch_video reads and resizes them."""

    frame_paths: tuple[str, ...]  # absolute
    element: dict  # the qwen-vl-utils video element of the sampling options
    patch_size: int
    spool: str | None = None


@dataclass
class Decoded:
    """A video's frames and index fields. From a local pool the frames come back through a spool file, not the
    result pipe: pickling 28 MB of frames (a 40-frame 644x364 clip), piping and unpickling them cost 66 ms of CPU
    a clip, writing the file and mapping it back 10 ms (measured; 10% of the exact path's work)."""

    frames: np.ndarray | None  # uint8 (T, H, W, 3); None while they wait in ``spool``
    fields: dict = field(default_factory=dict)  # index fields
    spool: tuple[str, tuple[int, ...]] | None = None  # (file, frames' shape)

    def spooled(self, path: str) -> Decoded:
        """This result with its frames in the file ``path``; itself where the file cannot be written (a full disk:
        the frames take the pipe, and the stage meets the full disk when it writes the shard)."""
        if not self.frames.size:  # nothing to map back
            return self
        try:
            self.frames.tofile(path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return self
        return replace(self, frames=None, spool=(path, self.frames.shape))

    def take_frames(self) -> np.ndarray:
        """The frames: from a spool file, mapped and the file removed (its pages are freed with the mapping)."""
        if self.spool is None:
            return self.frames
        path, shape = self.spool
        frames = np.memmap(path, np.uint8, "r", shape=shape)
        os.unlink(path)
        return frames


def decode_task(task: VideoTask | FrameListTask | DecodeError) -> Decoded | DecodeError:
    """The task's frames, or a DecodeError (one the stage met while planning passes through unchanged)."""
    if isinstance(task, DecodeError):
        return task
    try:
        if isinstance(task, FrameListTask):
            decoded = _decode_frame_list(task)
        else:
            frames = decode_planned(task.path, list(task.indices), task.targets, task.threads, task.resize, task.plans)
            decoded = Decoded(frames, task.fields)
    except DecodeError as exc:
        return exc
    except (ValueError, OSError) as exc:  # PyAV's InvalidDataError (a ValueError), unreadable frame files
        return DecodeError("decode_error", f"{type(exc).__name__}: {exc}")
    return decoded.spooled(task.spool) if task.spool else decoded


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
