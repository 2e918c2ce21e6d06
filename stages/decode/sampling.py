"""Which frames of a video Qwen's pipeline would feed the model, and at what size.

The arithmetic is qwen-vl-utils' own (`calculate_video_frame_range`, `smart_nframes`, `smart_resize` and the
pixel budget of `fetch_video`), called directly, so the plan is the one its `fetch_video` would make.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from qwen_vl_utils import vision_process as qvu

from schemas.errors import ConfigError
from schemas.params import DatasetConfig
from stages.families import ModelFamily


@dataclass(frozen=True)
class SamplingOptions:
    """The per-video options qwen-vl-utils reads from a video element, resolved for one model family."""

    factor: int  # patch x merge: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL
    fps: float | None
    nframes: int | None
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int | None
    total_pixels: float

    @classmethod
    def from_config(cls, cfg: DatasetConfig, fam: ModelFamily) -> SamplingOptions:
        f = fam.image_factor
        by_count = cfg.video_sampling_strategy == "frame_num"
        min_pixels = cfg.video_min_pixels or qvu.VIDEO_MIN_TOKEN_NUM * f * f
        if cfg.video_max_pixels is not None and cfg.video_max_pixels < min_pixels:
            raise ConfigError(
                f"dataset_config.video_max_pixels ({cfg.video_max_pixels}) is below video_min_pixels "
                f"({min_pixels}{'' if cfg.video_min_pixels else ', the qwen-vl-utils default'}); "
                "set dataset_config.video_min_pixels too"
            )
        if by_count and not cfg.frame_num:
            raise ConfigError("video_sampling_strategy: frame_num needs dataset_config.frame_num")
        return cls(
            factor=f,
            fps=None if by_count else cfg.fps,
            nframes=cfg.frame_num if by_count else None,
            min_frames=cfg.video_min_frames,
            max_frames=cfg.video_max_frames,
            min_pixels=min_pixels,
            max_pixels=cfg.video_max_pixels,
            total_pixels=cfg.video_total_pixels or qvu.MODEL_SEQ_LEN * f * f * 0.9,
        )

    def element(self, video_start: float | None = None, video_end: float | None = None) -> dict:
        """The qwen-vl-utils video element these options stand for."""
        ele: dict = {
            "min_frames": self.min_frames,
            "max_frames": self.max_frames,
            "min_pixels": self.min_pixels,
            "total_pixels": self.total_pixels,
        }
        ele.update({"nframes": self.nframes} if self.nframes else {"fps": self.fps})
        if self.max_pixels is not None:
            ele["max_pixels"] = self.max_pixels
        if video_start is not None:
            ele["video_start"] = video_start
        if video_end is not None:
            ele["video_end"] = video_end
        return ele


@dataclass(frozen=True)
class FramePlan:
    """The frames to decode and the size to resize them to."""

    indices: list[int]  # frame numbers in the source, in presentation order
    height: int
    width: int
    video_fps: float  # the source's average fps
    total_frames: int  # frames in the (clipped) range, as qwen-vl-utils counts them
    fps_sampled: float  # nframes / total_frames * video_fps (qwen-vl-utils' sample_fps)

    @property
    def timestamps(self) -> list[float]:
        return [i / self.video_fps for i in self.indices]


def plan_frames(
    src_frames: int,
    src_fps: float,
    src_height: int,
    src_width: int,
    options: SamplingOptions,
    video_start: float | None = None,
    video_end: float | None = None,
) -> FramePlan:
    """qwen-vl-utils' frame selection and resize for a video file with this header."""
    import torch

    ele = options.element(video_start, video_end)
    start, end, count = qvu.calculate_video_frame_range(ele, src_frames, src_fps)
    nframes = qvu.smart_nframes(ele, total_frames=count, video_fps=src_fps)
    indices = torch.linspace(start, end, nframes).round().long().tolist()
    height, width = resize_for(nframes, src_height, src_width, options)
    return FramePlan(indices, height, width, src_fps, count, nframes / max(count, 1e-6) * src_fps)


def resize_for(nframes: int, height: int, width: int, options: SamplingOptions) -> tuple[int, int]:
    """The per-frame size fetch_video resizes to (its pixel budget, then smart_resize)."""
    f = options.factor
    max_pixels = max(
        min(qvu.VIDEO_MAX_TOKEN_NUM * f * f, options.total_pixels / nframes * qvu.FRAME_FACTOR),
        int(options.min_pixels * 1.05),
    )
    if options.max_pixels is not None:
        max_pixels = min(options.max_pixels, max_pixels)
    return qvu.smart_resize(height, width, factor=f, min_pixels=options.min_pixels, max_pixels=max_pixels)


def video_key(content_sha256: str, options: SamplingOptions, video_start: float | None, video_end: float | None) -> str:
    """Content hash + every sampling parameter: the same clip sampled differently is a different key."""
    spec = f"{content_sha256}|{video_start}|{video_end}|{sorted(asdict(options).items())}"
    return hashlib.sha256(spec.encode()).hexdigest()[:20]
