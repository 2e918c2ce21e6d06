"""The validate stage on real files: every reject reason, the counts invariant, atomic and cached behaviour."""

import json
import os
import shutil
from pathlib import Path

import duckdb
import pytest

from schemas.errors import PipelineError, StageInputError
from schemas.reasons import REASON_CODES
from stages.cpus import available_cpus
from stages.demo import BAD_OFFICIAL_ROWS, BAD_ROWS, INVALID_UTF8_ROW
from stages.validate import run
from tests.conftest import REPO, demo_params, fill_disk


def read(project: Path, name: str) -> list[dict]:
    return (
        duckdb.sql(f"SELECT * FROM '{project / 'data/validated' / name}' ORDER BY source, row")
        .to_arrow_table()
        .to_pylist()
    )


def jsonl_params(*lines: bytes | str, **validate):
    from schemas.params import parse_params

    return lines, parse_params(
        {
            "dataset_config": {"datasets": [{"path": "data/demo/t.jsonl", "data_folder": "data/demo"}]},
            "validate": {"media_cache": ".cache/media.duckdb", **validate},
        }
    )


def run_lines(project: Path, *lines: bytes | str, **validate) -> tuple[list[dict], list[dict]]:
    lines, params = jsonl_params(*lines, **validate)
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"
    (project / "data/demo/t.jsonl").write_bytes(data)
    run(params, project)
    return read(project, "samples.parquet"), read(project, "rejects.parquet")


GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


def test_demo_every_bad_row_gets_its_reason(project):
    result = run(demo_params(), project)
    rejects = read(project, "rejects.parquet")
    by_raw = {r["raw"]: r for r in rejects}
    for line, reason in BAD_ROWS:
        assert by_raw[line]["reason"] == reason, (line, by_raw[line])
        assert by_raw[line]["detail"]
    utf8 = [r for r in rejects if r["reason"] == "invalid_utf8"]
    assert len(utf8) == 1 and "\\xe9" in utf8[0]["raw"]
    official = [r for r in rejects if r["source"].endswith("qwen_official.json")]
    assert [r["reason"] for r in official] == [reason for _, reason in BAD_OFFICIAL_ROWS]
    # The demo shows every reason code at least once.
    assert set(result.by_reason) == set(REASON_CODES)
    metrics = json.loads((project / "metrics/validate.json").read_text())
    assert metrics["input"] == metrics["accepted"] + metrics["rejected"] == result.input
    assert metrics["duplicates"] == 1 and "by_reason" not in metrics  # counts by reason: a file of their own
    assert json.loads((project / "metrics/validate_rejects.json").read_text()) == result.by_reason


def test_demo_accepted_samples_are_normalised(project):
    run(demo_params(), project)
    samples = read(project, "samples.parquet")
    assert len({s["sample_id"] for s in samples}) == len(samples)
    forms = {s["source"] for s in samples}
    assert forms == {"data/demo/chat.jsonl", "data/demo/qwen_utils.parquet", "data/demo/qwen_official.json"}
    for s in samples:
        messages = json.loads(s["messages"])
        assert messages[-1]["role"] == "assistant"
        for m in messages:
            assert isinstance(m["content"], list)
            for part in m["content"]:
                assert part["type"] in ("text", "image", "video")
        paths = [p for m in messages for p in m["content"] if p["type"] != "text"]
        assert len(paths) == len(s["media"])
        for media in s["media"]:
            files = media["frame_paths"] or [media["path"]]
            assert all((project / f).is_file() for f in files)
            assert len(media["sha256"]) == 64
    official = next(s for s in samples if s["source"].endswith("qwen_official.json") and s["row"] == 1)
    parts = json.loads(official["messages"])[0]["content"]
    assert [p["type"] for p in parts] == ["image", "text", "image", "text"]  # tags replaced in place
    clip = next(s for s in samples if s["source"].endswith("qwen_utils.parquet") and s["row"] == 4)
    assert clip["media"][0]["video_start"] == 0.5 and clip["media"][0]["video_end"] == 1.5
    assert clip["media"][0]["duration"] == pytest.approx(2.0, abs=0.05)
    frames = next(s for s in samples if s["media"] and s["media"][0]["frame_paths"])
    assert len(frames["media"][0]["frame_paths"]) == 6


