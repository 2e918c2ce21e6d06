"""Check each distinct media reference once: resolve it safely, hash its content, probe its header.

Probes (image size and decodability; video stream, duration, fps, frame count) are cached by content hash
in a DuckDB file outside the stage's outputs, so reruns and repeated references cost a stat, not a decode.
Thresholds that depend on params (aspect ratio, minimum side) are applied after the cache, never stored in it.
Every path in a result (a resolved path, a reject's detail) is shown relative to the project root, so the
output tables hash the same in every checkout directory; library messages have their paths rewritten too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

MEDIA_CHECKS_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("is_frame_list", pa.bool_()),
        ("data_folder", pa.string()),
        ("ref", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("path", pa.string()),
        ("frame_paths", pa.list_(pa.string())),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("duration", pa.float64()),
        ("fps", pa.float64()),
        ("nframes", pa.int64()),
    ]
)
DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?:;[\w=-]+)*?;base64,(?P<payload>.*)$", re.S)
FILE_TOKEN = "<file>"  # stands for the probed file in a cached probe's detail (one content, many paths)
PROBE_TABLE = "probe_v2"  # v2: details name the file by FILE_TOKEN; older caches are rebuilt
EXT_BY_MIME = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}


@dataclass
class Probe:
    """What a file's content says about itself (cacheable by content hash)."""

    error: str | None = None  # a reason code when unusable
    detail: str | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    fps: float | None = None
    nframes: int | None = None


@dataclass
class MediaRules:
    """The params-dependent limits applied to probes."""

    min_side: int
    max_aspect_ratio: float
    allow_remote: bool
    project_root: Path
    store_dir: Path  # where decoded data: URLs are written, named by content hash
    workers: int


def _library_message(exc: Exception, path: str) -> str:
    """A library's error message with the probed file's path (as given or resolved) replaced by FILE_TOKEN."""
    text = str(exc)
    for form in sorted({path, os.path.realpath(path), os.path.abspath(path)}, key=len, reverse=True):
        text = text.replace(form, FILE_TOKEN)
    return f"{FILE_TOKEN}: {type(exc).__name__}: {text}"


def probe_image(path: str) -> Probe:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # a full decode: a truncated file fails here, not in the trainer
            return Probe(width=img.width, height=img.height)
    except Exception as exc:  # PIL raises many types for bad files
        return Probe("unreadable_image", _library_message(exc, path))


def probe_video(path: str) -> Probe:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                return Probe("no_video_stream", f"{FILE_TOKEN} has no video stream")
            stream = container.streams.video[0]
            duration = (
                float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1_000_000
            )
            fps = float(stream.average_rate) if stream.average_rate else None
            nframes = stream.frames or (round(duration * fps) if fps else 0)
            if duration <= 0 or nframes <= 0:
                return Probe("zero_duration_video", f"{FILE_TOKEN}: duration {duration:.3f} s, {nframes} frames")
            return Probe(width=stream.width, height=stream.height, duration=duration, fps=fps, nframes=nframes)
    except Exception as exc:  # PyAV raises per-codec error types
        return Probe("unreadable_video", _library_message(exc, path))


class ProbeCache:
    """(path, size, mtime) -> sha256 and sha256 -> Probe, kept in a small DuckDB file."""

    def __init__(self, path: Path):
        self.path = path
        self.hashes: dict[tuple[str, int, int], str] = {}
        self.probes: dict[tuple[str, str], Probe] = {}
        self._new_hashes: dict[tuple[str, int, int], str] = {}
        self._new_probes: dict[tuple[str, str], Probe] = {}
        if path.exists():
            try:
                with duckdb.connect(str(path), read_only=True) as con:
                    self.hashes = {(p, s, m): h for p, s, m, h in con.execute("SELECT * FROM file_hash").fetchall()}
                    for row in con.execute(f"SELECT * FROM {PROBE_TABLE}").fetchall():
                        self.probes[(row[0], row[1])] = Probe(*row[2:])
            except duckdb.Error:
                self.hashes, self.probes = {}, {}  # an unreadable cache is only a slower run

    def sha256(self, path: str) -> str:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self.hashes:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            self.hashes[key] = self._new_hashes[key] = digest.hexdigest()
        return self.hashes[key]

    def probe(self, kind: str, sha: str, path: str) -> Probe:
        key = (kind, sha)
        if key not in self.probes:
            self.probes[key] = self._new_probes[key] = probe_image(path) if kind == "image" else probe_video(path)
        return self.probes[key]

    def save(self) -> None:
        if not (self._new_hashes or self._new_probes):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".media.", suffix=".duckdb", dir=self.path.parent)
        os.close(fd)
        os.unlink(tmp)
        hashes = pa.Table.from_pylist(
            [{"path": p, "size": s, "mtime_ns": m, "sha256": h} for (p, s, m), h in self.hashes.items()]
        )
        probes = pa.Table.from_pylist([{"kind": k, "sha256": h, **vars(p)} for (k, h), p in self.probes.items()])
        try:
            with duckdb.connect(tmp) as con:
                con.register("hashes", hashes)
                con.register("probes", probes)
                con.execute("CREATE TABLE file_hash AS SELECT * FROM hashes")
                con.execute(f"CREATE TABLE {PROBE_TABLE} AS SELECT * FROM probes")
            os.replace(tmp, self.path)
        finally:
            for leftover in (tmp, tmp + ".wal"):  # a failed write (a full disk) leaves no temp database behind
                if os.path.exists(leftover):
                    os.unlink(leftover)


