"""`qvl demo DIR`: a small, realistic multimodal chat dataset with real media files and known bad rows.

Real images (varied sizes and aspect ratios, JPEG/PNG), real encoded videos made with ffmpeg (varied duration,
fps, resolution), a list-of-frames video, and chat samples in the three accepted formats: OpenAI (JSONL),
qwen-vl-utils parts (Parquet) and Qwen's official fine-tuning format (JSON). ``BAD_ROWS`` lists the rows that
must be rejected and the reason each must get, so every stage's error path shows in the demo.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from stages.demo_rows import BAD_OFFICIAL_ROWS, BAD_ROWS, INVALID_UTF8_ROW
from stages.io import atomic_dir

__all__ = ["BAD_OFFICIAL_ROWS", "BAD_ROWS", "INVALID_UTF8_ROW", "write_demo"]

IMAGES = {  # name: (width, height, format)
    "street.jpg": (640, 480, "JPEG"),
    "portrait.jpg": (360, 640, "JPEG"),
    "banner.png": (1024, 256, "PNG"),
    "square.png": (448, 448, "PNG"),
    "small.jpg": (64, 48, "JPEG"),
    "wide.jpg": (1280, 720, "JPEG"),
    # bad media, rejected by validate
    "tiny.png": (12, 12, "PNG"),
    "sliver.png": (2010, 10, "PNG"),
}
VIDEOS = {  # name: (seconds, fps, width, height)
    "walk.mp4": (3.0, 25, 320, 240),
    "talk.mp4": (2.0, 30, 640, 360),
    "slow.mp4": (5.0, 10, 256, 256),
    "tall.mp4": (1.5, 24, 240, 426),
}
WORDS = [
    "red",
    "blue",
    "green",
    "large",
    "small",
    "bright",
    "dark",
    "round",
    "square",
    "moving",
    "still",
    "person",
    "car",
    "tree",
    "sky",
    "road",
    "house",
    "window",
    "door",
    "light",
    "shadow",
    "water",
    "cloud",
    "bird",
    "dog",
    "cat",
    "table",
    "chair",
    "book",
    "cup",
]


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randrange(1, max(2, width // 2)), y0 + rng.randrange(1, max(2, height // 2))]
        draw.rectangle(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


# The demo's bytes are the same on every x86-64 machine (its DVC hashes are committed): measured 2026-12-02 on a
# machine without AVX, x264's output differs between its SIMD levels and ffmpeg's AAC encoder with its SIMD off;
# Pillow's zlib-ng picks code paths by CPU too, so PNGs are written as stored (uncompressed) deflate blocks.
# libjpeg-turbo's output is the same with its SIMD off (JSIMD_FORCENONE=1, measured).
PORTABLE = {"PNG": {"compress_level": 0}}


def _write_images(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    for i, (name, (w, h, fmt)) in enumerate(IMAGES.items()):
        _picture(w, h, i).save(root / "images" / name, fmt, **PORTABLE.get(fmt, {}))
    # A JPEG cut in half: its header reads, its pixels do not.
    data = (root / "images" / "street.jpg").read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "images" / "not_an_image.jpg").write_text("this is not a JPEG\n")
    frames = root / "frames" / "clip"
    frames.mkdir(parents=True)
    for i in range(6):
        _picture(320, 240, 100 + i).save(frames / f"{i:03d}.jpg", "JPEG")


def _run_ffmpeg(stream) -> None:
    stream.overwrite_output().run(cmd=imageio_ffmpeg.get_ffmpeg_exe(), quiet=True)


def _write_videos(root: Path) -> None:
    (root / "videos").mkdir(parents=True)
    for name, (seconds, fps, w, h) in VIDEOS.items():
        src = ffmpeg.input(f"testsrc2=duration={seconds}:size={w}x{h}:rate={fps}", f="lavfi")
        _run_ffmpeg(
            src.output(
                str(root / "videos" / name),
                vcodec="libx264",
                pix_fmt="yuv420p",
                g=fps,
                movflags="+faststart",
                **{"x264-params": "threads=1:asm=0"},  # x264's SIMD levels encode differently: C only
            )
        )
    # Bad videos: audio only, not a video at all, a clip truncated mid-stream (decode stage catches it).
    tone = ffmpeg.input("sine=frequency=440:duration=1", f="lavfi")
    _run_ffmpeg(tone.output(str(root / "videos" / "audio_only.mp4"), acodec="alac"))  # ALAC: integer, unlike AAC
    (root / "videos" / "garbage.mp4").write_bytes(b"\x00\x01not a video" * 64)
    data = (root / "videos" / "slow.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(data[: int(len(data) * 0.6)])
    (root / "videos" / "zero_length.mp4").write_bytes(_zero_duration((root / "videos" / "walk.mp4").read_bytes()))


def _zero_duration(mp4: bytes) -> bytes:
    """The same MP4 with the movie, track and media durations set to 0 in its (faststart) header."""
    data = bytearray(mp4)
    for box, offset in ((b"mvhd", 20), (b"tkhd", 24), (b"mdhd", 20)):  # version-0 box layouts
        at = data.find(box)
        struct.pack_into(">I", data, at + offset, 0)
    return bytes(data)


def _caption(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _openai_rows(rng: random.Random) -> list[dict]:
    img = lambda p: {"type": "image_url", "image_url": {"url": p}}  # noqa: E731
    vid = lambda p, **kw: {"type": "video_url", "video_url": {"url": p, **kw}}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    rows = []
    for i, name in enumerate(["street.jpg", "portrait.jpg", "banner.png", "square.png", "small.jpg", "wide.jpg"]):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [img(f"images/{name}"), text("Describe this image.")]},
                    {"role": "assistant", "content": _caption(rng, 10 + i)},
                ]
            }
        )
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "You are a careful visual assistant."},
                {
                    "role": "user",
                    "content": [
                        img("images/street.jpg"),
                        img("images/square.png"),
                        text("What differs between these two pictures?"),
                    ],
                },
                {"role": "assistant", "content": [text(_caption(rng, 14))]},
                {"role": "user", "content": "And which one is brighter?"},
                {"role": "assistant", "content": _caption(rng, 6)},
            ]
        }
    )
    for name in [*VIDEOS, "truncated.mp4"]:  # truncated.mp4 passes validate's header check; decode rejects it
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [vid(f"videos/{name}"), text("What happens in this video?")]},
                    {"role": "assistant", "content": _caption(rng, 12)},
                ]
            }
        )
    rows.append(
        {
            "messages": [
                {"role": "user", "content": [vid("videos/slow.mp4", start=1.0, end=4.0), text("Summarise this part.")]},
                {"role": "assistant", "content": _caption(rng, 9)},
            ]
        }
    )
    for _ in range(4):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": _caption(rng, 6).rstrip(".") + "?"},
                    {"role": "assistant", "content": _caption(rng, 15)},
                ]
            }
        )
    buf = io.BytesIO()
    _picture(96, 64, 7).save(buf, "PNG", **PORTABLE["PNG"])
    rows.append(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        img("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()),
                        text("What colours do you see?"),
                    ],
                },
                {"role": "assistant", "content": _caption(rng, 7)},
            ]
        }
    )
    return rows


def _qwen_utils_rows(rng: random.Random) -> list[dict]:
    rows = []
    for name in ["wide.jpg", "banner.png", "portrait.jpg"]:
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"images/{name}"},
                            {"type": "text", "text": "What is shown?"},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": _caption(rng, 8)}]},
                ]
            }
        )
    rows.append(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": [f"frames/clip/{i:03d}.jpg" for i in range(6)]},
                        {"type": "text", "text": "Describe the sequence."},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": _caption(rng, 11)}]},
            ]
        }
    )
    rows.append(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": "videos/talk.mp4", "video_start": 0.5, "video_end": 1.5},
                        {"type": "text", "text": "What moves?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": _caption(rng, 5)}]},
            ]
        }
    )
    return rows


def _qwen_official_rows(rng: random.Random) -> list[dict]:
    return [
        {
            "image": "images/square.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat shape dominates?"},
                {"from": "gpt", "value": _caption(rng, 6)},
            ],
        },
        {
            "image": ["images/street.jpg", "images/small.jpg"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nCompare them."},
                {"from": "gpt", "value": _caption(rng, 9)},
                {"from": "human", "value": "Which is larger?"},
                {"from": "gpt", "value": _caption(rng, 4)},
            ],
        },
        {
            "video": "videos/walk.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat is happening?"},
                {"from": "gpt", "value": _caption(rng, 10)},
            ],
        },
    ]


def write_demo(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the demo dataset to ``out_dir`` atomically; returns the directory."""
    with atomic_dir(out_dir) as tmp:
        rng = random.Random(seed)
        _write_images(tmp)
        _write_videos(tmp)
        good = _openai_rows(rng)
        lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
        lines += [bad.encode() for bad, _ in BAD_ROWS]
        lines += [INVALID_UTF8_ROW, json.dumps(good[0]).encode()]  # the last one is an exact duplicate
        (tmp / "chat.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        utils_rows = _qwen_utils_rows(rng)
        pq.write_table(
            pa.table({"messages": [json.dumps(r["messages"]) for r in utils_rows]}), tmp / "qwen_utils.parquet"
        )
        official = _qwen_official_rows(rng) + [row for row, _ in BAD_OFFICIAL_ROWS]
        (tmp / "qwen_official.json").write_text(json.dumps(official, indent=1))
    return Path(out_dir)