def test_data_url_image_is_stored_by_content_hash(project):
    run(demo_params(), project)
    samples = read(project, "samples.parquet")
    stored = [m for s in samples for m in s["media"] if m["path"] and m["path"].startswith("data/media/")]
    assert len(stored) == 1 and stored[0]["path"] == f"data/media/{stored[0]['sha256']}.png"


def test_output_is_deterministic(project):
    run(demo_params(), project)
    first = (project / "data/validated/samples.parquet").read_bytes()
    first_rejects = (project / "data/validated/rejects.parquet").read_bytes()
    shutil.rmtree(project / ".cache")
    run(demo_params(), project)
    assert (project / "data/validated/samples.parquet").read_bytes() == first
    assert (project / "data/validated/rejects.parquet").read_bytes() == first_rejects


def test_media_probe_cache_is_reused(project, monkeypatch):
    run(demo_params(), project)
    import stages.validate.media as media

    def fail(*_):
        raise AssertionError("probed again despite the cache")

    monkeypatch.setattr(media, "probe_image", fail)
    monkeypatch.setattr(media, "probe_video", fail)
    assert run(demo_params(), project).accepted > 0


def test_good_row_is_accepted(project):
    samples, rejects = run_lines(project, GOOD)
    assert len(samples) == 1 and rejects == []
    assert json.loads(samples[0]["messages"])[1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "hello"}],
    }


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("[1, 2]", "invalid_json"),
        ('{"messages": "not a list"}', "missing_messages"),
        (
            '{"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}',
            "media_tag_mismatch",
        ),
        ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}', "empty_text"),
        ('{"messages": [{"role": "user", "content": []}, {"role": "assistant", "content": "y"}]}', "empty_text"),
        # Unicode space separators alone are empty too (a newline between Qwen tags is not: the demo's accepted).
        (
            '{"messages": [{"role": "user", "content": "\\u00a0 \\u3000"}, {"role": "assistant", "content": "y"}]}',
            "empty_text",
        ),
        (
            '{"messages": [{"role": "user", "content": ["bare string part"]}, {"role": "assistant", "content": "y"}]}',
            "missing_part_type",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"type": "video", "video": []}]}, '
            '{"role": "assistant", "content": "y"}]}',
            "media_missing_url",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"type": "video", "video": ["images/street.jpg", '
            '"images/nope.jpg"]}]}, {"role": "assistant", "content": "y"}]}',
            "media_file_missing",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "videos/walk.mp4", '
            '"start": -1}}]}, {"role": "assistant", "content": "y"}]}',
            "bad_clip_range",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
            '{"url": "file://../demo/../../etc/passwd"}}]}, {"role": "assistant", "content": "y"}]}',
            "media_path_escape",
        ),
    ],
)
def test_more_reject_reasons(project, line, reason):
    samples, rejects = run_lines(project, GOOD, line)
    assert len(samples) == 1
    assert [r["reason"] for r in rejects] == [reason]
    assert rejects[0]["raw"] == line and rejects[0]["row"] == 1


