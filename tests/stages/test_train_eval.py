"""In-loop evaluation through real `qvl train` launches (torchrun, gloo, FSDP2): the held-out loss it reports
equals the evaluate stage's loss of the same step's checkpoint and the plain transformers model's loss over the
same held-out samples, with data and sequence parallelism; load_best_model_at_end keeps and exports the best."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from stages.evaluate import GENERATIONS
from stages.evaluate import run as evaluate
from stages.families import family
from stages.train.data import RowBuilder
from stages.train.samples import EVAL_PACKS
from tests.conftest import REPO, pipeline_params, processor_of
from tests.stages.test_train_units import reference_loss_sum

pytestmark = pytest.mark.slow
FAMILY = "qwen2_5_vl"  # the eval loop is the same code for every family (the packed loss is tested for both)
EVAL_RATIO = 0.35


def params_for(model_dir, **trainer):
    params = pipeline_params(model_dir, FAMILY, **trainer)
    params.dataset_config.eval_ratio = EVAL_RATIO
    return params


@pytest.fixture(scope="module")
def eval_project(tiny_models, demo_dir, tmp_path_factory):
    """The demo data through validate -> decode -> tokenize -> pack with a held-out share."""
    from stages.decode.stage import run as decode
    from stages.pack import run as pack
    from stages.tokenize import run as tokenize
    from stages.validate import run as validate

    root = tmp_path_factory.mktemp("eval-project")
    shutil.copytree(demo_dir, root / "data/demo")
    params = params_for(tiny_models[FAMILY])
    for stage in (validate, decode, tokenize, pack):
        stage(params, root)
    return root, tiny_models[FAMILY]


def train(root, model_dir, name, **trainer) -> dict[int, float]:
    """One `qvl train` run; its history's eval losses by step."""
    path = root / f"{name}.yaml"
    params = params_for(
        model_dir,
        run_name=name,
        eval_strategy="steps",
        max_steps=3,
        **({"eval_steps": 2, "save_steps": 1, "save_total_limit": None} | trainer),
    )
    path.write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages.train", "--params", str(path)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((root / "output" / name / "checkpoint-3/trainer_state.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in state["history"] if "eval_loss" in h}
    for step, value in evals.items():
        assert f"eval at step {step}: loss {value:.6f}" in proc.stdout
    return evals


def evaluated(root, model_dir, checkpoint: str) -> float:
    """The evaluate stage's eval loss of ``checkpoint`` (a directory under ``root``)."""
    result = evaluate(params_for(model_dir), root, checkpoint=checkpoint)
    assert result.eval_label_tokens > 0
    return result.eval_loss


def test_eval_loss_equals_the_evaluate_stage_and_the_plain_model(eval_project):
    """Evaluations at steps 2 and 3 (eval_steps 2, and the last step), the same with 2 data-parallel ranks and
    with sequence parallelism 2; each equals the evaluate stage's loss of that step's checkpoint (one process,
    its weights loaded from the sharded checkpoint) and the last also the export's; the last equals the exported
    model's loss summed over every held-out sample, one at a time through transformers with ``labels=``, over
    their label tokens. metrics/train.json and plots/eval_loss.csv report the evaluations; the evaluate stage
    answers held-out samples into its generations table."""
    root, model_dir = eval_project
    data_parallel = train(root, model_dir, "dp2", nproc_per_node=2)
    metrics = json.loads((root / "metrics/train.json").read_text())
    with open(root / "plots/eval_loss.csv") as f:
        plotted = {int(r["step"]): float(r["eval_loss"]) for r in csv.DictReader(f)}
    assert sorted(data_parallel) == [2, 3] and plotted == data_parallel
    best = min(data_parallel, key=data_parallel.get)
    assert metrics["eval_loss"] == data_parallel[3]
    assert (metrics["best_eval_loss"], metrics["best_eval_step"]) == (data_parallel[best], best)
    for step, value in data_parallel.items():
        assert evaluated(root, model_dir, f"output/dp2/checkpoint-{step}") == pytest.approx(value, rel=1e-5)
    assert json.loads((root / "output/dp2/hf/qvl_export.json").read_text())["step"] == 3
    assert evaluated(root, model_dir, "output/dp2/hf") == pytest.approx(data_parallel[3], rel=1e-5)
    table = json.loads((root / GENERATIONS).read_text())
    assert len(table) == params_for(model_dir).evaluate.generations
    assert all(r["reference"] and r["generated_tokens"] > 0 for r in table)

    fam = family(FAMILY)
    model = fam.transformers_class(fam.model_class).from_pretrained(
        root / "output/dp2/hf", attn_implementation="sdpa", dtype=torch.float32
    )
    params = params_for(model_dir)
    builder = RowBuilder.for_family(root, processor_of(model_dir), params.dataset_config, fam, model.config)
    held_out = builder.for_packs(root / EVAL_PACKS)
    samples = [s for p in sorted(held_out.packs) for s in held_out.packs[p]]
    assert len(held_out.packs) >= 2 and samples
    with torch.no_grad():
        total = sum(float(reference_loss_sum(model, builder, s)) for s in samples)
    labels = sum(int((torch.tensor(builder.samples[s]["labels"][1:]) != -100).sum()) for s in samples)
    assert data_parallel[3] == pytest.approx(total / labels, rel=1e-5)

    # One data-parallel rank accumulating two packs: the same packs per step as two ranks with one each.
    sequence_parallel = train(
        root, model_dir, "sp2", nproc_per_node=2, sp_ulysses_degree=2, gradient_accumulation_steps=2
    )
    assert sequence_parallel.keys() == data_parallel.keys()
    for step, value in data_parallel.items():
        assert sequence_parallel[step] == pytest.approx(value, rel=1e-5)
        assert evaluated(root, model_dir, f"output/sp2/checkpoint-{step}") == pytest.approx(value, rel=1e-5)


def test_load_best_model_at_end_keeps_and_exports_the_best_checkpoint(eval_project):
    """A learning rate high enough that the eval loss rises again before the last step: with save_total_limit 1,
    the best checkpoint is kept beside the newest, the export holds its weights (the evaluate stage's loss of the
    export equals the in-loop eval loss at the best step), and the export names its step."""
    root, model_dir = eval_project
    losses = train(
        root,
        model_dir,
        "best",
        nproc_per_node=2,
        learning_rate=2.0,
        eval_steps=1,
        save_total_limit=1,
        load_best_model_at_end=True,
    )
    best = min(losses, key=losses.get)
    assert sorted(losses) == [1, 2, 3] and best < 3, losses  # the premise: the last step is not the best
    kept = sorted(p.name for p in (root / "output/best").glob("checkpoint-*"))
    assert kept == [f"checkpoint-{best}", "checkpoint-3"]
    assert json.loads((root / "output/best/hf/qvl_export.json").read_text())["step"] == best
    assert evaluated(root, model_dir, "output/best/hf") == pytest.approx(losses[best], rel=1e-5)
