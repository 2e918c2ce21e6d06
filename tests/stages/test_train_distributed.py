"""`qvl train` for real: torchrun with gloo on CPU, FSDP2, 1 and 2 processes, SIGKILL and resume, export.

Every test here is checked through what `qvl train` leaves behind (its log lines, checkpoints, trainer_state.json,
metrics/train.json, metrics/train_speed.json, plots/train_loss.csv), so it survives rewrites of the worker's
internals. Several properties share one launch where they can: each torchrun start costs seconds of imports on
every rank."""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from stages.families import family
from tests.conftest import REPO, built_once, pipeline_params

pytestmark = pytest.mark.slow
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+)", re.M)
OUTPUT_FILES = ("metrics/train.json", "plots/train_loss.csv", "metrics/train_speed.json")
LIGER_LOG = "use_liger_kernel: torch stand-ins on cpu (no Liger): RMSNorm x"
SPEED_KEYS = {"tokens_per_s", "label_tokens_per_s", "first_step_s", "mfu", "mfu_with_vision", "peak_mem_gb"}


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


def logged_steps(stdout: str) -> dict[int, float]:
    """step -> loss, from the `step N/M loss X` lines this run printed (the steps it computed itself)."""
    return {int(m.group(1)): float(m.group(3)) for m in STEP_LINE.finditer(stdout)}


LAYOUT_KEYS = {"loss", "straggler", "straggler_in_order"}


def without_loss(h: list[dict]) -> list[dict]:
    """History entries without what a different rank layout changes: the loss (in the last bits) and the balance
    of estimated FLOPs over the ranks."""
    return [{k: v for k, v in x.items() if k not in LAYOUT_KEYS} for x in h]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def project_with_checkpoint(root: Path, other: Path, name: str, step: int) -> Path:
    """A copy of ``root``'s data at ``other`` holding only checkpoint ``step`` of run ``name``, as a run killed after
    that checkpoint leaves it (on another machine or checkout path)."""
    shutil.copytree(root / "data", other / "data")
    checkpoint = f"output/{name}/checkpoint-{step}"
    shutil.copytree(root / checkpoint, other / checkpoint)
    return other


def checkpoints(root, name) -> list[str]:
    return sorted(p.name for p in (root / "output" / name).iterdir() if p.name.startswith(("checkpoint-", ".")))


def processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def reference(packed_project):
    """World size 2, accumulation 1, four steps (one epoch is three steps of two packs); the metrics, speed figures
    and loss plot are read right after this run, before another run rewrites them."""
    root, family_name, model_dir = packed_project

    def build() -> tuple[list[dict], dict]:
        history = train(root, "ws2", model_dir, family_name, max_steps=4, nproc_per_node=2)
        files = {path: (root / path).read_bytes() for path in OUTPUT_FILES}
        outputs = {
            "files": files,
            "metrics": json.loads(files["metrics/train.json"]),
            "speed": json.loads(files["metrics/train_speed.json"]),
            "plot": list(csv.DictReader((root / "plots/train_loss.csv").open())),
        }
        return history, outputs

    return built_once(("reference", family_name), build)


