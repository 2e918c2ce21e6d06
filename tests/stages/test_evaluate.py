"""The evaluate stage's generation prompts against the plain transformers model: a prompt is the sample's own ids
up to its last answer, and the inputs handed to `generate` give the model the same next-token logits there as the
whole sample does (pixels, grids and the M-RoPE positions of images and videos all reach the model)."""

import json

import numpy as np
import torch

from stages.evaluate import GENERATIONS, METRICS
from stages.evaluate import run as evaluate
from stages.evaluate.generations import generation_inputs, last_answer_start, prompts
from tests.stages.test_train_units import load, reference_inputs

IGNORE = -100


def test_last_answer_start_is_the_start_of_the_last_labelled_run():
    labels = np.array([IGNORE, IGNORE, 5, 6, IGNORE, IGNORE, 7, 8, 9])
    assert last_answer_start(labels) == 6
    assert last_answer_start(np.array([IGNORE, 4, 5])) == 1
    assert last_answer_start(np.full(4, IGNORE)) is None


def test_generation_prompts_give_the_whole_samples_next_token_logits(packed_project):
    """For one image sample and one video sample: the prompt is the tokenized ids before the last answer, the
    reference is that answer's labelled tokens, and the model's logits at the prompt's end, from the generation
    inputs, equal its logits at that position of the whole sample (fp32, sdpa)."""
    root, fam, params, model, builder = load(packed_project)
    by_kind = {}
    for sample_id in builder.samples:
        s = builder.samples[sample_id]
        kind = "video" if s["video_keys"] else "image" if s["image_paths"] else "text"
        by_kind.setdefault(kind, sample_id)
    assert {"image", "video"} <= by_kind.keys()
    for kind in ("image", "video"):
        sample_id = by_kind[kind]
        s = builder.samples[sample_id]
        [prompt] = prompts(builder, [sample_id], limit=1)
        cut = prompt.input_ids.shape[1]
        assert prompt.input_ids[0].tolist() == s["input_ids"][:cut]
        assert s["labels"][cut - 1] == IGNORE and s["labels"][cut] != IGNORE
        answer = [t for t, label in zip(s["input_ids"][cut:], s["labels"][cut:], strict=True) if label != IGNORE]
        assert prompt.reference_ids == answer
        with torch.no_grad():
            got = model(**generation_inputs(model, builder, prompt, torch.device("cpu")), use_cache=False)
            whole = model(**reference_inputs(builder, sample_id), use_cache=False)
        torch.testing.assert_close(got.logits[0, -1], whole.logits[0, cut - 1], rtol=1e-4, atol=1e-4)


def test_evaluate_without_held_out_samples_reports_no_loss(packed_project):
    """A project without an eval split still evaluates: no loss, no generations, both files written."""
    root, _, params, _, _ = load(packed_project)
    result = evaluate(params, root, checkpoint=str(packed_project[2]))
    assert (result.eval_loss, result.eval_samples, result.generations) == (None, 0, 0)
    assert json.loads((root / METRICS).read_text())["eval_loss"] is None
    assert json.loads((root / GENERATIONS).read_text()) == []
