"""PaCALinear on a weight it does not own (what FSDP / FSDP2 / DeepSpeed ZeRO-3 hand a layer inside forward, or
``torch.func.functional_call`` with a substituted weight), single process: the rank-r correction path against a
dense float64 reference, what it saves for backward, and the refusals for sharded weights. The engines themselves
run in tests/distributed/test_distributed.py."""

import copy

import pytest
import torch
from torch import nn

from helpers import OneLayer, randn, saved_bytes

from paca_hpu import PaCAConfig, apply_paca


def _trained_layer(dtype=torch.float64, in_features=64, out_features=24, r=8):
    model = apply_paca(OneLayer(in_features, out_features, dtype=dtype),
                       PaCAConfig(r=r, paca_alpha=16, target_modules=["proj"]))
    layer = model.proj
    with torch.no_grad():
        layer.delta.copy_(randn(out_features, r, seed=5, dtype=layer.delta.dtype) * 0.3)
    return layer


def _dense_reference(layer, w0, x):
    """float64 autograd on the merged weight W0 with W0[:, idx] + scaling * delta (independent of the layer)."""
    idx = layer.indices.long()
    delta = layer.delta.detach().double().clone().requires_grad_(True)
    w = w0.double().clone()
    w[:, idx] = w0.double()[:, idx] + layer.scaling * delta
    xr = x.detach().double().clone().requires_grad_(True)
    y = xr @ w.t() + layer.bias.detach().double()
    return y, xr, delta


@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64)], ids=["2d", "3d"])
def test_substituted_weight_uses_the_correction_exactly(shape):
    """``functional_call`` with another weight tensor (as an engine's gathered copy): the output and both gradients
    are those of the merged weight, whatever the substitute holds in the selected columns, and the substitute is
    not written (the old dense path read those columns as if they were merged)."""
    layer = _trained_layer()
    w0 = layer.base_weight()
    idx = layer.indices.long()
    substitute = w0.clone()
    substitute[:, idx] = randn(24, 8, seed=9)  # stale / foreign columns: the correction must not depend on them
    before = substitute.clone()
    x = randn(*shape, seed=2).requires_grad_(True)
    y = torch.func.functional_call(layer, {"weight": substitute}, (x,))
    y_ref, x_ref, delta_ref = _dense_reference(layer, w0, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = randn(*y.shape, seed=3)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta.grad, delta_ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(substitute, before)


def test_correction_saves_only_the_selected_inputs():
    """Saved for backward on the correction path: ``x[..., idx]`` and ``D`` (``out x r``) besides the weight the
    engine owns; no copy of the weight and not the whole input (functional_paca keeps both)."""
    layer = _trained_layer(dtype=torch.float32, in_features=256, out_features=96, r=8)
    substitute = layer.base_weight().clone()
    x = torch.randn(4, 32, 256, requires_grad=True)
    own = [substitute, *layer.parameters(), *layer.buffers()]
    got = saved_bytes(lambda: torch.func.functional_call(layer, {"weight": substitute}, (x,)), exclude=own)
    assert got == (4 * 32 * 8 + 96 * 8) * 4  # x_sel (float32) + D (float32)


def test_correction_under_bf16_autocast_close_to_float64():
    """bf16 autocast (what Gaudi runs): both GEMMs in bf16, so the output carries bf16 rounding: within 1e-2
    relative of the float64 merged weight (bf16 has an 8-bit mantissa, 2^-8 = 3.9e-3 per rounding; the sum over 64
    products and the rank-r term add a few such roundings). ``delta.grad`` stays float32."""
    layer = _trained_layer(dtype=torch.float32)
    w0 = layer.base_weight()
    substitute = w0.clone()
    x = randn(6, 64, seed=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.func.functional_call(layer, {"weight": substitute}, (x,))
    y.float().sum().backward()
    y_ref, _, _ = _dense_reference(layer, w0, x)
    assert y.dtype == torch.bfloat16 and layer.delta.grad.dtype == torch.float32
    assert float((y.double() - y_ref).norm() / y_ref.norm()) < 1e-2


def test_sharded_weight_is_refused_where_the_whole_weight_is_needed():
    """A layer whose weight an engine turned into a flat shard (FSDP1 outside forward) never gets columns written
    into it (sync is a no-op there), and what needs the whole weight says so; apply_paca on such a model too."""
    layer = _trained_layer(dtype=torch.float32)
    layer.weight.data = layer.weight.data.flatten()[:100].clone()  # what FSDP1 leaves on a rank outside forward
    shard = layer.weight.detach().clone()
    assert not layer.owns_weight()
    layer.sync()
    assert torch.equal(layer.weight.detach(), shard)
    with pytest.raises(RuntimeError, match="partitioned by a sharding engine.*before wrapping"):
        layer.set_indices(torch.arange(8))
    with pytest.raises(RuntimeError, match="partitioned"):
        layer.base_weight()

    model = OneLayer(64, 24, dtype=torch.float32)
    model.proj.weight.data = model.proj.weight.data.flatten()[:100].clone()
    with pytest.raises(ValueError, match="shard.*before wrapping it with FSDP"):
        apply_paca(model, PaCAConfig(r=8, target_modules=["proj"]))


def test_a_copy_owns_its_own_weight():
    """``deepcopy`` / pickling drop the reference to the owned weight and the copy claims its own: it keeps the
    dense path (merged columns written into its weight after a step), the original is untouched."""
    layer = _trained_layer(dtype=torch.float32)
    clone = copy.deepcopy(layer)
    assert clone.owns_weight() and clone._dense_weight() is clone.weight
    opt = torch.optim.SGD([clone.delta], lr=0.5)
    clone(randn(3, 64, seed=1, dtype=torch.float32)).sum().backward()
    opt.step()
    idx = clone.indices.long()
    torch.testing.assert_close(clone.weight[:, idx], clone.merged_columns(), rtol=0, atol=0)
    assert not torch.equal(clone.weight, layer.weight)
    assert isinstance(clone.weight, nn.Parameter)
