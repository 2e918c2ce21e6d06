"""`qvl train` for real: torchrun with gloo on CPU, FSDP2, 1 and 2 processes, SIGKILL and resume, export."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from stages.families import family
from tests.conftest import REPO, pipeline_params


def write_params(root, name, model_dir, family_name, **trainer):
    params = pipeline_params(model_dir, family_name, run_name=name, **trainer)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))
    return path


def command(params_path):
    return [sys.executable, "-m", "stages.train", "--params", str(params_path)]


def launch(root, name, model_dir, family_name, **trainer) -> subprocess.CompletedProcess:
    path = write_params(root, name, model_dir, family_name, **trainer)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command(path), cwd=root, capture_output=True, text=True, env=env, timeout=600)


def train(root, name, model_dir, family_name, **trainer) -> list[dict]:
    proc = launch(root, name, model_dir, family_name, **trainer)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return history(root, name)


def history(root, name) -> list[dict]:
    runs = sorted((root / "output" / name).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((runs[-1] / "trainer_state.json").read_text())["history"]


def losses(h):
    return [x["loss"] for x in h]


@pytest.fixture(scope="module")
def reference(packed_project):
    """World size 2, accumulation 1, four steps (one epoch is three steps of two packs)."""
    root, family_name, model_dir = packed_project
    return train(root, "ws2", model_dir, family_name, max_steps=4, nproc_per_node=2)


def test_world_size_and_accumulation_do_not_change_the_result(packed_project, reference):
    root, family_name, model_dir = packed_project
    # One rank, accumulation 2, rows built in a background DataLoader worker process.
    single = train(
        root,
        "ws1",
        model_dir,
        family_name,
        max_steps=4,
        nproc_per_node=1,
        gradient_accumulation_steps=2,
        dataloader_num_workers=1,
    )
    assert losses(single) == pytest.approx(losses(reference), rel=1e-5)
    assert [h["packs"] for h in single] == [h["packs"] for h in reference]


def test_sp_with_data_parallelism_equals_plain_data_parallelism(packed_project, reference):
    """4 processes = 2 data-parallel groups x SP 2, against 2 processes without SP: same packs, same losses."""
    root, family_name, model_dir = packed_project
    combined = train(root, "dp2sp2", model_dir, family_name, max_steps=4, nproc_per_node=4, sp_ulysses_degree=2)
    assert [h["packs"] for h in combined] == [h["packs"] for h in reference]
    assert losses(combined) == pytest.approx(losses(reference), rel=1e-5)
    assert [h["label_tokens"] for h in combined] == [h["label_tokens"] for h in reference]


def test_rerun_of_a_complete_run_resumes_at_its_end_and_rewrites_the_metrics(packed_project, reference):
    """DVC deletes metrics/train.json before it reruns the stage; a run resumed at its last step still writes it."""
    root, family_name, model_dir = packed_project
    (root / "metrics/train.json").unlink()
    proc = launch(root, "ws2", model_dir, family_name, max_steps=4, nproc_per_node=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and history(root, "ws2") == reference
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["steps"] == 4 and metrics["final_loss"] == reference[-1]["loss"]


def test_every_pack_once_per_epoch(packed_project, reference):
    root = packed_project[0]
    import pyarrow.parquet as pq

    all_packs = sorted(pq.read_table(root / "data/packed/packs.parquet").column("pack_id").to_pylist())
    epoch0 = [p for h in reference if h["epoch"] == 0 for p in h["packs"]]
    assert sorted(epoch0) == all_packs


def test_sigkill_and_resume_continue_the_same_curve(packed_project, reference):
    root, family_name, model_dir = packed_project
    path = write_params(root, "killed", model_dir, family_name, max_steps=4, nproc_per_node=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command(path), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (root / "output/killed/checkpoint-2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "output/killed/checkpoint-4").exists(), "the run finished before it could be killed"
    resumed = train(root, "killed", model_dir, family_name, max_steps=4, nproc_per_node=2)
    assert losses(resumed) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)
    assert [h["packs"] for h in resumed] == [h["packs"] for h in reference]
    assert not list((root / "output/killed").glob(".checkpoint-*"))  # no half-written checkpoint left


def test_resume_on_another_number_of_ranks(packed_project, reference):
    """A 2-rank checkpoint continues on 1 rank (accumulation 2 keeps the global batch): same later losses."""
    import shutil

    root, family_name, model_dir = packed_project
    shutil.copytree(root / "output/ws2/checkpoint-3", root / "output/resharded/checkpoint-3")
    resumed = train(
        root, "resharded", model_dir, family_name, max_steps=4, nproc_per_node=1, gradient_accumulation_steps=2
    )
    assert losses(resumed) == pytest.approx(losses(reference), rel=1e-5)
    assert [h["packs"] for h in resumed] == [h["packs"] for h in reference]


def test_export_loads_and_matches_the_trained_weights(packed_project, reference):
    root, family_name, _ = packed_project
    fam = family(family_name)
    cls = fam.transformers_class(fam.model_class)
    exported = cls.from_pretrained(root / "output/ws2/hf", attn_implementation="sdpa", dtype=torch.float32)
    dcp_to_torch_save(root / "output/ws2/checkpoint-4", root / "ws2-final.pt")
    trained = cls._from_config(exported.config, dtype=torch.float32)
    trained.load_state_dict(torch.load(root / "ws2-final.pt", weights_only=False)["model"])
    ids = torch.tensor([[151644, 872, 198, 9707, 1879, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, trained(input_ids=ids).logits)
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(root / "output/ws2/hf").tokenizer("Hello world").input_ids == [9707, 1879]
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["steps"] == 4 and metrics["tokens_per_s"] > 0
    assert (root / "plots/train_loss.csv").read_text().count("\n") == 5


def test_frozen_vision_tower_is_bit_identical(packed_project):
    root, family_name, model_dir = packed_project
    if family_name != "qwen2_5_vl":
        pytest.skip("one family is enough for freezing")
    train(
        root,
        "frozen",
        model_dir,
        family_name,
        max_steps=2,
        nproc_per_node=2,
        freeze_modules=["visual"],
        report_to=["tensorboard"],
    )
    assert list((root / "output/frozen/tensorboard").glob("events.out.tfevents.*"))
    fam = family(family_name)
    cls = fam.transformers_class(fam.model_class)
    before = cls.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    after = cls.from_pretrained(root / "output/frozen/hf", dtype=torch.float32).state_dict()
    visual = [k for k in before if k.startswith(fam.vision_tower_prefix)]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert not torch.equal(
        before["model.language_model.layers.0.mlp.up_proj.weight"],
        after["model.language_model.layers.0.mlp.up_proj.weight"],
    )


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(packed_project):
    root, family_name, model_dir = packed_project
    if family_name != "qwen2_5_vl":
        pytest.skip("one family is enough")
    proc = launch(
        root, "diverge", model_dir, family_name, max_steps=4, nproc_per_node=2, learning_rate=1e30, max_grad_norm=1e30
    )
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stdout + proc.stderr and "at step" in proc.stdout + proc.stderr
    assert (root / "output/diverge/checkpoint-1").exists()
