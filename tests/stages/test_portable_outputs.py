"""Outputs name paths relative to the project root: the same data in two checkout directories gives the same bytes.

DVC hashes data/validated and data/frames; a reject detail holding an absolute path (ours or one inside a PIL,
PyAV or ffmpeg message) would make every checkout directory (a GPU host, a CI runner) see changed data.
"""

import shutil
from pathlib import Path

import pyarrow.parquet as pq

from schemas.params import parse_params
from stages.decode.stage import run as decode
from stages.validate import run as validate
from tests.conftest import DECODE_IN_PROCESS, demo_params


def two_roots(project: Path, tmp_path_factory) -> list[Path]:
    """``project`` and a copy of its data at a different path (and depth)."""
    other = tmp_path_factory.mktemp("another-checkout") / "deeper" / "project"
    shutil.copytree(project / "data", other / "data")
    return [project, other]


def details(path: Path) -> list[str]:
    return [r["detail"] for r in pq.read_table(path, columns=["detail"]).to_pylist()]


def assert_no_root(texts: list[str], root: Path) -> None:
    for form in {str(root), str(root.resolve())}:
        leaks = [t for t in texts if t and form in t]
        assert not leaks, f"details hold the project root {form}: {leaks}"


def test_validate_outputs_are_identical_from_two_roots(project, tmp_path_factory):
    roots = two_roots(project, tmp_path_factory)
    for root in roots:
        validate(demo_params(), root)
        assert_no_root(details(root / "data/validated/rejects.parquet"), root)
    for name in ("rejects.parquet", "samples.parquet"):
        a, b = ((root / "data/validated" / name).read_bytes() for root in roots)
        assert a == b, name
    rows = pq.read_table(project / "data/validated/rejects.parquet").to_pylist()
    shown = "\n".join(f"{r['reason']}: {r['detail']}" for r in rows)
    # Library messages are kept, with the path made relative (PIL and PyAV name the file they failed on).
    assert "unreadable_image: data/demo/images/not_an_image.jpg: UnidentifiedImageError" in shown
    assert "'data/demo/images/not_an_image.jpg'" in shown
    assert "unreadable_video: data/demo/videos/garbage.mp4: InvalidDataError" in shown
    assert "looked for data/demo/images/nope.jpg" in shown


def test_reject_details_use_the_users_words(project):
    validate(demo_params(), project)
    texts = details(project / "data/validated/rejects.parquet")
    assert not [t for t in texts if "BIGINT" in t or "VARCHAR" in t], texts
    assert "message 0 content is a number, not a string or a list of parts" in texts


def test_decode_rejects_are_identical_from_two_roots(project, tmp_path_factory):
    params = parse_params(
        {
            "dataset_config": {
                "datasets": [
                    {"path": "data/demo/qwen_utils.parquet", "data_folder": "data/demo", "data_type": "parquet"}
                ]
            },
            "validate": {"media_cache": ".c/m.duckdb"},
            "decode": DECODE_IN_PROCESS,
        }
    )
    roots = two_roots(project, tmp_path_factory)
    for root in roots:
        validate(params, root)
        # A frame replaced after validate: PIL's message (through qwen-vl-utils) names it by its absolute path.
        (root / "data/demo/frames/clip/003.jpg").write_bytes(b"not an image any more")
        decode(params, root)
        texts = details(root / "data/frames/rejects.parquet")
        assert any("'data/demo/frames/clip/003.jpg'" in t for t in texts), texts
        assert_no_root(texts, root)
    a, b = ((root / "data/frames/rejects.parquet").read_bytes() for root in roots)
    assert a == b
