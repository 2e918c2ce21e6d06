"""Tokenize against the real processor: same ids and grids for every demo sample, in both families."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoProcessor

from schemas.errors import PipelineError, StageInputError
from stages.decode.shards import FrameStore
from stages.tokenize import run as tokenize
from stages.tokenize.vision import VisionArgs
from tests.conftest import pipeline_params


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
    rejects = pq.read_table(root / "data/tokenized/rejects.parquet").to_pylist()
    video_rejects = [r for r in rejects if r["reason"] != "overlong"]
    assert {r["sample_id"] for r in video_rejects} == {s for r in decode_rejects for s in r["sample_ids"]}
    assert all(r["reason"] == "truncated_video" and "truncated.mp4" in r["detail"] for r in video_rejects)
    assert all("> packing_length 1024" in r["detail"] for r in rejects if r["reason"] == "overlong")


def test_ids_and_grids_equal_the_real_processor(tokenized_project):
    root, params, _, _ = tokenized_project
    processor = AutoProcessor.from_pretrained(params.dataset_config.processor_config.processor_name)
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
    tok = AutoProcessor.from_pretrained(params.dataset_config.processor_config.processor_name).tokenizer
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


def test_missing_processor_is_a_clear_error(project):
    params = pipeline_params(project / "no-model", "qwen2_5_vl")
    with pytest.raises(StageInputError, match="processor directory not found"):
        tokenize(params, project)
