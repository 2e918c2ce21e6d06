"""Qwen's exact resize: torchvision's bicubic with antialias on uint8 frames (what qwen-vl-utils' fetch_video calls),
bit for bit, in two compiled passes 2.2x faster than torch's own kernel and its copies (measured; benchmarks/README.md).

What torch computes (its CPU kernel, aten/src/ATen/native/cpu/UpSampleKernel.cpp, and read off it by the probes
below): the width first, then the height; each output value of a pass is a sum over a window of its input in float32,
``out = x[s] * w[0]``, then ``out += x[s + k] * w[k]`` for k = 1 .. n-1; then clamp to [0, 255], round half to even.
How the compiler built that loop depends on the CPU build torch dispatches to: in its AVX2 build the additions come
in vectorised groups of 4 (plain multiply, then add), the ones left over as fused multiply-adds; in its default build
all plain. So the stage process (which has torch) reads each axis's windows and weights off torch itself, picks the
grouping that reproduces torch on random data for that axis (``plan_resize``), and hands the plan to the workers,
which need no torch. A size pair no grouping reproduces is resized by torch (``QwenResize`` without a plan).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

CHECK_LINES = 256  # random lines a grouping is checked on, per axis
BLOCK_ROWS = 16  # rows the width pass transposes at a time, so its sums run along contiguous memory (1.9 ms vs
# 4.2 ms a 640x360 -> 644x364 frame with the sums along each row; 8 rows 2.1 ms, 32 rows 2.0; measured)
# How a compiled loop may group a window's additions: vector widths, widest first, each taking whole groups of the
# terms the ones before it left (a vectorised loop, then a vectorised remainder); the terms left over are fused
# multiply-adds. (1,): all plain (torch's default build). (4,) is torch 2.14's AVX2 build (measured); the others
# are the groupings other builds (AVX-512) may use, tried in turn and kept only where they reproduce torch.
GROUPINGS = ((4,), (1,), (8,), (16,), (8, 4), (16, 8), (16, 4), (16, 8, 4))
Size = tuple[int, int]  # (height, width)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's fma intrinsic: one vfmadd instruction where the CPU has FMA)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


AXIS = "int32[::1], int32[::1], int32[::1], float32[:, ::1]"  # an AxisPlan's arrays, as the kernels take them


@numba.njit("void(float32[:, ::1], int64, int64, int64, float32[::1], float32[::1])", cache=True, nogil=True)
def _window_sums(rows, start, size, plain, weights, acc):
    """acc[i] = the torch-ordered sum over rows[start : start + size] of rows[j][i] * weights[j - start]."""
    first = rows[start]
    for i in range(acc.shape[0]):
        acc[i] = first[i] * weights[0]
    for k in range(1, plain):
        row, w = rows[start + k], weights[k]
        for i in range(acc.shape[0]):
            acc[i] = acc[i] + row[i] * w
    for k in range(plain, size):
        row, w = rows[start + k], weights[k]
        for i in range(acc.shape[0]):
            acc[i] = _fma(row[i], w, acc[i])


@numba.njit(
    f"void(uint8[:, :, ::1], {AXIS}, float32[:, :, ::1], float32[:, ::1], float32[::1])", cache=True, nogil=True
)
def _width_pass(src, starts, sizes, plain, weights, out, block, acc):
    """out (H, W_out, C) float32 = src (H, W_in, C) resized along its width, BLOCK_ROWS rows at a time: the rows
    transposed into ``block`` (W_in, rows * C), so each output column's window sums run over contiguous values."""
    height, width, channels = src.shape
    for top in range(0, height, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, height - top)
        lanes = rows * channels
        for x in range(width):
            for r in range(rows):
                for c in range(channels):
                    block[x, r * channels + c] = src[top + r, x, c]
        for o in range(starts.shape[0]):
            _window_sums(block, starts[o], sizes[o], plain[o], weights[o], acc[:lanes])
            for r in range(rows):
                for c in range(channels):
                    out[top + r, o, c] = acc[r * channels + c]


@numba.njit(f"void(float32[:, :, ::1], {AXIS}, uint8[:, :, ::1], float32[::1])", cache=True, nogil=True)
def _height_pass(src, starts, sizes, plain, weights, out, acc):
    """out (H_out, W, C) uint8 = src (H_in, W, C) resized along its height, clamped to [0, 255] and rounded half to
    even (torch's clamp_ then round_)."""
    rows = src.reshape(src.shape[0], -1)
    dst = out.reshape(out.shape[0], -1)
    for o in range(starts.shape[0]):
        _window_sums(rows, starts[o], sizes[o], plain[o], weights[o], acc)
        for i in range(acc.shape[0]):
            dst[o, i] = np.uint8(np.rint(min(max(acc[i], np.float32(0.0)), np.float32(255.0))))


@numba.njit(f"void(float32[:, ::1], {AXIS}, float32[:, ::1], float32[::1])", cache=True, nogil=True)
def _height_sums(src, starts, sizes, plain, weights, out, acc):
    """The height pass's sums, unrounded (float32 out): what a plan's check compares with torch."""
    for o in range(starts.shape[0]):
        _window_sums(src, starts[o], sizes[o], plain[o], weights[o], acc)
        out[o] = acc