@pytest.mark.family_only("qwen2_5_vl")  # Qwen3-VL's stand-ins and another rank layout: the SP x DP test below
def test_world_size_accumulation_and_liger_do_not_change_the_result(packed_project, reference):
    """One rank, accumulation 2, rows built in a background DataLoader worker process, use_liger_kernel (its CPU
    stand-ins: RMSNorm, the SwiGLU MLP, the chunked linear cross-entropy), against 2 ranks without: the same losses.
    (Adam's first steps magnify the stand-ins' summation-order differences in the weights: losses only here.)"""
    root, family_name, model_dir = packed_project
    reference, _ = reference
    options = dict(max_steps=4, nproc_per_node=1, gradient_accumulation_steps=2, dataloader_num_workers=1)
    proc = launch(root, "ws1", model_dir, family_name, **options, use_liger_kernel=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert LIGER_LOG in proc.stdout
    single = history(root, "ws1")
    assert losses(single) == pytest.approx(losses(reference), rel=1e-5)
    assert [h["packs"] for h in single] == [h["packs"] for h in reference]


@pytest.mark.family_only("qwen3_vl")
def test_sp_with_data_parallelism_and_liger_equals_plain_data_parallelism(packed_project, reference):
    """4 processes = 2 data-parallel groups x SP 2 with use_liger_kernel (its CPU stand-ins), against 2 processes
    without either: same packs, same losses."""
    root, family_name, model_dir = packed_project
    reference, _ = reference
    options = dict(max_steps=4, nproc_per_node=4, sp_ulysses_degree=2, use_liger_kernel=True)
    proc = launch(root, "dp2sp2", model_dir, family_name, **options)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert LIGER_LOG in proc.stdout
    combined = history(root, "dp2sp2")
    assert [h["packs"] for h in combined] == [h["packs"] for h in reference]
    assert losses(combined) == pytest.approx(losses(reference), rel=1e-5)
    assert [h["label_tokens"] for h in combined] == [h["label_tokens"] for h in reference]


@pytest.mark.family_only("qwen2_5_vl")
def test_rerun_of_a_complete_run_resumes_at_its_end_and_rewrites_the_metrics(packed_project, reference):
    """DVC deletes metrics/train.json before it reruns the stage; a run resumed at its last step still writes it."""
    root, family_name, model_dir = packed_project
    reference, _ = reference
    (root / "metrics/train.json").unlink()
    proc = launch(root, "ws2", model_dir, family_name, max_steps=4, nproc_per_node=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and history(root, "ws2") == reference
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["steps"] == 4 and metrics["final_loss"] == reference[-1]["loss"]
    speed = json.loads((root / "metrics/train_speed.json").read_text())
    assert speed["steps_timed"] == 0 and speed["tokens_per_s"] is None  # this process timed no step


@pytest.mark.family_only("qwen2_5_vl")
def test_the_same_run_from_another_path_resumed_gives_the_same_bytes(packed_project, reference, tmp_path):
    """dvc.lock hashes output/<run>, metrics/train.json and plots/train_loss.csv: they must be the same bytes on
    every machine and checkout path, resumed or not. The reference run (4 steps, uninterrupted) against the same
    run in a copy of the project at another path, resumed there from the reference's checkpoint-3: every file of
    the run directory (trainer_state.json, DCP shards and .metadata, the export) and both stage metrics files are
    identical; the speed figures, in metrics/train_speed.json (no stage output), cover the one step it ran."""
    root, family_name, model_dir = packed_project
    reference, outputs = reference
    other = project_with_checkpoint(root, tmp_path / "another" / "checkout", "ws2", 3)
    proc = launch(other, "ws2", model_dir, family_name, max_steps=4, nproc_per_node=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and sorted(logged_steps(proc.stdout)) == [4]
    expected, got = tree(root / "output/ws2"), tree(other / "output/ws2")
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    for path in OUTPUT_FILES[:2]:
        assert (other / path).read_bytes() == outputs["files"][path], path
    speed = json.loads((other / "metrics/train_speed.json").read_text())
    assert set(speed) >= SPEED_KEYS and speed["steps_timed"] == 1 and speed["first_timed_step"] == 4
    assert speed["tokens_per_s"] > 0 and outputs["speed"]["steps_timed"] == 4


def test_every_pack_once_per_epoch(packed_project, reference):
    root = packed_project[0]
    reference, _ = reference
    import pyarrow.parquet as pq

    all_packs = sorted(pq.read_table(root / "data/packed/packs.parquet").column("pack_id").to_pylist())
    epoch0 = [p for h in reference if h["epoch"] == 0 for p in h["packs"]]
    assert sorted(epoch0) == all_packs


@pytest.mark.family_only("qwen2_5_vl")
def test_sigkill_during_a_checkpoint_write_then_resume_on_another_number_of_ranks(packed_project, reference):
    """Every process of a 2-rank run (qvl train, torchrun, the ranks) SIGKILLed while checkpoint-3 is being
    written: checkpoint-2 stays complete and loadable, and the run resumed from it on 1 rank (accumulation 2
    keeps the global batch) computes steps 3 and 4 equal to the reference's."""
    root, family_name, model_dir = packed_project
    reference, _ = reference
    path = write_params(root, "killed", model_dir, family_name, max_steps=4, nproc_per_node=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command(path), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    partial = root / "output/killed/.checkpoint-3.tmp"
    wait_until(lambda: partial.exists() or proc.poll() is not None, 300, "checkpoint-3 to be written")
    for pid in processes_with(str(path)):  # a whole-machine crash: nothing gets to clean up
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (root / "output/killed/checkpoint-3").exists(), "not killed mid-write"
    assert checkpoints(root, "killed") == [".checkpoint-3.tmp", "checkpoint-1", "checkpoint-2"]
    wait_until(lambda: not processes_with(str(path)), 30, "the killed ranks to go")
    # Resumed on 1 rank with accumulation 2 (the same global batch): the 2-rank checkpoint reshards.
    proc = launch(root, "killed", model_dir, family_name, max_steps=4, nproc_per_node=1, gradient_accumulation_steps=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "checkpoint-2 at step 2" in proc.stdout
    computed = logged_steps(proc.stdout)
    assert sorted(computed) == [3, 4]  # this run computed only what came after checkpoint-2
    for step, loss in computed.items():
        assert loss == pytest.approx(reference[step - 1]["loss"], rel=1e-5, abs=1e-6)
    resumed = history(root, "killed")
    assert losses(resumed) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)
    assert without_loss(resumed) == without_loss(reference)  # packs, lr, counts; no timing of either process
    assert not list((root / "output/killed").glob(".checkpoint-*"))  # no half-written checkpoint left


def test_export_loads_and_matches_the_trained_weights(packed_project, reference):
    root, family_name, _ = packed_project
    reference, outputs = reference
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
    metrics = outputs["metrics"]  # as the ws2 run wrote them
    assert metrics["steps"] == 4 and metrics["final_loss"] == reference[-1]["loss"]
    assert metrics["label_tokens"] == sum(h["label_tokens"] for h in reference)
    assert not SPEED_KEYS & set(metrics) and outputs["speed"]["tokens_per_s"] > 0
    assert [int(r["step"]) for r in outputs["plot"]] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in outputs["plot"]] == pytest.approx(losses(reference), rel=1e-12)


@pytest.mark.family_only("qwen2_5_vl")
def test_frozen_vision_tower_is_bit_identical(packed_project):
    root, family_name, model_dir = packed_project
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
    assert list((root / "logs/frozen/tensorboard").glob("events.out.tfevents.*"))
    assert not list((root / "output/frozen").rglob("events.out.tfevents.*"))  # not in the DVC output
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


@pytest.mark.family_only("qwen2_5_vl")
def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(packed_project):
    """lr 1e30: step 1 is finite, its update makes step 2 non-finite. The run stops naming step 2; checkpoint-1,
    the last good one, is the only checkpoint and loads with finite weights."""
    root, family_name, model_dir = packed_project
    proc = launch(
        root, "diverge", model_dir, family_name, max_steps=4, nproc_per_node=2, learning_rate=1e30, max_grad_norm=1e30
    )
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stdout + proc.stderr and "at step 2" in proc.stdout + proc.stderr
    assert checkpoints(root, "diverge") == ["checkpoint-1"]
    state = json.loads((root / "output/diverge/checkpoint-1/trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1] and math.isfinite(state["history"][0]["loss"])
    dcp_to_torch_save(root / "output/diverge/checkpoint-1", root / "diverge-1.pt")
    weights = torch.load(root / "diverge-1.pt", weights_only=False)["model"]
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.family_only("qwen2_5_vl")
def test_terminating_or_killing_qvl_train_leaves_no_rank(packed_project):
    """What a cancelled flow run does to the stage: SIGTERM to `qvl train` alone stops every rank and exits 143;
    SIGKILL to it alone (no handler runs) still leaves no rank behind."""
    root, family_name, model_dir = packed_project
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # no checkpoint writes: a rank inside a checkpoint's fsync dies only once the disk answers (the likely cause
        # of this wait once passing 60 s on a busy 2-core machine); how fast the disk is is not this test's subject
        options = dict(max_steps=1000, save_steps=1000, nproc_per_node=2)
        path = write_params(root, f"cancel-{sig.name}", model_dir, family_name, **options)
        stop_qvl_train_once_ranks_run(root, path, sig)


def stop_qvl_train_once_ranks_run(root, path, sig: signal.Signals) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages.cli", "train", "--params", str(path)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = f"stages.train.worker --params {path}"  # torchrun's command line and each rank's
    wait_until(lambda: len(processes_with(ranks)) >= 3 or proc.poll() is not None, 300, "torchrun and 2 ranks")
    assert proc.poll() is None, "qvl train ended before it could be stopped"
    proc.send_signal(sig)
    wait_until(lambda: not processes_with(ranks), 60, f"every rank to stop after {sig.name}")
    assert proc.wait(timeout=60) == (143 if sig == signal.SIGTERM else -signal.SIGKILL)


def expected_lr(kind: str, base: float, warmup: int, total: int, t: int) -> float:
    """The learning rate of step t + 1 (t from 0), written out from the schedules' definitions."""
    if t < warmup:
        return base * t / warmup
    progress = (t - warmup) / max(1, total - warmup)
    return {
        "constant": base,
        "linear": base * max(0.0, 1 - progress),
        "cosine": base * 0.5 * (1 + math.cos(math.pi * progress)),
    }[kind]


@pytest.mark.family_only("qwen2_5_vl")
def test_two_epochs_two_packs_per_device_warmup_and_save_total_limit(packed_project):
    """One launch, several promises: max_steps 0 runs num_train_epochs (2) epochs, every pack once in each;
    per_device_train_batch_size 2 puts two packs in every step; the cosine schedule warms up over warmup_steps;
    save_total_limit 1 keeps only the newest checkpoint."""
    root, family_name, model_dir = packed_project
    import pyarrow.parquet as pq

    all_packs = sorted(pq.read_table(root / "data/packed/packs.parquet").column("pack_id").to_pylist())
    assert len(all_packs) % 2 == 0, "the demo's pack count must split into full steps of 2"
    options = dict(max_steps=0, num_train_epochs=2, per_device_train_batch_size=2, nproc_per_node=1)
    schedule = dict(lr_scheduler_type="cosine", warmup_steps=2, learning_rate=1e-3, save_total_limit=1)
    proc = launch(root, "epochs", model_dir, family_name, **options, **schedule)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    total = len(all_packs)  # two epochs of len/2 steps
    assert sorted(logged_steps(proc.stdout)) == list(range(1, total + 1))
    assert f"step {total}/{total} loss" in proc.stdout
    h = history(root, "epochs")
    assert [x["epoch"] for x in h] == [0] * (total // 2) + [1] * (total // 2)
    for epoch in (0, 1):
        assert sorted(p for x in h if x["epoch"] == epoch for p in x["packs"]) == all_packs
    assert all(len(x["packs"]) == 2 for x in h)
    assert [x["lr"] for x in h] == pytest.approx([expected_lr("cosine", 1e-3, 2, total, t) for t in range(total)])
    assert checkpoints(root, "epochs") == [f"checkpoint-{total}"]


@pytest.mark.family_only("qwen2_5_vl")
def test_gradient_checkpointing_changes_nothing_and_a_config_change_discards_old_checkpoints(packed_project, reference):
    """A one-step run, then the same run with gradient_checkpointing: true. The changed config must not resume
    from the old checkpoint (it is discarded), and recomputing activations in the backward pass must give the
    reference's losses and trained weights."""
    root, family_name, model_dir = packed_project
    reference, _ = reference
    assert train(root, "gc", model_dir, family_name, max_steps=1, nproc_per_node=2)  # without checkpointing
    assert checkpoints(root, "gc") == ["checkpoint-1"]
    stale = json.loads((root / "output/gc/checkpoint-1/trainer_state.json").read_text())["fingerprint"]
    proc = launch(root, "gc", model_dir, family_name, max_steps=4, nproc_per_node=2, gradient_checkpointing=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting fresh" in proc.stdout and "resumed from" not in proc.stdout
    assert sorted(logged_steps(proc.stdout)) == [1, 2, 3, 4]
    fingerprints = {
        json.loads((root / "output/gc" / c / "trainer_state.json").read_text())["fingerprint"]
        for c in checkpoints(root, "gc")
    }
    assert checkpoints(root, "gc") == ["checkpoint-3", "checkpoint-4"] and stale not in fingerprints
    assert losses(history(root, "gc")) == pytest.approx(losses(reference), rel=1e-5)
    fam = family(family_name)
    cls = fam.transformers_class(fam.model_class)
    with_gc = cls.from_pretrained(root / "output/gc/hf", dtype=torch.float32).state_dict()
    without = cls.from_pretrained(root / "output/ws2/hf", dtype=torch.float32).state_dict()
    for name, weight in without.items():
        torch.testing.assert_close(with_gc[name], weight, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.family_only("qwen2_5_vl")
def test_register_and_registry_cli_on_the_trained_run(packed_project, reference):
    """`qvl register` records the reference run's kept checkpoints (save_total_limit 2: steps 3 and 4) with its
    metrics and lineage, a second register adds nothing, and `qvl registry list/show` read them back."""
    root, family_name, _ = packed_project
    reference, outputs = reference
    for path in OUTPUT_FILES:  # as the ws2 run left them
        (root / path).write_bytes(outputs["files"][path])
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def qvl(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "stages.cli", *args, "--params", str(root / "ws2.yaml")]
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=300)

    for _ in range(2):
        proc = qvl("register")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "registered ws2@4-" in proc.stderr and "(2 checkpoint(s) of run ws2" in proc.stderr
    listed = qvl("registry", "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    lines = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(cols[0].split("-")[0], cols[1]) for cols in lines] == [("ws2@3", "step 3"), ("ws2@4", "step 4")]
    assert lines[1][2] == f"loss {reference[-1]['loss']}" and lines[1][3] == "output/ws2/checkpoint-4"
    shown = qvl("registry", "show", "ws2@4")
    assert shown.returncode == 0, shown.stderr[-2000:]
    row = json.loads(shown.stdout)
    assert row["hf_path"] == "output/ws2/hf" and row["metrics"]["final_loss"] == reference[-1]["loss"]
    assert row["metrics"]["speed"] == outputs["speed"]
    assert isinstance(row["data_hashes"], dict)
    assert row["run"] == "ws2" and row["step"] == 4 and len(row["params_hash"]) == 16
    missing = qvl("registry", "show", "nope")
    assert missing.returncode == 2 and "no checkpoint 'nope'" in missing.stderr