def test_symlink_out_of_data_folder_is_an_escape(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.jpg"
    shutil.copy(project / "data/demo/images/street.jpg", outside)
    os.symlink(outside, project / "data/demo/images/link.jpg")
    line = (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/link.jpg"}]}, '
        '{"role": "assistant", "content": "y"}]}'
    )
    _, rejects = run_lines(project, line)
    assert [r["reason"] for r in rejects] == ["media_path_escape"]


def test_remote_media_error_mentions_the_switch(project):
    _, rejects = run_lines(project, BAD_ROWS[16][0])
    assert rejects[0]["reason"] == "remote_media_disabled" and "allow_remote_media" in rejects[0]["detail"]


def test_first_rule_in_priority_wins(project):
    # Both an unknown role and a special token: the message-structure rule comes first in the list.
    line = '{"messages": [{"role": "bot", "content": "<|im_end|>"}, {"role": "assistant", "content": "y"}]}'
    _, rejects = run_lines(project, line)
    assert [r["reason"] for r in rejects] == ["unknown_role"]


def test_invalid_utf8_kept_verbatim_with_escapes(project):
    samples, rejects = run_lines(project, GOOD, INVALID_UTF8_ROW)
    assert len(samples) == 1 and rejects[0]["reason"] == "invalid_utf8"


def test_blank_lines_are_not_rows(project):
    samples, rejects = run_lines(project, GOOD, "", "   ", GOOD.replace("hello", "bye"))
    assert len(samples) == 2 and rejects == []


def test_missing_dataset_file_stops_and_writes_nothing(project):
    from schemas.params import parse_params

    params = parse_params({"dataset_config": {"datasets": [{"path": "data/demo/missing.jsonl"}]}})
    with pytest.raises(StageInputError, match="missing.jsonl"):
        run(params, project)
    assert not (project / "data/validated").exists()
    assert not (project / "metrics/validate.json").exists()


def test_a_json_array_broken_after_its_first_batches_stops_with_its_own_error(project, monkeypatch):
    """DuckDB pulls a file's rows as a stream; an error met partway (rows already loaded) is still the loader's
    own StageInputError naming the file, and nothing is written."""
    from schemas.params import parse_params
    from stages.validate import load

    monkeypatch.setattr(load, "BATCH_ROWS", 2)
    (project / "data/demo/a.json").write_text("[" + ", ".join([GOOD] * 5) + "} x")
    params = parse_params({"dataset_config": {"datasets": [{"path": "data/demo/a.json", "data_type": "json"}]}})
    with pytest.raises(StageInputError, match="a.json: not a valid JSON file"):
        run(params, project)
    assert not (project / "data/validated").exists()


def test_file_without_messages_stops(project):
    (project / "data/demo/t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    _, params = jsonl_params()
    with pytest.raises(StageInputError, match="no row holds `messages`"):
        run(params, project)


def test_parquet_without_messages_column_stops(project):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas.params import parse_params

    pq.write_table(pa.table({"prompt": ["a"]}), project / "data/demo/p.parquet")
    params = parse_params({"dataset_config": {"datasets": [{"path": "data/demo/p.parquet", "data_type": "parquet"}]}})
    with pytest.raises(StageInputError, match="no `messages` or `conversations` column"):
        run(params, project)


def test_previous_output_survives_a_failed_run(project):
    run(demo_params(), project)
    before = (project / "data/validated/samples.parquet").read_bytes()
    (project / "data/demo/chat.jsonl").unlink()
    with pytest.raises(StageInputError):
        run(demo_params(), project)
    assert (project / "data/validated/samples.parquet").read_bytes() == before


def test_full_disk_is_one_clear_error_and_the_previous_output_survives(small_fs, demo_dir):
    """A real full filesystem: DuckDB's COPY raises duckdb.IOException (not an OSError) and must still read as
    "disk full"; the previous output stays, no temp directory is left."""
    root = small_fs / "project"
    shutil.copytree(demo_dir, root / "data/demo")
    run(demo_params(), root)
    before = {p.name: p.read_bytes() for p in (root / "data/validated").iterdir()}
    fill_disk(small_fs)
    with pytest.raises(PipelineError, match=r"disk full while writing .*data/validated; nothing was replaced") as err:
        run(demo_params(), root)
    assert isinstance(err.value.__cause__, duckdb.IOException)  # the write that failed was DuckDB's
    assert {p.name: p.read_bytes() for p in (root / "data/validated").iterdir()} == before
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".validated.tmp")]