@dataclass(frozen=True)
class AxisPlan:
    """One axis of a resize, as torch computes it: output o sums inputs ``starts[o]`` .. + ``sizes[o]`` with
    ``weights[o]``, the first ``plain[o]`` terms plainly, the rest as fused multiply-adds."""

    starts: np.ndarray  # int32 (n_out,)
    sizes: np.ndarray  # int32 (n_out,)
    plain: np.ndarray  # int32 (n_out,)
    weights: np.ndarray  # float32 (n_out, the widest window)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.starts, self.sizes, self.plain, self.weights


@dataclass(frozen=True)
class ResizePlan:
    width: AxisPlan
    height: AxisPlan


def _torch_resize(x, size: Size):
    from torch.nn.functional import interpolate

    return interpolate(x, size=list(size), mode="bicubic", align_corners=False, antialias=True)


def _probe_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Torch's windows (starts, sizes) and weights (n_out, widest) for resizing a width of ``n_in`` to ``n_out``:
    rows of ones give each input's weights (one * w is w, exactly), rows of NaNs each input's outputs (NaN * 0 is
    NaN: a window's zero weights count)."""
    import torch

    weights, window = np.zeros((n_out, n_in), np.float32), np.zeros((n_out, n_in), bool)
    for lo in range(0, n_in, 512):
        rows = torch.arange(min(512, n_in - lo))
        probe = torch.zeros((len(rows), n_in))
        probe[rows, lo + rows] = 1.0
        weights[:, lo : lo + len(rows)] = _torch_resize(probe[None, None], (len(rows), n_out))[0, 0].numpy().T
        probe[rows, lo + rows] = float("nan")
        window[:, lo : lo + len(rows)] = np.isnan(_torch_resize(probe[None, None], (len(rows), n_out))[0, 0].numpy().T)
    starts, sizes = window.argmax(1), window.sum(1)
    packed = np.zeros((n_out, sizes.max()), np.float32)
    for o, (s, n) in enumerate(zip(starts, sizes, strict=True)):
        packed[o, :n] = weights[o, s : s + n]
    return starts.astype(np.int32), sizes.astype(np.int32), packed


def _checked(plan: AxisPlan, n_in: int, width: bool) -> bool:
    """Whether ``plan`` gives torch's float32 sums bit for bit on random input (CHECK_LINES lines, every output:
    a grouping that differs only in a few edge windows shows within them)."""
    import torch

    rng = np.random.default_rng(n_in)
    n_out = len(plan.starts)
    if width:  # uint8 values, as the width pass reads the frame
        src = rng.integers(0, 256, (CHECK_LINES, n_in, 1), dtype=np.uint8)
        mine = np.empty((CHECK_LINES, n_out, 1), np.float32)
        lanes = np.empty(BLOCK_ROWS, np.float32)
        _width_pass(src, *plan.arrays(), mine, np.empty((n_in, BLOCK_ROWS), np.float32), lanes)
        theirs = _torch_resize(torch.from_numpy(src[None, None, :, :, 0].astype(np.float32)), (CHECK_LINES, n_out))
        return np.array_equal(mine[:, :, 0], theirs[0, 0].numpy())
    src = rng.uniform(-60, 320, (n_in, CHECK_LINES)).astype(np.float32)  # the width pass's sums overshoot [0, 255]
    mine = np.empty((n_out, CHECK_LINES), np.float32)
    _height_sums(src, *plan.arrays(), mine, np.empty(CHECK_LINES, np.float32))
    theirs = _torch_resize(torch.from_numpy(src)[None, None], (n_out, CHECK_LINES))
    return np.array_equal(mine, theirs[0, 0].numpy())


def _frame_checked(plan: ResizePlan, src: Size, dst: Size) -> bool:
    """Whether ``plan`` gives torch's float32 result bit for bit for a random RGB frame laid out as torchvision
    hands it to torch (channels last), both passes: the axes' checks ran one channel, contiguous."""
    import torch

    frame = np.random.default_rng(src[0] * dst[1]).integers(0, 256, (*src, 3), dtype=np.uint8)
    wide = np.empty((src[0], dst[1], 3), np.float32)
    lanes = np.empty(BLOCK_ROWS * 3, np.float32)
    _width_pass(frame, *plan.width.arrays(), wide, np.empty((src[1], BLOCK_ROWS * 3), np.float32), lanes)
    mine = np.empty((dst[0], dst[1] * 3), np.float32)
    _height_sums(wide.reshape(src[0], -1), *plan.height.arrays(), mine, np.empty(dst[1] * 3, np.float32))
    theirs = _torch_resize(torch.from_numpy(frame.astype(np.float32)).permute(2, 0, 1)[None], dst)
    return np.array_equal(mine, theirs[0].permute(1, 2, 0).reshape(dst[0], -1).numpy())


def plain_terms(sizes: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """How many of each window's terms are summed plainly (the first product, then the grouped additions)."""
    plain, left = np.ones_like(sizes), sizes - 1  # the same dtype as sizes
    for width in widths:
        plain, left = plain + left // width * width, left % width
    return plain


@lru_cache(maxsize=256)
def _axis_plan(n_in: int, n_out: int, width: bool) -> AxisPlan | None:
    """The axis's plan: the one grouping (of the distinct ones) that reproduces torch; None where none or two do."""
    starts, sizes, weights = _probe_axis(n_in, n_out)
    distinct = {tuple(plain_terms(sizes, widths)) for widths in GROUPINGS}
    plans = [AxisPlan(starts, sizes, np.array(plain, np.int32), weights) for plain in sorted(distinct)]
    passed = [plan for plan in plans if _checked(plan, n_in, width)]
    if len(passed) == 1:
        return passed[0]
    _not_reproduced(f"a {'width' if width else 'height'} of {n_in} to {n_out}")
    return None


@lru_cache(maxsize=256)
def plan_resize(src: Size, dst: Size) -> ResizePlan | None:
    """The compiled resize of ``src`` frames to ``dst``, checked against torch here (a process with torch); None
    where no grouping reproduces torch (then torch itself resizes). Cached per size pair."""
    width, height = _axis_plan(src[1], dst[1], True), _axis_plan(src[0], dst[0], False)
    if not (width and height):
        return None
    if not _frame_checked(plan := ResizePlan(width, height), src, dst):
        _not_reproduced(f"{src[1]}x{src[0]} to {dst[1]}x{dst[0]}")
        return None
    return plan


def _not_reproduced(what: str) -> None:
    print(f"decode: torch's resize of {what} is not reproduced here; torch does it (slower)", file=sys.stderr)


_UNPLANNED: set[tuple[Size, Size]] = set()  # size pairs a plan was missing for in this process, said once


class QwenResize:
    """Qwen's resize of one uint8 (H, W, 3) frame to ``size``: by the compiled passes where ``plans`` holds the
    frame's (source, target) pair, else by torch's own call, written as torchvision makes it (float32,
    interpolate, clamp, round, uint8; tests/stages/test_decode_worker.py holds both equal to torchvision's call).
    Applied to each frame as it is decoded: a worker holds the clip at its resized size, never at the source's
    (768 sampled 1080p frames would be 4.8 GB)."""

    def __init__(self, plans: dict[tuple[Size, Size], ResizePlan] | None = None, threads: int = 1):
        self.plans = plans or {}
        self.threads = threads
        self._buffers: dict[tuple, np.ndarray] = {}  # reused frame to frame

    def _buffer(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        key = (shape, dtype)
        if key not in self._buffers:
            self._buffers[key] = np.empty(shape, dtype)
        return self._buffers[key]

    def __call__(self, frame: np.ndarray, size: Size) -> np.ndarray:
        if frame.shape[:2] == size:
            return frame
        plan = self.plans.get((frame.shape[:2], size))
        if plan is None:
            if self.plans and (frame.shape[:2], size) not in _UNPLANNED:  # frames of another size than probed
                _UNPLANNED.add((frame.shape[:2], size))
                _not_reproduced(f"{frame.shape[1]}x{frame.shape[0]} frames (not the size planned)")
            return self._by_torch(frame, size)
        (height, width, channels), (out_h, out_w) = frame.shape, size
        wide = self._buffer((height, out_w, channels), np.float32)
        block = self._buffer((width, BLOCK_ROWS * channels), np.float32)
        lanes = self._buffer((BLOCK_ROWS * channels,), np.float32)
        _width_pass(np.ascontiguousarray(frame), *plan.width.arrays(), wide, block, lanes)
        out = np.empty((out_h, out_w, channels), np.uint8)
        _height_pass(wide, *plan.height.arrays(), out, self._buffer((out_w * channels,), np.float32))
        return out

    def _by_torch(self, frame: np.ndarray, size: Size) -> np.ndarray:
        import torch  # here: a worker with plans for its frames never loads torch

        source = self._buffer(frame.shape, np.float32)
        np.copyto(source, frame)  # numpy's uint8 -> float copy: torch's copy of a channels-last view took 1.5 ms
        with _torch_threads(torch, self.threads):
            resized = _torch_resize(torch.from_numpy(source).permute(2, 0, 1)[None], size)
            planes = resized[0].clamp_(0, 255).round_().numpy()  # whole numbers: to uint8 is exact
        out = np.empty((*size, 3), np.uint8)
        # A plane at a time: numpy's float -> uint8 assignment of a (H, W) plane into the (H, W, 3) frame, 0.8 ms a
        # 644x364 frame where torch's copy of the permuted float result took 1.9 (one thread, measured).
        for channel, plane in enumerate(planes):
            out[:, :, channel] = plane
        return out


@contextlib.contextmanager
def _torch_threads(torch, threads: int):
    """torch on the worker's share of the cores (it would take them all in every worker), as before after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
