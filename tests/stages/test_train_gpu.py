"""GPU paths (run on a CUDA machine, skipped elsewhere): varlen attention and Liger kernels give the loss of the
plain sdpa path on the same packed rows within bf16 tolerance."""

import json
import os
import subprocess
import sys

import pytest
import torch

from stages.train.attention import kernel_name
from tests.conftest import REPO
from tests.stages.test_train_distributed import write_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_RELATIVE = 2e-2


def test_varlen_kernel_is_chosen_on_cuda():
    assert kernel_name(torch.device("cuda")) in {"flash-attn varlen", "torch varlen_attn"}


def test_varlen_and_liger_match_sdpa(packed_project):
    root, family_name, model_dir = packed_project
    params = write_params(root, "gpu-equivalence", model_dir, family_name)
    out = root / "gpu-equivalence.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "tests/stages/gpu_equivalence_worker.py"), str(params), str(out)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["liger_applied"], result["liger_note"]
    assert result["varlen"] == pytest.approx(result["sdpa"], rel=BF16_RELATIVE)
    assert result["varlen_liger"] == pytest.approx(result["sdpa"], rel=BF16_RELATIVE)
