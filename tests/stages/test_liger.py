"""use_liger_kernel on CPU: the torch stand-ins run the Liger code path (module swap, fused linear cross-entropy
inside the model's forward) and give the plain path's loss and gradients; the chunked cross-entropy's memory;
the module swap with Liger's own classes on a meta-device model; the error when Liger's kernels cannot run.
(FSDP2 and sequence parallelism with the stand-ins: tests/stages/test_liger_distributed.py.)"""

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from liger_kernel.transformers.rms_norm import LigerRMSNorm
from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

from schemas.errors import ConfigError
from stages.families import family
from stages.tokenize.vision import VisionArgs
from stages.train.attention import ATTENTION_NAME, PackedSegments, implementation_map
from stages.train.data import RowBuilder
from stages.train.forward import plain_linear_cross_entropy, row_loss_sum
from stages.train.kernels import (
    Kernels,
    TorchRMSNorm,
    TorchSwiGLUMLP,
    chunked_linear_cross_entropy,
    liger_kernels,
)
from stages.train.liger import apply_liger, replace_modules
from tests.conftest import pipeline_params, processor_of

CPU = torch.device("cpu")


def load_model(model_dir, fam):
    return fam.transformers_class(fam.model_class).from_pretrained(
        model_dir, attn_implementation=implementation_map(ATTENTION_NAME), dtype=torch.float32
    )


def row_with_images_and_video(builder):
    """The first one- or two-pack row with real images and videos (not only the label-free dummies)."""
    ids = sorted(builder.packs)
    for packs in [[p] for p in ids] + [[a, b] for a in ids for b in ids if a < b]:
        row = builder.build(packs)
        if sum(int(v.prod(-1).sum()) > 64 for k, v in row.vision.items() if k.endswith("grid_thw")) == 2:
            return row
    raise AssertionError("no pack combination has both images and videos")


def loss_and_grads(model, row, liger):
    model.zero_grad(set_to_none=True)
    loss = row_loss_sum(model, row, CPU, None, liger)
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def test_stand_ins_give_the_plain_loss_and_gradients(packed_project):
    """fp32, packed row with images and video, padding-free text and vision attention: relative error < 1e-5."""
    root, family_name, model_dir = packed_project
    fam = family(family_name)
    plain, liger = load_model(model_dir, fam), load_model(model_dir, fam)
    kernels, _ = apply_liger(liger, fam, CPU)
    processor = processor_of(model_dir)
    vision = VisionArgs.for_processor(processor, pipeline_params(model_dir, family_name).dataset_config)
    builder = RowBuilder(root, processor, vision, type(plain), plain.config)
    row = row_with_images_and_video(builder)
    reference_loss, reference = loss_and_grads(plain, row, False)
    loss, grads = loss_and_grads(liger, row, kernels)
    assert abs(loss - reference_loss) / reference_loss < 1e-5
    assert grads.keys() == reference.keys()  # same parameter names, all trained
    diff = sum(float((grads[n] - g).norm() ** 2) for n, g in reference.items()) ** 0.5
    assert diff / sum(float(g.norm() ** 2) for g in reference.values()) ** 0.5 < 1e-5
    assert any(n.startswith(fam.vision_tower_prefix) for n in grads)


def test_the_swap_changes_module_types_keeps_parameters_and_logs_the_kernels(tiny_models):
    fam = family("qwen2_5_vl")
    model = load_model(tiny_models["qwen2_5_vl"], fam)
    before = {n: p.data_ptr() for n, p in model.state_dict().items()}
    kernels, line = apply_liger(model, fam, CPU)
    assert kernels.name == "torch stand-ins"
    types = [type(m) for m in model.modules()]
    # 2 text layers x 2 norms + final norm + 2 vision blocks x 2 norms + merger norm; 2 text + 2 vision MLPs
    assert types.count(TorchRMSNorm) == 10 and types.count(TorchSwiGLUMLP) == 4
    assert not any(type(m).__name__ in fam.rms_norm_classes + fam.swiglu_mlp_classes for m in model.modules())
    assert {n: p.data_ptr() for n, p in model.state_dict().items()} == before  # same keys, same tensors
    assert line == (
        "torch stand-ins on cpu (no Liger): RMSNorm x10 (TorchRMSNorm), SwiGLU MLP x4 (TorchSwiGLUMLP), "
        "linear cross-entropy chunked_linear_cross_entropy; RoPE not swapped (see docs/decisions.md)"
    )


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_liger_classes_swap_into_a_meta_device_model(tiny_models, family_name):
    """The real Liger modules (their kernels need a GPU, their construction does not), on the meta device as
    the lead's loader builds the model: no allocation, no change of parameter names."""
    fam = family(family_name)
    config = AutoConfig.from_pretrained(tiny_models[family_name])
    with torch.device("meta"):
        model = fam.transformers_class(fam.model_class)._from_config(config)
    before = {n: id(p) for n, p in model.named_parameters()}
    liger = Kernels("liger", LigerRMSNorm, LigerSwiGLUMLP, chunked_linear_cross_entropy)
    counts = replace_modules(model, fam, liger)
    assert {n: id(p) for n, p in model.named_parameters()} == before  # the same parameter objects, same names
    assert all(p.is_meta for p in model.parameters())
    expected = {"qwen2_5_vl": (10, 4), "qwen3_vl": (9, 2)}[family_name]  # Qwen3: 2 layers x (2 + q/k norms) + 1
    assert (counts["RMSNorm"], counts["SwiGLU MLP"]) == expected
    norms = [m for m in model.modules() if isinstance(m, LigerRMSNorm)]
    assert len(norms) == expected[0]
    assert all((m.offset, m.casting_mode, m.in_place, m.variance_epsilon) == (0.0, "llama", False, 1e-6) for m in norms)


