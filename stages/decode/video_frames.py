"""Decode exactly the planned frames of a video file with PyAV (FFmpeg's libraries), then resize them the way
qwen-vl-utils does.

The frames are those the ffmpeg command line gives (`select` on the frame number, autorotated, converted to RGB
by swscale: bit for bit, tests/stages/test_video_frames.py), but only the frames the sampled ones need are
decoded: a non-reference frame (most H.264/HEVC B-frames) that is not sampled is skipped by the decoder itself
(``skip_frame``), which no other frame can notice. On x264 clips sampled at 2 fps that is 140 of 300 frames not
decoded and 0.6x the CLI's time (measured; benchmarks/README.md). The resize is the bicubic with antialias of
qwen-vl-utils' fetch_video (torchvision's resize, reproduced bit for bit by exact_resize.py), so the pixels match
Qwen's own pipeline; ``decode.resize: fast`` lets swscale scale instead (bicubic in RGB, in the same filter graph).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np


class DecodeError(Exception):
    """A video that cannot be decoded as planned; ``reason`` is a reject code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)  # both in args, so the error pickles across processes
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Targets:
    """The resize target (height, width) for the video shown at its coded size, and for a 90/270-degree
    rotation that swaps it (the rotation is known once a frame is decoded)."""

    size: tuple[int, int]
    rotated_size: tuple[int, int]


Finish = Callable[[np.ndarray, tuple[int, int]], np.ndarray]  # a decoded RGB frame and its target -> the frame kept


def rotation_filters(matrix: np.ndarray | None) -> list[tuple[str, str | None]]:
    """The filters the ffmpeg command line inserts to show a frame with display matrix ``matrix`` (int32, 3x3
    flattened) upright: its autorotate rules (fftools/ffmpeg_filter.c), so both give the same pixels."""
    if matrix is None:
        return []
    m = [float(v) for v in matrix]
    scale = (math.hypot(m[0], m[3]), math.hypot(m[1], m[4]))
    if 0.0 in scale:
        return []
    theta = -round(-math.degrees(math.atan2(m[1] / scale[1], m[0] / scale[0])))  # av_display_rotation_get
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return [("transpose", "cclock_flip" if m[3] > 0 else "clock")]
    if abs(theta - 180) < 1:
        return [f for f, flipped in ((("hflip", None), m[0] < 0), (("vflip", None), m[4] < 0)) if flipped]
    if abs(theta - 270) < 1:
        return [("transpose", "clock_flip" if m[3] < 0 else "cclock")]
    if abs(theta) > 1:
        return [("rotate", f"{theta:f}*PI/180")]
    return [("vflip", None)] if m[4] < 0 else []


def display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
    try:
        return np.frombuffer(bytes(frame.side_data[av.sidedata.sidedata.Type.DISPLAYMATRIX]), np.int32)
    except KeyError:
        return None


class RgbFilter:
    """A decoded frame, upright, as RGB at ``size`` (height, width), by one FFmpeg filter graph: the command
    line's autorotate filters, then RGB, then (``scale``) swscale's bicubic in RGB with Catmull-Rom weights as
    torch's antialiased bicubic (MAD 0.03 from exact at 640 -> 448 px, measured; scaling the YUV planes
    instead, FFmpeg's default, was 30-60x further off)."""

    def __init__(self, first: av.VideoFrame, targets: Targets, scale: bool, threads: int = 1):
        rotate = rotation_filters(display_matrix(first))
        swaps = bool(rotate) and rotate[0][0] == "transpose"
        self.shown = (first.width, first.height) if swaps else (first.height, first.width)
        self.target = targets.rotated_size if swaps else targets.size
        self.graph = av.filter.Graph()
        self.graph.threads = threads  # swscale's slice threads default to every core, in every worker
        # Scaling runs on planar RGB (gbrp; to_ndarray packs it as RGB): the same pixels as scaling packed rgb24,
        # 2.2-2.7x faster in swscale (1.3 vs 2.9 ms a 644x364 frame, the packing included; measured, A/B interleaved).
        nodes = [self.graph.add_buffer(width=first.width, height=first.height, format=first.format, time_base=1)]
        for name, args in [*rotate, ("format", "gbrp" if scale else "rgb24")]:
            nodes.append(self.graph.add(name, args))
        if scale:
            height, width = self.target
            nodes.append(self.graph.add("scale", f"{width}:{height}:flags=bicubic:param0=0:param1=0.5"))
        nodes.append(self.graph.add("buffersink"))
        self.graph.link_nodes(*nodes).configure()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        frame.pts = None  # the graph's buffer has its own time base; the pixels do not depend on time
        self.graph.push(frame)
        return self.graph.pull().to_ndarray()


def frame_times(path: str) -> tuple[list[int] | None, str | None]:
    """The presentation timestamps of the video's frames in presentation order (its frame numbers), or None where
    they do not number the frames (a stream without timestamps, or with repeated ones); and the first error met
    reading the file. A first pass over the packets without decoding them (cheap: the file's bytes only)."""
    times, error = [], None
    with av.open(path) as container:
        stream = container.streams.video[0]
        try:
            for packet in container.demux(stream):
                if packet.size and not packet.is_discard:
                    times.append(packet.pts)
        except av.FFmpegError as exc:
            error = str(exc)
    if None in times or len(set(times)) != len(times):
        return None, error
    return sorted(times), error


# Codecs whose decoders skip (AVDISCARD_NONREF) only frames no other frame refers to, checked against the CLI
# decoding every frame (H.264, MPEG-1/2, VP8, VP9; HEVC only with one temporal layer: a non-reference NAL type
# of a lower layer can still be referred to by a higher one). Not AV1: dav1d reads skip_frame once, when it opens.
SKIP_SAFE_CODECS = {"h264", "mpeg1video", "mpeg2video", "vp8", "vp9"}


