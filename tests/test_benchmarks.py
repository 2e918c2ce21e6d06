"""The GPU check stays runnable and its figures mean what they say: the CPU smoke of benchmarks/gpu_check.sh (the
GPU tests, a `qvl train` of the demo through torchrun, the training benchmark with the tiny model) writes every
JSON field, with the full path's and the baseline's first-step losses equal; a forced out-of-memory is a result,
and the benchmark goes on with the next configuration."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

CONFIG_FIELDS = {
    "config": str,
    "about": str,
    "attention": str,
    "liger": bool,
    "world_size": int,
    "oom": bool,
    "steps": int,
    "warmup_steps": int,
    "seconds": float,
    "tokens": int,
    "tokens_per_s": float,
    "flops_lm_per_s": float,
    "flops_with_vision_per_s": float,
    "peak_mem_gib": float,
    "first_step_loss": float,
    "losses": list,
    "micro_batches_per_step": float,
    "tokens_through_model_per_step": float,
    "longest_row": dict,
}
CONVENTIONS = {
    "tokens",
    "step",
    "tokens_per_s",
    "flops",
    "mfu",
    "mfu_with_vision",
    "peak_mem_gib",
    "first_step_loss",
    "longest_row",
}


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def bench(tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "train_gpu.json"
    cmd = [sys.executable, str(REPO / "benchmarks/train_gpu.py"), "--smoke", "--out", str(out), *flags]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=600)
    return proc, json.loads(out.read_text()) if out.is_file() else None


def check_config(c: dict) -> None:
    for field, kind in CONFIG_FIELDS.items():
        assert isinstance(c[field], kind), (field, c.get(field))
    assert c["mfu"] is None and c["mfu_with_vision"] is None  # no peak FLOP/s on CPU: stated, not guessed
    assert c["tokens_per_s"] > 0 and c["flops_with_vision_per_s"] >= c["flops_lm_per_s"] > 0
    assert c["steps"] >= 1 and len(c["losses"]) == c["steps"] + c["warmup_steps"]
    row = c["longest_row"]
    assert row["tokens"] > 0 and row["probes"] and all({"size", "tokens", "oom"} <= set(p) for p in row["probes"])


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_result(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(REPO / "benchmarks/gpu_check.sh"), "--smoke", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0 and summary["passed_all"], proc.stderr[-3000:] + json.dumps(summary)[-3000:]
    # The GPU tests were collected and skip without CUDA (the suite runs their CPU tolerance twin itself).
    assert summary["tests"]["skipped"] >= 3 and summary["tests"]["failure"] == summary["tests"]["error"] == 0
    assert summary["demo_train"]["metrics"]["train"]["steps"] == 2
    demo = json.loads((out / "demo_train_metrics.json").read_text())
    assert demo["train"]["final_loss"] > 0 and demo["train_speed"]["tokens_per_s"] > 0
    assert demo["evaluate"]["eval_loss"] == pytest.approx(demo["train"]["eval_loss"], rel=1e-5)  # the step-2 export
    result = json.loads((out / "train_gpu.json").read_text())
    for key in ("device", "date", "torch", "transformers", "attention_kernel", "model", "packing_length"):
        assert result[key] is not None, key
    assert set(result["conventions"]) == CONVENTIONS
    configs = result["configs"]
    assert set(configs) == {"full_path", "full_path_no_liger", "baseline", "sp2"}
    assert "skipped" in configs["sp2"]  # fewer than two GPUs here
    for name in ("full_path", "full_path_no_liger", "baseline"):
        check_config(configs[name])
        assert configs[name]["tokens"] == configs["full_path"]["tokens"]  # same samples, real tokens only
    assert configs["baseline"]["attention"] == "sdpa" and configs["full_path"]["attention"] == "qvl_packed"
    real_per_step = configs["full_path"]["tokens"] / configs["full_path"]["steps"]
    assert configs["baseline"]["tokens_through_model_per_step"] >= real_per_step  # padding is not counted
    comparison = result["comparison"]
    assert comparison["first_step_loss_abs_diff"] < 1e-4
    assert abs(configs["full_path"]["first_step_loss"] - configs["baseline"]["first_step_loss"]) < 1e-4
    assert comparison["speedup_tokens_per_s"] > 0 and comparison["peak_memory_ratio"] > 0


def test_forced_out_of_memory_is_a_result_and_the_run_goes_on(tmp_path):
    """The baseline's one micro-batch of a 1k pack (budget 4k, padded) passes a 1,050-token cap and runs out of
    memory at its first step; the full path's 1k rows fit, and its row search stops at the cap."""
    proc, result = bench(
        tmp_path,
        "--configs",
        "baseline,full_path",
        "--packing-length",
        "1024",
        "--budget",
        "4096",
        "--mem-cap-tokens",
        "1050",
        "--search-start",
        "512",
        "--search-limit",
        "2048",
        "--bisections",
        "1",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base, full = result["configs"]["baseline"], result["configs"]["full_path"]
    assert base["oom"] is True and base["at"] > 1050
    assert "tokens_per_s" not in base
    check_config(full)
    row = full["longest_row"]
    assert 512 <= row["tokens"] <= 1050 < row["oom_at"]
    assert [p["oom"] for p in row["probes"]][:3] == [False, False, True]  # 512, 1k fit; 2k does not
    assert result["comparison"]["speedup_tokens_per_s"] is None  # nothing to compare against