def test_liger_kernels_that_cannot_run_are_a_config_error_naming_the_versions():
    """On this machine Triton finds no GPU driver: the check at start says so, with the versions."""
    with pytest.raises(
        ConfigError,
        match=r"use_liger_kernel: Liger's kernels fail on cpu .*liger-kernel 0\.8\.5.*"
        r"transformers 5\.23",
    ):
        liger_kernels(CPU)


def test_chunked_cross_entropy_equals_the_plain_one():
    torch.manual_seed(0)
    hidden = torch.randn(301, 32, requires_grad=True)  # not a multiple of the chunk
    weight = torch.randn(40000, 32, requires_grad=True)
    targets = torch.randint(0, 40000, (301,))
    results = []
    for fn in (plain_linear_cross_entropy, chunked_linear_cross_entropy):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets)
        (loss * 0.5).backward()  # a non-unit incoming gradient
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*results, strict=True):
        assert float((a.double() - b.double()).norm() / b.double().norm()) < 1e-5


class PeakMemory(TorchDispatchMode):
    """The largest total size of the tensor storages that ops create while active (not counting ``existing``),
    tracked per op through weak references to the storages."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and (ptr := t.untyped_storage().data_ptr()) not in self.ignore:
                self.live.setdefault(ptr, (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_bytes(fn, positions: int, vocab: int, hidden_size: int = 64) -> int:
    torch.manual_seed(0)
    hidden = torch.randn(positions, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,))
    with PeakMemory([hidden, weight, targets]) as tracker:
        fn(hidden, weight, targets).backward()
    return tracker.peak


def test_chunked_cross_entropy_memory_is_under_a_quarter_of_the_logits():
    """2k label positions, a 150k vocabulary: forward and backward (the weight gradient included) stay under
    a quarter of the full fp32 logits; the plain path, measured the same way, holds all of them."""
    positions, vocab = 2048, 151936
    logits = positions * vocab * 4
    peak = peak_bytes(chunked_linear_cross_entropy, positions, vocab)
    print(f"chunked linear cross-entropy: peak {peak / 2**20:.0f} MiB, full logits {logits / 2**20:.0f} MiB")
    assert peak < logits / 4
    small = 256  # the plain path at 1/8 of the positions, to keep the test's own memory small
    assert peak_bytes(plain_linear_cross_entropy, small, vocab) >= small * vocab * 4


def test_plain_cross_entropy_is_what_the_model_computes(packed_project):
    """The shared loss path (hidden states -> kept positions -> lm_head -> cross-entropy) equals the loss
    transformers computes from the model's own logits."""
    root, family_name, model_dir = packed_project
    fam = family(family_name)
    model = load_model(model_dir, fam)
    processor = processor_of(model_dir)
    vision = VisionArgs.for_processor(processor, pipeline_params(model_dir, family_name).dataset_config)
    row = row_with_images_and_video(RowBuilder(root, processor, vision, type(model), model.config))
    with torch.no_grad():
        loss = row_loss_sum(model, row, CPU)
        logits = model(
            input_ids=row.input_ids,
            position_ids=row.position_ids,
            packed_segments=PackedSegments.from_text_positions(row.position_ids[0, 0], CPU),
            **row.vision,
        ).logits[0]
    targets = row.targets[0]
    expected = F.cross_entropy(logits[targets != -100], targets[targets != -100], reduction="sum")
    assert abs(float(loss) - float(expected)) / float(expected) < 1e-5