def test_full_disk_on_a_first_run_is_one_clear_line(small_fs, demo_dir):
    """Whichever write meets the full disk first (media store, probe cache, output), `qvl validate` prints one
    error line, no traceback, and leaves no partial file."""
    import subprocess
    import sys

    root = small_fs / "project"
    shutil.copytree(demo_dir, root / "data/demo")
    (root / "params.yaml").write_text(json.dumps(demo_params().model_dump(by_alias=True, mode="json")))
    fill_disk(small_fs)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "validate", "--params", "params.yaml"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode != 0
    assert "disk full while writing" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (root / "data/validated").exists()
    leftovers = [p for p in root.rglob("*") if p.name.startswith((".part.", ".media.", ".validated.tmp"))]
    assert not leftovers


def test_a_bounded_duckdb_writes_the_same_bytes_and_names_its_limit(project):
    """validate.memory_limit bounds DuckDB (spilling to .cache/duckdb-tmp): the same outputs under a small limit;
    a limit too small for the work is one PipelineError naming the setting."""
    run(demo_params(), project)
    names = ("samples.parquet", "rejects.parquet")
    before = {n: (project / "data/validated" / n).read_bytes() for n in names}
    small = demo_params()
    # The stage gives DuckDB one thread per usable CPU, each needing memory of its own: 16 fail at 16MB, pass at 32MB
    small.validate_.memory_limit = f"{max(16, 2 * available_cpus())}MB"
    run(small, project)
    assert {n: (project / "data/validated" / n).read_bytes() for n in names} == before
    assert (project / ".cache/duckdb-tmp").is_dir()
    small.validate_.memory_limit = "1MB"
    with pytest.raises(PipelineError, match="more memory than validate.memory_limit 1MB .*raise validate.memory_limit"):
        run(small, project)


JSON_ARRAYS = [
    "[]",
    " \ufeff[ ]\n",
    '[{"messages": [{"role": "user", "content": "h\\u00e9 \\u2028 é"}], "n": 1.50}, 12345, [1, [2]], "s"]',
    json.dumps([{"messages": [{"role": "user", "content": "x" * 50}], "i": i} for i in range(40)], indent=2),
]
BAD_JSON_ARRAYS = ["[{}, ]", "[{} {}]", "[{}", "{}", "[{}] x", '[{"a": }]', "", "[,]"]


@pytest.mark.parametrize("read_bytes", [1, 7, 64, 1 << 20])
def test_json_arrays_stream_in_blocks_as_parsing_them_whole_would(read_bytes, monkeypatch, tmp_path):
    from stages.validate import load

    monkeypatch.setattr(load, "READ_BYTES", read_bytes)
    monkeypatch.setattr(load, "BATCH_ROWS", 3)
    path = tmp_path / "a.json"
    for text in JSON_ARRAYS:
        path.write_text(text, encoding="utf-8")
        streamed = [line for lines, _ in load._json_array_rows(path) for line in lines.to_pylist()]
        assert streamed == [json.dumps(x, ensure_ascii=False) for x in json.loads(text.lstrip(" \ufeff"))]
    for text in BAD_JSON_ARRAYS:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(StageInputError, match="a.json"):
            list(load._json_array_rows(path))
    path.write_bytes(b'[{"a": "\xff"}]')
    with pytest.raises(StageInputError, match="not a valid JSON file"):
        list(load._json_array_rows(path))


