"""Qwen2-VL and Qwen3-VL-MoE through real `qvl train` launches (torchrun, gloo, FSDP2, Liger's CPU stand-ins,
per-module learning rates): a run resumed from its step-2 checkpoint ends where an uninterrupted one does, SP=2
gives one rank's loss and gradients, and the export loads with `from_pretrained` and generates from an image and a
video. (Their tokenization, packed loss and tiny models are tested with the other families, by parameter.)"""

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from stages.families import family
from tests.conftest import MORE_FAMILIES
from tests.stages.test_sequence_parallel import sp_equivalence
from tests.stages.test_train_distributed import launch, losses, project_with_checkpoint, train

pytestmark = pytest.mark.slow
OPTIONS = dict(nproc_per_node=2, save_steps=2, use_liger_kernel=True, mm_projector_lr=2e-4, vision_tower_lr=5e-5)


@pytest.mark.parametrize("packed_project", MORE_FAMILIES, indirect=True)
def test_resume_sequence_parallelism_and_export(packed_project, tmp_path):
    root, family_name, model_dir = packed_project
    fam = family(family_name)
    whole = train(root, "four", model_dir, family_name, max_steps=4, **OPTIONS)
    assert [h["step"] for h in whole] == list(range(1, 5))
    other = project_with_checkpoint(root, tmp_path / "resumed", "four", 2)  # the same run, as if killed after step 2
    proc = launch(other, "four", model_dir, family_name, max_steps=4, **OPTIONS)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    resumed = json.loads((other / "output/four/checkpoint-4/trainer_state.json").read_text())["history"]
    assert losses(resumed) == pytest.approx(losses(whole), rel=1e-5)
    if fam.moe:  # the balance loss is reported; the experts and routers trained
        metrics = json.loads((other / "metrics/train.json").read_text())
        assert metrics["router_balance_loss"] > 0 and all(h["router_balance"] > 0 for h in resumed)
        assert_trained(fam, model_dir, root / "output/four/hf", (".mlp.experts.", ".mlp.gate."))

    result = sp_equivalence(root, model_dir, family_name, 2)
    assert abs(result["loss"] - result["reference_loss"]) / result["reference_loss"] < 1e-5
    assert result["grad_relative_error"] < 1e-5 and result["vision_grad_norm"] > 0

    generates_from_an_image_and_a_video(fam, root / "output/four/hf")


def assert_trained(fam, base_dir, export_dir, parts: tuple[str, ...]) -> None:
    cls = fam.transformers_class(fam.model_class)
    before = cls.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    after = cls.from_pretrained(export_dir, dtype=torch.float32).state_dict()
    for part in parts:
        names = [k for k in before if part in k]
        assert names and all(not torch.equal(before[k], after[k]) for k in names), part


def generates_from_an_image_and_a_video(fam, export_dir) -> None:
    model = fam.transformers_class(fam.model_class).from_pretrained(export_dir)
    processor = AutoProcessor.from_pretrained(export_dir)
    rng = np.random.default_rng(0)
    media = {
        "image": {"images": [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)]},
        "video": {"videos": [rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)]},
    }
    for kind, inputs in media.items():
        chat = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "What is this?"}]}]
        text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        batch = processor(text=[text], return_tensors="pt", **inputs)
        out = model.generate(**batch, min_new_tokens=4, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 4, kind
