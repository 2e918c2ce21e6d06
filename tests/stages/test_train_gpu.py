"""The packed training path against an fp32 SDPA reference, forward and backward (tests/stages/
gpu_equivalence_worker.py says what is compared and how the tolerance was chosen).

On CUDA (marked ``gpu``, skipped elsewhere): the trainer's bf16 path (meta build, FSDP2 over NCCL, varlen
kernel, with and without Liger) passes the comparison and the broken variant (segments crossing) fails it.
On every machine: the same comparison on CPU (fp32 and the trainer's bf16 mixed precision, per-sample SDPA
kernel) passes, and the broken variant fails the same assertion, so the tolerance itself is tested.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from stages.train import free_port
from stages.train.attention import ATTENTION_NAME, kernel_name
from tests.conftest import FAMILIES, MORE_FAMILIES, REPO
from tests.stages import gpu_equivalence_worker as eq

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cpu_comparison(tiny_models):
    """fp32 reference, then the packed path in fp32 and bf16 (with and without the Liger stand-ins) and the
    broken variant in bf16, on CPU."""
    from stages.train.distributed import init_distributed

    model_dir = str(tiny_models["qwen2_5_vl"])  # read only
    params = eq.bench_params(model_dir, "qwen2_5_vl")
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cpu = init_distributed().device
    try:
        rows = eq.copy_rows(rows=2, samples_per_row=4, half=96)
        ref = eq.reference(eq.trainer_model(params, cpu, "sdpa", fsdp_bf16=None)[0], rows, cpu)
        results = {}
        for name, attention, bf16, liger in (
            ("fp32", ATTENTION_NAME, False, False),
            ("bf16", ATTENTION_NAME, True, False),
            ("liger_bf16", ATTENTION_NAME, True, True),  # the torch stand-ins of the Liger kernel set
            ("broken_bf16", eq.BROKEN, True, False),
        ):
            model, kernels, _ = eq.trainer_model(params, cpu, attention, fsdp_bf16=bf16, liger=liger)
            results[name] = eq.compare(eq.packed(model, rows, cpu, kernels), ref)
        yield results
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow  # five model builds compared in-process: ~30 s of CPU, not the fast tier
def test_packed_path_matches_the_sdpa_reference_on_cpu(cpu_comparison):
    assert cpu_comparison["fp32"]["grad_max_rel_err"] < 1e-4  # fp32: summation order only
    eq.assert_matches(cpu_comparison["fp32"], "fp32 packed path")
    eq.assert_matches(cpu_comparison["bf16"], "bf16 packed path")
    eq.assert_matches(cpu_comparison["liger_bf16"], "bf16 packed path, Liger stand-ins")


@pytest.mark.slow  # five model builds compared in-process: ~30 s of CPU, not the fast tier
def test_segments_crossing_fails_the_same_assertion_on_cpu(cpu_comparison):
    broken = cpu_comparison["broken_bf16"]
    with pytest.raises(AssertionError, match="worst gradient"):
        eq.assert_matches(broken, "broken packed path")
    # the separation the tolerance relies on: bf16 noise well below it, the bug well above
    assert cpu_comparison["bf16"]["grad_max_rel_err"] * 2 < eq.GRAD_TOLERANCE < broken["grad_max_rel_err"] / 2


@pytest.mark.gpu
@needs_cuda
def test_varlen_kernel_is_chosen_on_cuda():
    assert kernel_name(torch.device("cuda")) in {"flash-attn varlen", "torch varlen_attn"}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family_name", FAMILIES + MORE_FAMILIES)
def test_trainer_bf16_path_matches_fp32_reference_on_cuda(tiny_models, family_name, tmp_path):
    out = tmp_path / "gpu-equivalence.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    env |= {"LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [
        sys.executable,
        str(REPO / "tests/stages/gpu_equivalence_worker.py"),
        str(tiny_models[family_name]),
        family_name,
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    eq.assert_matches(result["varlen_bf16"], "varlen bf16 (FSDP2, NCCL)")
    assert result["varlen_liger_bf16"]["liger_note"].startswith("Liger Triton kernels")
    eq.assert_matches(result["varlen_liger_bf16"], "varlen + Liger bf16")
    with pytest.raises(AssertionError, match="worst gradient"):
        eq.assert_matches(result["broken_bf16"], "broken varlen bf16")
