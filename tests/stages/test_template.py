"""Varied conversations through validate -> decode -> tokenize give the token ids and grids of the real processor
(`processor.apply_chat_template` + `processor(...)`), in both families: system turns or none, multi-turn,
several images, videos with and without images, text-only assistant turns in list form."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.decode.shards import FrameStore
from stages.decode.stage import run as decode
from stages.tokenize import run as tokenize
from stages.tokenize.vision import VisionArgs
from stages.validate import run as validate
from tests.conftest import FAMILIES, MORE_FAMILIES_SLOW, pipeline_params, processor_of


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(name: str) -> dict:
    return {"type": "image", "image": f"images/{name}"}


def video(name: str) -> dict:
    return {"type": "video", "video": f"videos/{name}"}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def assistant(*texts: str) -> dict:
    return {"role": "assistant", "content": [text(t) for t in texts]}


SYSTEM = {"role": "system", "content": [text("You answer in one sentence.")]}
CONVERSATIONS = [
    [SYSTEM, user(text("Hi there.")), assistant("Hello.")],
    [user(text("No system turn here.")), assistant("Then the template adds its default, or not.")],
    [user(text("1 + 1?")), assistant("2."), user(text("2 + 2?")), assistant("4."), user(text("3?")), assistant("6.")],
    [SYSTEM, user(image("street.jpg"), image("wide.jpg"), text("Compare the two.")), assistant("Both are streets.")],
    [
        user(image("square.png"), text("What is it?")),
        assistant("A square."),
        user(image("portrait.jpg")),
        assistant("A face."),
    ],
    [user(video("walk.mp4"), text("What happens?")), assistant("Someone walks.")],
    [SYSTEM, user(image("small.jpg"), video("talk.mp4"), text("Same scene?")), assistant("No.")],
    [user(text("Two parts")), assistant("first part, ", "second part.")],
    [user(text("Before the picture:"), image("banner.png"), text("and after it.")), assistant("A banner.")],
    [user(video("slow.mp4"), video("tall.mp4"), text("Which is longer?")), assistant("The first.")],
    [user(text("你好，世界\nline two")), assistant("你好！\n再见。")],
    [SYSTEM, user(text("A")), assistant("B"), user(image("street.jpg"), text("C")), assistant("D")],
]


@pytest.fixture(scope="module", params=FAMILIES + MORE_FAMILIES_SLOW)
def templated(request, tiny_models, demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"template-{request.param}")
    shutil.copytree(demo_dir, root / "data/demo")
    rows = [json.dumps({"messages": m}, ensure_ascii=False) for m in CONVERSATIONS]
    (root / "data/demo/varied.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    params = pipeline_params(tiny_models[request.param], request.param)
    params.dataset_config.datasets = params.dataset_config.datasets[:1]
    params.dataset_config.datasets[0].path = "data/demo/varied.jsonl"
    params.dataset_config.packing_length = 8192  # no conversation here is too long
    for stage in (validate, decode, tokenize):
        stage(params, root)
    return root, params


def test_every_conversation_tokenizes_like_the_real_processor(templated):
    root, params = templated
    processor = processor_of(params.dataset_config.processor_config.processor_name)
    vision = VisionArgs.for_processor(processor, params.dataset_config)
    store = FrameStore(root / "data/frames")
    rows = pq.read_table(root / "data/tokenized/samples.parquet").to_pylist()
    validated = {
        s["sample_id"]: json.loads(s["messages"])
        for s in pq.read_table(root / "data/validated/samples.parquet").to_pylist()
    }
    for stage in ("validated", "frames", "tokenized"):
        rejects = pq.read_table(root / f"data/{stage}/rejects.parquet").to_pylist()
        assert not rejects, f"{stage}: {[(r['reason'], r.get('detail')) for r in rejects]}"
    assert len(rows) == len(CONVERSATIONS)
    for row in rows:
        messages = validated[row["sample_id"]]
        rendered = processor.apply_chat_template(messages, tokenize=False)
        images = [Image.open(root / p).convert("RGB") for p in row["image_paths"]]
        videos = [store.get(k) for k in row["video_keys"]]
        kwargs = {}
        if images:
            kwargs["images_kwargs"] = vision.images_kwargs()
        if videos:
            kwargs["videos_kwargs"] = vision.videos_kwargs(videos)
        out = processor(
            text=[rendered],
            images=images or None,
            videos=[v.frames for v in videos] or None,
            return_tensors="np",
            **kwargs,
        )
        assert out["input_ids"][0].tolist() == row["input_ids"], rendered
        assert out["image_grid_thw"].tolist() == row["image_grid_thw"] if images else not row["image_grid_thw"]
        assert out["video_grid_thw"].tolist() == row["video_grid_thw"] if videos else not row["video_grid_thw"]
        # The labels are the assistant turns exactly, as the template renders them.
        turns = [m for m in messages if m["role"] == "assistant"]
        labeled = [t for t in row["labels"] if t != -100]
        expected = "".join("".join(p["text"] for p in m["content"]) + "<|im_end|>" for m in turns)
        assert processor.tokenizer.decode(labeled) == expected
