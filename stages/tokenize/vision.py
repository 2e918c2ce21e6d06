"""How many vision tokens each image and video becomes, and the processor arguments that make it so.

Shared by tokenize (which only needs the grids, computed from sizes without touching pixels) and by the
trainer (which runs the processor's image and video processors on the pixels with the same arguments, so the
grids it gets are the ones tokenize counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.video_utils import VideoMetadata

from schemas.params import DatasetConfig
from stages.decode.shards import VideoFrames


@dataclass(frozen=True)
class VisionArgs:
    """Image pixel budget and video handling for one processor."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_min_pixels: int
    image_max_pixels: int

    @classmethod
    def for_processor(cls, processor, cfg: DatasetConfig) -> VisionArgs:
        ip = processor.image_processor
        return cls(
            ip.patch_size,
            ip.merge_size,
            ip.temporal_patch_size,
            cfg.image_min_pixels or ip.size["shortest_edge"],
            cfg.image_max_pixels or ip.size["longest_edge"],
        )

    def image_grid(self, height: int, width: int) -> list[int]:
        """(t, h, w) patches of an image of this size: the image processor's own smart_resize."""
        h, w = smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=self.image_min_pixels,
            max_pixels=self.image_max_pixels,
        )
        return [1, h // self.patch_size, w // self.patch_size]

    def video_grid(self, nframes: int, height: int, width: int) -> list[int]:
        """Pre-decoded frames are at their final size (decode stage): no resize, only patching."""
        return [nframes // self.temporal_patch_size, height // self.patch_size, width // self.patch_size]

    def images_kwargs(self) -> dict:
        return {"size": {"shortest_edge": self.image_min_pixels, "longest_edge": self.image_max_pixels}}

    @staticmethod
    def videos_kwargs(videos: list[VideoFrames]) -> dict:
        """Frames are already sampled and resized: the video processor must do neither again."""
        return {
            "do_resize": False,
            "do_sample_frames": False,
            "video_metadata": [video_metadata(v.info) for v in videos],
        }


def video_metadata(info: dict) -> VideoMetadata:
    """The metadata Qwen's processors need with pre-sampled frames, from a frame-index row."""
    return VideoMetadata(
        total_num_frames=info["total_frames"],
        fps=info["video_fps"],
        frames_indices=list(info["frames_indices"]),
        height=info["height"],
        width=info["width"],
    )