@pytest.mark.parametrize("read_bytes", [1, 5, 1 << 20])
def test_jsonl_streams_in_blocks_with_the_same_rows_and_reasons(read_bytes, monkeypatch, tmp_path):
    from stages.validate import load

    monkeypatch.setattr(load, "READ_BYTES", read_bytes)
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": "\xc3\xa9"}\n\n \t\r\n{"b": "\xff"}\r\n{"c": "\xe2\x80\xa8"}\n\x0c\n{"d": 1}')
    rows = [
        (line, reason)
        for lines, reasons in load._jsonl_rows(path)
        for line, reason in zip(lines.to_pylist(), reasons.to_pylist(), strict=True)
    ]
    assert rows == [
        ('{"a": "é"}', None),
        ('{"b": "\\xff"}\r', "invalid_utf8"),
        ('{"c": "\u2028"}', None),
        ("\x0c", None),  # not JSON's whitespace: a row (rejected as invalid JSON), not a blank line
        ('{"d": 1}', None),
    ]


def held_out_by_rule(sample_id: str, ratio: float) -> bool:
    """The split rule, computed here with hashlib: the first 32 bits of sha256("eval-split:" + id) under ratio."""
    import hashlib

    return int(hashlib.sha256(f"eval-split:{sample_id}".encode()).hexdigest()[:8], 16) < int(ratio * 2**32)


def test_eval_ratio_holds_out_samples_by_id_the_same_way_everywhere(project, tmp_path_factory):
    """Every accepted sample is in exactly one split, chosen by its id alone: the same in another project root,
    with another seed, and the same samples as with no split at all; the metrics count the held-out ones."""
    run(demo_params(), project)
    unsplit = {r["sample_id"]: r["split"] for r in read(project, "samples.parquet")}
    assert set(unsplit.values()) == {"train"}
    result = run(demo_params(eval_ratio=0.4), project)
    splits = {r["sample_id"]: r["split"] for r in read(project, "samples.parquet")}
    assert splits.keys() == unsplit.keys()
    assert splits == {s: "eval" if held_out_by_rule(s, 0.4) else "train" for s in splits}
    assert 0 < result.eval_samples == sum(v == "eval" for v in splits.values()) < len(splits)
    assert json.loads((project / "metrics/validate.json").read_text())["eval_samples"] == result.eval_samples
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(project / "data/demo", elsewhere / "data/demo")
    run(demo_params(eval_ratio=0.4, seed=7), elsewhere)
    assert {r["sample_id"]: r["split"] for r in read(elsewhere, "samples.parquet")} == splits


def test_eval_datasets_are_held_out_and_never_repeat_a_training_sample(project):
    """An eval dataset's samples are all eval; one that repeats a training sample is rejected as its duplicate,
    so no sample is in both splits."""
    run(demo_params(), project)
    kept = next(r["row"] for r in read(project, "samples.parquet") if r["source"] == "data/demo/chat.jsonl")
    repeated = (project / "data/demo/chat.jsonl").read_bytes().split(b"\n")[kept]
    fresh = {"messages": [{"role": "user", "content": "held out?"}, {"role": "assistant", "content": "yes"}]}
    (project / "data/demo/eval.jsonl").write_bytes(repeated + b"\n" + json.dumps(fresh).encode() + b"\n")
    params = demo_params(eval_datasets=[{"path": "data/demo/eval.jsonl", "data_folder": "data/demo"}])
    result = run(params, project)
    samples = read(project, "samples.parquet")
    assert [r["split"] for r in samples if r["source"] == "data/demo/eval.jsonl"] == ["eval"]
    assert {r["split"] for r in samples if r["source"] != "data/demo/eval.jsonl"} == {"train"}
    duplicate = [r for r in read(project, "rejects.parquet") if r["source"] == "data/demo/eval.jsonl"]
    assert [(r["row"], r["reason"]) for r in duplicate] == [(0, "duplicate")]
    assert result.eval_samples == 1


def test_a_file_in_both_datasets_and_eval_datasets_is_a_config_error():
    from schemas.errors import ConfigError

    with pytest.raises(ConfigError, match="chat.jsonl listed in both datasets and eval_datasets"):
        demo_params(eval_datasets=[{"path": "data/demo/chat.jsonl", "data_folder": "data/demo"}])
