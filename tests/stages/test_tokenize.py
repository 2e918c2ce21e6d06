"""Tokenize against the real processor: same ids and grids for every demo sample, in both families."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from schemas.errors import PipelineError, StageInputError
from stages.decode.shards import FrameStore
from stages.tokenize import run as tokenize
from stages.tokenize.vision import VisionArgs
from tests.conftest import FAMILIES, MORE_FAMILIES_SLOW, pipeline_params, processor_of


@pytest.fixture
def tokenized_project(packed_project):
    """The shared packed project (validate, decode, tokenize, pack done) with its params and stage metrics."""
    root, family_name, model_dir = packed_project
    accepted = json.loads((root / "metrics/validate.json").read_text())["accepted"]
    result = json.loads((root / "metrics/tokenize.json").read_text())
    return root, pipeline_params(model_dir, family_name), accepted, result


def test_counts_reconcile_with_validate_and_decode(tokenized_project):
    root, _, accepted, result = tokenized_project
    decode_rejects = pq.read_table(root / "data/frames/rejects.parquet").to_pylist()
    assert result["input"] == accepted
    assert result["tokenized"] + result["rejected"] == accepted
    by_reason = json.loads((root / "metrics/tokenize_rejects.json").read_text())  # not in the metrics file
    assert "by_reason" not in result and sum(by_reason.values()) == result["rejected"]
    rejects = pq.read_table(root / "data/tokenized/rejects.parquet").to_pylist()
    video_rejects = [r for r in rejects if r["reason"] != "overlong"]
    assert {r["sample_id"] for r in video_rejects} == {s for r in decode_rejects for s in r["sample_ids"]}
    assert all(r["reason"] == "truncated_video" and "truncated.mp4" in r["detail"] for r in video_rejects)
    assert all("> packing_length 1024" in r["detail"] for r in rejects if r["reason"] == "overlong")


@pytest.mark.parametrize("packed_project", FAMILIES + MORE_FAMILIES_SLOW, indirect=True)
def test_ids_and_grids_equal_the_real_processor(tokenized_project):
    root, params, _, _ = tokenized_project
    processor = processor_of(params.dataset_config.processor_config.processor_name)
    vision = VisionArgs.for_processor(processor, params.dataset_config)
    store = FrameStore(root / "data/frames")
    messages = {
        s["sample_id"]: s["messages"] for s in pq.read_table(root / "data/validated/samples.parquet").to_pylist()
    }
    rows = pq.read_table(root / "data/tokenized/samples.parquet").to_pylist()
    kinds = set()
    for row in rows:
        text = processor.apply_chat_template(json.loads(messages[row["sample_id"]]), tokenize=False)
        images = [Image.open(root / p).convert("RGB") for p in row["image_paths"]]
        videos = [store.get(k) for k in row["video_keys"]]
        kwargs = {}
        if images:
            kwargs["images_kwargs"] = vision.images_kwargs()
            kinds.add("image")
        if videos:
            kwargs["videos_kwargs"] = vision.videos_kwargs(videos)
            kinds.add("video")
        out = processor(
            text=[text], images=images or None, videos=[v.frames for v in videos] or None, return_tensors="np", **kwargs
        )
        assert out["input_ids"][0].tolist() == row["input_ids"], row["sample_id"]
        if images:
            assert out["image_grid_thw"].tolist() == row["image_grid_thw"]
        if videos:
            assert out["video_grid_thw"].tolist() == row["video_grid_thw"]
            if "second_per_grid_ts" in out:
                assert np.allclose(out["second_per_grid_ts"], row["second_per_grid_ts"])
    assert kinds == {"image", "video"} and len(rows) > 20


def test_labels_are_exactly_the_assistant_turns(tokenized_project):
    root, params, _, _ = tokenized_project
    tok = processor_of(params.dataset_config.processor_config.processor_name).tokenizer
    messages = {
        s["sample_id"]: json.loads(s["messages"])
        for s in pq.read_table(root / "data/validated/samples.parquet").to_pylist()
    }
    multi_turn = 0
    for row in pq.read_table(root / "data/tokenized/samples.parquet").to_pylist():
        labeled = [t for t in row["labels"] if t != -100]
        turns = [m for m in messages[row["sample_id"]] if m["role"] == "assistant"]
        expected = "".join("".join(p["text"] for p in m["content"]) + "<|im_end|>" for m in turns)
        assert tok.decode(labeled) == expected
        assert row["label_tokens"] == len(labeled) and row["length"] == len(row["input_ids"])
        # Every labelled position carries its own input token (the shift happens in the loss).
        assert all(lab in (-100, tid) for lab, tid in zip(row["labels"], row["input_ids"], strict=True))
        multi_turn += len(turns) > 1
    assert multi_turn >= 2


def test_overlong_samples_are_rejected_or_stop_the_stage(tokenized_project, tmp_path):
    root, params, _, _ = tokenized_project
    short = params.model_copy(deep=True)
    short.dataset_config.packing_length = 150
    result = tokenize(short, root)
    assert result.by_reason.get("overlong", 0) > 0
    lengths = pq.read_table(root / "data/tokenized/samples.parquet").column("length").to_pylist()
    assert max(lengths) <= 150
    short.dataset_config.filter_overlong = False
    with pytest.raises(PipelineError, match="longer than packing_length 150"):
        tokenize(short, root)
    tokenize(params, root)  # restore the module's output for the other tests


@pytest.mark.family_only("qwen2_5_vl")  # streaming is the same code for every family (the renderer is tested above)
def test_small_chunks_and_writes_give_the_same_rows_in_many_row_groups(tokenized_project, tmp_path, monkeypatch):
    """Tokenize reads CHUNK samples at a time and writes WRITE_ROWS rows at a time. With 5 and 7 (two pool
    workers), the rows, rejects and metrics equal the default run's, in ceil(rows / 7) Parquet row groups and
    Arrow record batches."""
    import shutil

    import pyarrow as pa

    import stages.tokenize
    import stages.tokenize.output

    root, params, _, result = tokenized_project
    for folder in ("data/validated", "data/frames"):
        shutil.copytree(root / folder, tmp_path / folder)
    monkeypatch.setattr(stages.tokenize, "CHUNK", 5)
    monkeypatch.setattr(stages.tokenize.output, "WRITE_ROWS", 7)
    streamed = tokenize(params, tmp_path)
    assert streamed.metrics() == result
    for name in ("samples.parquet", "rejects.parquet"):
        expected = pq.read_table(root / "data/tokenized" / name)
        assert pq.read_table(tmp_path / "data/tokenized" / name).equals(expected), name
    groups = -(-result["tokenized"] // 7)
    assert pq.ParquetFile(tmp_path / "data/tokenized/samples.parquet").num_row_groups == groups > 1
    arrow = pa.ipc.open_file(str(tmp_path / "data/tokenized/samples.arrow"))
    assert arrow.num_record_batches == groups
    assert arrow.read_all().equals(pq.read_table(root / "data/tokenized/samples.parquet"))


def test_missing_processor_is_a_clear_error(project):
    params = pipeline_params(project / "no-model", "qwen2_5_vl")
    with pytest.raises(StageInputError, match="processor directory not found"):
        tokenize(params, project)


def test_image_pixel_bounds_reach_tokens_rows_and_packs(tokenized_project, tmp_path):
    """``image_min_pixels``/``image_max_pixels`` give what the processor gives when loaded the way Qwen's README
    sets them (``from_pretrained(min_pixels=..., max_pixels=...)``): the same ids and grids in tokenize, the
    same pixels in the trainer's rows, and packs of the new lengths."""
    import shutil

    import torch

    from stages.families import family
    from stages.pack import run as pack
    from stages.train.data import RowBuilder

    root, params, _, _ = tokenized_project
    model_dir = params.dataset_config.processor_config.processor_name
    default_grids = {
        r["sample_id"]: r["image_grid_thw"] for r in pq.read_table(root / "data/tokenized/samples.parquet").to_pylist()
    }
    small = params.model_copy(deep=True)
    side = 28  # patch 14 x merge 2: one merged token
    small.dataset_config.image_min_pixels, small.dataset_config.image_max_pixels = 2 * side * side, 6 * side * side
    copy = tmp_path / "project"
    for part in ("data/demo", "data/validated", "data/frames", "data/media"):
        if (root / part).exists():
            shutil.copytree(root / part, copy / part)
    tokenize(small, copy)
    pack(small, copy)
    reference = AutoProcessor.from_pretrained(model_dir, min_pixels=2 * side * side, max_pixels=6 * side * side)
    messages = {
        s["sample_id"]: s["messages"] for s in pq.read_table(copy / "data/validated/samples.parquet").to_pylist()
    }
    rows = [r for r in pq.read_table(copy / "data/tokenized/samples.parquet").to_pylist() if r["image_paths"]]
    assert any(r["image_grid_thw"] != default_grids[r["sample_id"]] for r in rows)  # the bounds changed something
    fam = family(small.dataset_config.processor_config.processor_type)
    builder = RowBuilder.for_family(copy, reference, small.dataset_config, fam, AutoConfig.from_pretrained(model_dir))
    for row in rows:
        text = reference.apply_chat_template(json.loads(messages[row["sample_id"]]), tokenize=False)
        images = [Image.open(copy / p).convert("RGB") for p in row["image_paths"]]
        out = reference(text=[text], images=images, return_tensors="pt")
        assert out["input_ids"][0].tolist() == row["input_ids"]
        assert out["image_grid_thw"].tolist() == row["image_grid_thw"]
        assert all(2 <= h * w // 4 <= 6 for _, h, w in row["image_grid_thw"])
        if not row["video_keys"]:
            assert torch.equal(builder.build_samples([row["sample_id"]]).vision["pixel_values"], out["pixel_values"])
    packs = pq.read_table(copy / "data/packed/packs.parquet").to_pylist()
    lengths = {r["sample_id"]: r["length"] for r in pq.read_table(copy / "data/tokenized/samples.parquet").to_pylist()}
    assert sorted(s for p in packs for s in p["sample_ids"]) == sorted(lengths)
    assert all(p["lengths"] == [lengths[s] for s in p["sample_ids"]] and p["total"] <= 1024 for p in packs)