def skips_safely(stream: av.video.stream.VideoStream) -> bool:
    """Whether the decoder of ``stream`` may skip the non-reference frames that are not sampled."""
    name = stream.codec_context.name
    if name == "hevc":  # hvcC: numTemporalLayers in bits 3-5 of byte 21
        extradata = stream.codec_context.extradata or b""
        return len(extradata) > 21 and extradata[0] == 1 and (extradata[21] >> 3) & 7 == 1
    return name in SKIP_SAFE_CODECS


class _Renumber(Exception):
    """The decoder's timestamps do not follow presentation order (AVI stores decode order): number by output."""


@dataclass
class _Pass:
    """One decoding pass over a file, collecting the sampled frames."""

    got: dict
    to_rgb: RgbFilter | None = None
    first_error: str | None = None


def _decode_pass(
    path: str,
    wanted: set[int],
    times: list[int] | None,
    targets: Targets,
    threads: int,
    scale: bool,
    finish: Finish | None,
) -> _Pass:
    """Decode ``path``, keeping frames ``wanted`` (numbered by ``times`` where given, else in output order), each
    through ``finish`` where given."""
    wanted_times = {times[i]: i for i in wanted if i < len(times)} if times is not None else {}
    known_times = set(times or ())
    done = _Pass({})
    count, last_time = 0, None  # frames out of the decoder; the last one's timestamp

    def keep(frames) -> None:
        nonlocal count, last_time
        for frame in frames:
            if times is not None:
                if frame.pts not in known_times or (last_time is not None and frame.pts <= last_time):
                    raise _Renumber
                last_time = frame.pts
            number = count if times is None else wanted_times.get(frame.pts)
            count += 1
            if number in wanted and number not in done.got:
                done.to_rgb = done.to_rgb or RgbFilter(frame, targets, scale, threads)
                rgb = done.to_rgb(frame)
                done.got[number] = finish(rgb, done.to_rgb.target) if finish else rgb

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = threads
        if threads > 1:
            stream.thread_type = "AUTO"
        codec = stream.codec_context
        may_skip = times is not None and skips_safely(stream)
        packets = container.demux(stream)
        while len(done.got) < len(wanted):
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as exc:  # a damaged or cut file: keep what was read, as the CLI does
                done.first_error = done.first_error or str(exc)
                break
            skip = may_skip and packet.pts is not None and packet.pts not in wanted_times
            codec.skip_frame = "NONREF" if skip else "DEFAULT"
            try:
                keep(codec.decode(packet))
            except av.FFmpegError as exc:  # a damaged packet: the decoder goes on with the next, as the CLI does
                done.first_error = done.first_error or str(exc)
        if len(done.got) < len(wanted):  # drain what the decoder still holds (a cut file ends without a flush)
            with contextlib.suppress(EOFError, av.FFmpegError):
                keep(codec.decode(None))
    return done


def decode_rgb(
    path: str,
    indices: list[int],
    targets: Targets,
    threads: int = 1,
    scale: bool = False,
    finish: Finish | None = None,
) -> tuple[np.ndarray, RgbFilter]:
    """Frames ``indices`` (presentation order, from 0) of ``path`` as uint8 (T, H, W, 3), upright, at their
    shown size, (``scale``) scaled by swscale to ``targets``, or as ``finish`` makes each one of them as it is
    decoded; and the filter that made them (its shown size and target). A file whose frames do not all come out is
    decoded again on one thread (frame threads can drop a damaged file's last frames) before its missing frames
    make it a ``truncated_video``."""
    wanted = set(indices)
    times, first_error = frame_times(path)
    for pass_threads in dict.fromkeys((threads, 1)):
        try:
            done = _decode_pass(path, wanted, times, targets, pass_threads, scale, finish)
        except _Renumber:
            times = None
            done = _decode_pass(path, wanted, None, targets, pass_threads, scale, finish)
        if len(done.got) == len(wanted):
            return np.stack([done.got[i] for i in indices]), done.to_rgb
    missing = sorted(wanted - done.got.keys())
    error = first_error or done.first_error
    raise DecodeError(
        "truncated_video",
        f"decoded {len(done.got)} of the {len(wanted)} sampled frames (first missing: frame {missing[0]})"
        f"{': ' + error if error else ''}",
    )


def decode_planned(
    path: str,
    indices: list[int],
    targets: Targets,
    threads: int = 1,
    resize: str = "exact",
    plans: dict | None = None,
) -> np.ndarray:
    """Frames ``indices`` of ``path`` at their ``targets`` size, resized exactly (by ``plans``, the compiled passes
    for its (source, target) sizes, where given; see exact_resize.py) or (``fast``) by swscale: uint8 (T, H, W, 3)."""
    if resize == "fast":
        return decode_rgb(path, indices, targets, threads, scale=True)[0]
    from stages.decode.exact_resize import QwenResize  # here: the fast path's workers never load numba

    return decode_rgb(path, indices, targets, threads, finish=QwenResize(plans, threads))[0]


def fast_resize_error(path: str, index: int, fast_first: np.ndarray) -> dict:
    """How far ``fast_first`` (the fast resize of frame ``index``) is from the exact resize of that frame: the sum
    and count of absolute differences (for a mean over many videos) and the largest one."""
    size = fast_first.shape[:2]
    exact = decode_planned(path, [index], Targets(size, size))[0]
    diff = np.abs(exact.astype(np.int16) - fast_first.astype(np.int16))
    return {"abs_diff_sum": int(diff.sum()), "values": int(diff.size), "max_diff": int(diff.max(initial=0))}
