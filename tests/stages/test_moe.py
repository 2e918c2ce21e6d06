"""Qwen3-VL-MoE's router load-balancing loss against the model's own computation (transformers'
``output_router_logits=True`` with ``labels=``), and gradients that reach the experts and the router."""

import pytest
import torch

from stages.train.attention import ATTENTION_NAME
from stages.train.forward import row_losses
from tests.stages.test_train_units import load, reference_inputs

CPU = torch.device("cpu")


@pytest.mark.parametrize("packed_project", ["qwen3_vl_moe"], indirect=True)
def test_loss_with_router_balance_equals_the_models_own_on_one_sample(packed_project):
    """One image sample and one video sample, each alone in a row (with the dummy vision segments every row
    carries): cross-entropy over the label tokens + router_aux_loss_coef x the balance loss equals the model's
    ``.loss`` and the balance loss its ``.aux_loss`` (fp32, 1e-5); after backward every expert's weights, the
    routers' and the vision tower's have non-zero gradients."""
    root, fam, params, model, builder = load(packed_project, ATTENTION_NAME)
    reference = load(packed_project, "sdpa")[3]
    coef = model.config.text_config.router_aux_loss_coef
    assert coef > 0 and fam.moe
    chosen = {}
    for sample_id in builder.samples:
        s = builder.samples[sample_id]
        chosen.setdefault("video" if s["video_keys"] else "image" if s["image_paths"] else "text", sample_id)
    total = 0
    for kind in ("image", "video"):
        sample_id = chosen[kind]
        row = builder.build_samples([sample_id])
        assert row.sample_tokens == len(builder.samples[sample_id]["input_ids"]) < row.tokens  # dummies follow
        parts = row_losses(model, row, CPU, router=True)
        ours = parts.cross_entropy / row.label_tokens + coef * parts.router_balance
        labels = torch.tensor([builder.samples[sample_id]["labels"]])
        with torch.no_grad():
            theirs = reference(
                **reference_inputs(builder, sample_id), labels=labels, output_router_logits=True, use_cache=False
            )
        assert float(parts.router_balance.detach()) == pytest.approx(float(theirs.aux_loss), rel=1e-5), kind
        assert float(ours.detach()) == pytest.approx(float(theirs.loss), rel=1e-5), kind
        total = total + ours
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    experts = [n for n in grads if ".mlp.experts." in n]
    routers = [n for n in grads if n.endswith(".mlp.gate.weight")]
    assert experts and routers
    for name in experts + routers:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for name in experts:  # every expert of every MoE layer (dim 0 of the fused weights) was routed to
        assert (grads[name].flatten(1).abs().sum(1) > 0).all(), name
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(fam.vision_tower_prefix))
