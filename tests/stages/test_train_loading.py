"""The trainer's loading path on 2 real gloo ranks (torchrun): rank 0 alone reads the checkpoint, the sharded
model equals a plain ``from_pretrained`` one, one gradient sync per step equals a sync per micro-batch, and the
multi-tensor AdamW equals the per-parameter loop."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_torchrun

pytestmark = pytest.mark.slow


def run_worker(family_name: str, model_dir, out) -> list[dict]:
    run_torchrun("loading_worker.py", family_name, model_dir, out)
    return [json.loads(out.with_name(f"{out.name}.rank{r}.json").read_text()) for r in (0, 1)]


def test_rank_1_never_holds_a_whole_copy_of_the_weights(tmp_path):
    """benchmarks/load_memory.py on a 170 MB checkpoint: the trainer's path against the previous one (every rank
    reads the whole checkpoint), which shows that this measure sees a whole copy when there is one."""
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(REPO / "benchmarks/load_memory.py"), "--size", "small", "--cache", str(tmp_path)]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    size, modes = result["checkpoint_bytes"], result["modes"]

    def grown(mode: str, rank: int) -> float:
        r = modes[mode][rank]
        return (r["rss_peak"] - r["rss_before"]) / size

    assert size > 150e6
    assert grown("sharded", 1) < 0.75  # its own half of the fp32 weights plus one tensor in flight
    assert grown("sharded", 0) > 0.9  # rank 0 did read the whole checkpoint
    assert grown("legacy", 1) > 1.0  # a whole copy on rank 1 is what the measure would show


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_sharded_load_accumulation_and_optimizer_match_the_plain_model(tmp_path, tiny_models, family_name):
    results = run_worker(family_name, tiny_models[family_name], tmp_path / "numerics")
    for r in results:
        assert r["tied"], "lm_head and the token embeddings must stay one parameter"
        assert r["buffers_equal"] and any("inv_freq" in b for b in r["buffers"]), r["buffers"]
        assert r["loss"] == pytest.approx(r["plain_loss"], rel=1e-6)
        assert r["grad_error"] < 1e-5
        assert r["accumulation_error"] < 1e-6
        assert r["optimizer_moved"] > 1e-4  # the steps changed the weights, so the comparison below means something
        assert r["optimizer_error"] < 1e-6