class MediaChecker:
    """Resolves and checks media references against the rules; one result row per distinct reference."""

    def __init__(self, rules: MediaRules, cache: ProbeCache):
        self.rules = rules
        self.cache = cache

    def _display_path(self, real: str) -> str:
        """``real`` relative to the project root when inside it (the same in every checkout), else as is."""
        root = os.path.realpath(self.rules.project_root)
        return os.path.relpath(real, root) if real == root or real.startswith(root + os.sep) else real

    def _resolve(self, ref: str, data_folder: str) -> tuple[str | None, str | None, str | None]:
        """(real path, reason, detail) for a file, data: or http(s) reference."""
        if re.match(r"^https?://", ref, re.I):
            if not self.rules.allow_remote:
                return None, "remote_media_disabled", f"{ref[:80]} (set validate.allow_remote_media to fetch)"
            return self._fetch_remote(ref)
        if ref.startswith("data:"):
            return self._store_data_url(ref)
        ref_path = ref[len("file://") :] if ref.startswith("file://") else ref
        folder = os.path.realpath(data_folder)
        real = os.path.realpath(os.path.join(folder, ref_path))
        if not (real == folder or real.startswith(folder + os.sep)):
            shown, shown_folder = self._display_path(real), self._display_path(folder)
            return None, "media_path_escape", f"{ref} resolves to {shown}, outside {shown_folder}"
        if not os.path.isfile(real):
            return None, "media_file_missing", f"{ref} (looked for {self._display_path(real)})"
        return real, None, None

    def _store_data_url(self, ref: str) -> tuple[str | None, str | None, str | None]:
        match = DATA_URL.match(ref)
        try:
            if not match:
                raise ValueError("not of the form data:<mime>;base64,<payload>")
            payload = base64.b64decode(match["payload"], validate=True)
        except (binascii.Error, ValueError) as exc:
            return None, "bad_base64", f"data: URL ({len(ref)} chars): {exc}"
        sha = hashlib.sha256(payload).hexdigest()
        target = self.rules.store_dir / (sha + EXT_BY_MIME.get(match["mime"], ".bin"))
        if not target.exists():
            self.rules.store_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.rules.store_dir, prefix=".part.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(payload)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):  # a failed write (a full disk) leaves no part file behind
                    os.unlink(tmp)
        return os.path.realpath(target), None, None

    def _fetch_remote(self, ref: str) -> tuple[str | None, str | None, str | None]:
        import urllib.request

        try:
            with urllib.request.urlopen(ref, timeout=30) as resp:  # noqa: S310 (opt-in by config)
                data = resp.read()
        except OSError as exc:
            return None, "media_file_missing", f"{ref}: {exc}"
        return self._store_data_url("data:;base64," + base64.b64encode(data).decode())

    def _limits(self, probe: Probe) -> tuple[str | None, str | None]:
        if probe.error or probe.width is None:
            return probe.error, probe.detail
        w, h = probe.width, probe.height
        if max(w, h) / max(1, min(w, h)) > self.rules.max_aspect_ratio:
            return "image_aspect_ratio", f"{w}x{h} is over {self.rules.max_aspect_ratio:g}:1"
        if min(w, h) < self.rules.min_side:
            return "image_too_small", f"{w}x{h}: a side is under {self.rules.min_side} px"
        return None, None

    def _check_file(self, kind: str, ref: str, data_folder: str) -> dict:
        real, reason, detail = self._resolve(ref, data_folder)
        if reason:
            return {"reason": reason, "detail": detail}
        sha = self.cache.sha256(real)
        probe = self.cache.probe(kind, sha, real)
        reason, detail = self._limits(probe) if kind == "image" else (probe.error, probe.detail)
        shown = self._display_path(real)
        return {
            "reason": reason,
            "detail": detail.replace(FILE_TOKEN, shown) if detail else detail,
            "path": shown,
            "sha256": sha,
            "width": probe.width,
            "height": probe.height,
            "duration": probe.duration,
            "fps": probe.fps,
            "nframes": probe.nframes,
        }

    def _check_frames(self, ref: str, data_folder: str) -> dict:
        frames = json.loads(ref)
        if not all(isinstance(f, str) and f for f in frames):
            return {"reason": "media_missing_url", "detail": "a frame of the frame list is not a path"}
        checked = [self._check_file("image", f, data_folder) for f in frames]
        for i, c in enumerate(checked):
            if c["reason"]:
                return {"reason": c["reason"], "detail": f"frame {i}: {c['detail']}"}
        first = checked[0]
        return {
            "reason": None,
            "detail": None,
            "frame_paths": [c["path"] for c in checked],
            "sha256": hashlib.sha256("".join(c["sha256"] for c in checked).encode()).hexdigest(),
            "width": first["width"],
            "height": first["height"],
            "nframes": len(frames),
        }

    def check_one(self, kind: str, is_frame_list: bool, data_folder: str, ref: str) -> dict:
        result = self._check_frames(ref, data_folder) if is_frame_list else self._check_file(kind, ref, data_folder)
        return {"kind": kind, "is_frame_list": is_frame_list, "data_folder": data_folder, "ref": ref, **result}

    def check_all(self, refs: Iterable[tuple[str, bool, str, str]]) -> pa.Table:
        refs = list(refs)
        with ThreadPoolExecutor(max_workers=max(1, self.rules.workers)) as pool:
            rows = list(pool.map(lambda r: self.check_one(*r), refs))
        return pa.Table.from_pylist(rows, schema=MEDIA_CHECKS_SCHEMA)
