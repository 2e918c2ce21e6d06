"""The padding-free vision attention (stages/train/vision_attention.py): the vision tower's output equals
transformers' SDPA path for images, several images and videos, both families, and no vision block makes the host
wait on the device (host reads of tensor values counted, SDPA path as the counter-check)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

from stages.families import family
from stages.train.attention import ATTENTION_NAME, implementation_map
from stages.train.vision_attention import VISION_ATTENTION_NAME

GRIDS = {  # (t, h, w) in patches per image or video; h and w multiples of the merge size
    "image": [[1, 8, 12]],
    "images": [[1, 8, 12], [1, 4, 4], [1, 16, 8]],
    "video": [[4, 8, 8]],
    "images and videos": [[1, 6, 10], [2, 8, 8], [1, 4, 4], [4, 4, 8]],
}


def tiny(model_dir, family_name: str, vision_attention: str, depth: int | None = None):
    fam = family(family_name)
    config = AutoConfig.from_pretrained(model_dir)
    if depth is not None:
        config.vision_config.depth = depth
    torch.manual_seed(0)
    implementation = {"text_config": ATTENTION_NAME, "vision_config": vision_attention}
    return fam.transformers_class(fam.model_class)._from_config(config, attn_implementation=implementation)


def pixels(model, grid: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    config = model.config.vision_config
    grid_thw = torch.tensor(grid)
    torch.manual_seed(1)
    patch = config.in_channels * config.temporal_patch_size * config.patch_size**2
    values = torch.randn(int(grid_thw.prod(-1).sum()), patch)
    return values, grid_thw


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("case", list(GRIDS))
def test_vision_tower_output_equals_sdpa(tiny_models, family_name, case):
    assert implementation_map(ATTENTION_NAME)["vision_config"] == VISION_ATTENTION_NAME  # what training loads
    sdpa = tiny(tiny_models[family_name], family_name, "sdpa")
    varlen = tiny(tiny_models[family_name], family_name, VISION_ATTENTION_NAME)
    varlen.load_state_dict(sdpa.state_dict())
    assert varlen.model.visual.config._attn_implementation == VISION_ATTENTION_NAME
    values, grid_thw = pixels(sdpa, GRIDS[case])
    with torch.no_grad():
        got = varlen.model.visual(values, grid_thw=grid_thw)
        expected = sdpa.model.visual(values, grid_thw=grid_thw)
    for name in ("last_hidden_state", "pooler_output"):
        a, b = getattr(got, name), getattr(expected, name)
        assert float((a - b).norm() / b.norm()) < 1e-5, name
    deepstack = getattr(got, "deepstack_features", None) or []  # Qwen3-VL's deepstack outputs
    for a, b in zip(deepstack, getattr(expected, "deepstack_features", None) or [], strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-5


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: ``.item()``-like scalar reads and data-dependent shapes seen
    by the dispatcher, plus ``Tensor.tolist`` calls (which do not go through it)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads(model, grid, monkeypatch) -> int:
    values, grid_thw = pixels(model, grid)
    with monkeypatch.context() as patch, HostReads(patch) as reads:
        model.model.visual(values, grid_thw=grid_thw).pooler_output.sum().backward()
    return reads.count


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_no_vision_block_reads_from_the_device(tiny_models, family_name, monkeypatch):
    """Doubling the blocks adds no host read (forward and backward); transformers' SDPA path adds one per
    block (its ``lengths.tolist()``), which shows the counter sees them."""
    grid = GRIDS["images and videos"]
    reads = {
        (attention, depth): host_reads(tiny(tiny_models[family_name], family_name, attention, depth), grid, monkeypatch)
        for attention in (VISION_ATTENTION_NAME, "sdpa")
        for depth in (2, 4)
    }
    assert reads[VISION_ATTENTION_NAME, 4] == reads[VISION_ATTENTION_NAME, 2]
    assert reads["sdpa", 4] >= reads["sdpa", 2] + 2
