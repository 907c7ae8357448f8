"""Upstream peft's own PaCA tuner (peft's main branch) and paca_hpu compute the same thing given the same columns.

Skipped where the installed peft has no PaCA tuner (peft <= 0.21 on PyPI). To run it: a separate environment with
peft from its main branch (docs/benchmarks.md, "upstream peft PaCA"), e.g. ``pip install
git+https://github.com/huggingface/peft`` into a fresh virtual environment, then ``python -m pytest
tests/unit/test_peft_paca.py`` with its Python.

Both models start from the same float64 tiny LLaMA; peft's per-layer column indices are overwritten with
paca_hpu's, both get the same random update of the selected columns, and then: logits equal each other and a dense
float64 reference (the base model with ``W[:, idx] += scaling * delta`` written in), the gradients of every
layer's update are equal, and merging gives the same weights.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import random_ids, tiny_llama

peft = pytest.importorskip("peft")
if not hasattr(peft, "PacaConfig"):
    pytest.skip(f"peft {peft.__version__} has no PaCA tuner (peft.PacaConfig): peft's main branch has it",
                allow_module_level=True)

from paca_hpu import PaCAConfig, apply_paca, merge_paca, paca_layers  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _models(r=4, alpha=8):
    base = tiny_llama(seed=0, dtype=torch.float64)
    ours = apply_paca(copy.deepcopy(base), PaCAConfig(r=r, paca_alpha=alpha, target_modules=TARGETS))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PacaConfig(r=r, paca_alpha=alpha, target_modules=TARGETS,
                                                                       random_seed=0))
    upstream = {n.split("base_model.model.", 1)[1]: m for n, m in theirs.named_modules()
                if hasattr(m, "paca_indices") and "default" in getattr(m, "paca_delta", {})}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in paca_layers(ours):
            up = upstream[name]
            up.paca_indices["default"] = layer.indices.detach().clone().long()
            update = torch.randn(layer.delta.shape, generator=g, dtype=torch.float64) * 0.1
            layer.delta.copy_(update)
            up.paca_delta["default"].data = update.clone().to(up.paca_delta["default"].dtype)
            assert up.scaling["default"] == layer.scaling
    assert len(upstream) == len(list(paca_layers(ours))) == 14
    return base, ours, theirs, upstream


def _dense_reference(base, ours):
    ref = copy.deepcopy(base)
    with torch.no_grad():
        mods = dict(ref.named_modules())
        for name, layer in paca_layers(ours):
            w = mods[name].weight
            w[:, layer.indices.long()] += layer.scaling * layer.delta.double()
    return ref


def test_same_indices_same_logits_grads_and_merge():
    base, ours, theirs, upstream = _models()
    ids = random_ids(2, 8)
    ref_logits = _dense_reference(base, ours)(input_ids=ids).logits
    ours.train()
    theirs.train()
    out_ours = ours(input_ids=ids, labels=ids)
    out_theirs = theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, ref_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_theirs.logits, ref_logits, rtol=1e-12, atol=1e-12)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in paca_layers(ours):
        g_up = upstream[name].paca_delta["default"].grad
        torch.testing.assert_close(g_up.double(), layer.delta.grad.double(), rtol=1e-10, atol=1e-12, msg=name)
    merged_ours = dict(merge_paca(ours).named_parameters())
    merged_theirs = dict(theirs.merge_and_unload().named_parameters())
    for name in (n for n, _ in base.named_parameters()):
        torch.testing.assert_close(merged_theirs[name], merged_ours[name], rtol=0, atol=1e-14, msg=name)


def test_benchmark_variant_builds_and_trains():
    from benchmarks.variants import build_variant, make_optimizer

    base = tiny_llama(seed=0, dtype=torch.float32)
    base.train()
    v = build_variant("peft_paca", base, r=4, alpha=8.0)
    assert "upstream peft" in v.note and v.trainable == sum(p.numel() for p in v.params) > 0
    opt = make_optimizer(v, 1e-2)
    ids = random_ids(2, 8)
    weights0 = {n: p.detach().clone() for n, p in v.model.named_parameters() if "base_layer.weight" in n}
    losses = []
    for _ in range(3):
        loss = v.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for n, p in v.model.named_parameters():  # peft's PaCA restores the base weight after every GEMM
        if n in weights0:
            assert torch.equal(p, weights0[n]), n
