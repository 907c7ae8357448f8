"""The candidate speed-ups of ``paca_hpu.experimental`` compute what the default path computes.

Every candidate is compared with the default path on the same model and data (bit for bit where the candidate
claims it) and with an independent float64 dense reference: merged weights ``W0[:, idx] + scaling * delta``,
outputs ``x @ W.T``, ``grad_delta = scaling * grad_y^T x[:, idx]``. The candidates are off by default and switched
back off after every test.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import random_ids, tiny_llama

from paca_hpu import PaCAConfig, apply_paca, paca_layers, paca_parameters
from paca_hpu import experimental
from paca_hpu.layer import PaCALinear

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _candidates_off():
    for name in experimental.CANDIDATES:
        experimental.disable(name)
    yield
    for name in experimental.CANDIDATES:
        experimental.disable(name)


def _paca_model(dtype, seed=0, r=4):
    base = tiny_llama(seed=seed, dtype=dtype)
    base.train()
    return apply_paca(copy.deepcopy(base), PaCAConfig(r=r, paca_alpha=8))


def _randomise_deltas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in paca_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g, dtype=torch.float64) * 0.05)


def _dense_merged_reference(layer: PaCALinear) -> torch.Tensor:
    """float64 ``W0`` with ``W0[:, idx] += scaling * delta``."""
    w = layer.base_weight().double()
    idx = layer.indices.long()
    w[:, idx] += layer.scaling * layer.delta.detach().double()
    return w


def _step_and_weights(model, ids, lr=1e-2):
    opt = torch.optim.AdamW(paca_parameters(model), lr=lr)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return {n: layer.weight.detach().clone() for n, layer in paca_layers(model)}


def test_switches_and_unknown_name():
    assert not any(experimental.enabled(n) for n in experimental.CANDIDATES)
    with experimental.candidate("fused_writeback"):
        assert experimental.enabled("fused_writeback")
        with experimental.candidate("fused_writeback", on=False):
            assert not experimental.enabled("fused_writeback")
        assert experimental.enabled("fused_writeback")
    assert not experimental.enabled("fused_writeback")
    with pytest.raises(ValueError, match="unknown candidate 'nope'.*fused_writeback"):
        experimental.enable("nope")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_write_back_is_bit_identical_and_matches_float64(dtype):
    ids = random_ids(2, 8)
    models = {}
    for arm in ("per_layer", "fused"):
        model = _paca_model(dtype)
        _randomise_deltas(model)
        with experimental.candidate("fused_writeback", on=(arm == "fused")):
            models[arm] = (model, _step_and_weights(model, ids))
    (m_old, w_old), (m_new, w_new) = models["per_layer"], models["fused"]
    assert w_old.keys() == w_new.keys() and len(w_old) == 14
    for name in w_old:
        assert torch.equal(w_old[name], w_new[name]), name
    eps = torch.finfo(dtype).eps
    for (name, layer), (_, old_layer) in zip(paca_layers(m_new), paca_layers(m_old)):
        assert torch.equal(layer.delta, old_layer.delta), name
        ref = _dense_merged_reference(layer)
        torch.testing.assert_close(layer.weight.double(), ref, rtol=eps, atol=eps * ref.abs().max().item(), msg=name)
        assert not layer.is_stale()  # the fused write-back noted the delta version it reflects


def test_fused_write_back_covers_every_stepped_layer_and_only_those():
    model = _paca_model(torch.float32)
    layers = [layer for _, layer in paca_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.delta.fill_(0.5)
    before = {id(layer): layer.weight.detach().clone() for layer in layers}
    experimental.fused_write_back(layers[:3])
    for i, layer in enumerate(layers):
        changed = not torch.equal(layer.weight, before[id(layer)])
        assert changed == (i < 3)
        if i < 3:
            torch.testing.assert_close(layer.weight.double(), _dense_merged_reference(layer))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lean_forward_is_bit_identical_and_matches_float64(dtype):
    ids = random_ids(2, 8)
    out = {}
    for arm in ("default", "lean"):
        model = _paca_model(dtype, seed=1)
        _randomise_deltas(model, seed=1)
        with experimental.candidate("lean_forward", on=(arm == "lean")):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        out[arm] = (loss.detach(), {n: layer.delta.grad.clone() for n, layer in paca_layers(model)}, model)
    assert torch.equal(out["default"][0], out["lean"][0])
    for n, g in out["default"][1].items():
        assert torch.equal(g, out["lean"][1][n]), n
    # float64 dense reference of one layer's forward and delta gradient through the lean path
    layer = next(layer for _, layer in paca_layers(out["lean"][2]))
    x = torch.randn(2, 5, layer.in_features, dtype=dtype)
    gy = torch.randn(2, 5, layer.out_features, dtype=dtype)
    layer.delta.grad = None
    with experimental.candidate("lean_forward"):
        y = layer(x)
        y.backward(gy)
    w = _dense_merged_reference(layer)
    eps = torch.finfo(dtype).eps
    y_ref = x.double() @ w.T
    torch.testing.assert_close(y.double(), y_ref, rtol=64 * eps, atol=64 * eps * y_ref.abs().max().item())
    g_ref = layer.scaling * gy.double().reshape(-1, layer.out_features).T @ x.double().reshape(
        -1, layer.in_features)[:, layer.indices.long()]
    torch.testing.assert_close(layer.delta.grad.double(), g_ref, rtol=64 * eps,
                               atol=64 * eps * g_ref.abs().max().item())


def test_lean_forward_takes_the_default_path_where_it_does_not_apply():
    layer = next(layer for _, layer in paca_layers(_paca_model(torch.float32)))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer.delta.fill_(0.25)
    with experimental.candidate("lean_forward"):
        y_lean = {"autocast": None}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_lean["autocast"] = layer(x)
        layer._paca_enabled = False
        y_lean["disabled"] = layer(x)
        layer._paca_enabled = True
    y_def = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_def["autocast"] = layer(x)
    layer._paca_enabled = False
    y_def["disabled"] = layer(x)
    layer._paca_enabled = True
    assert y_lean["autocast"].dtype == torch.bfloat16 and torch.equal(y_lean["autocast"], y_def["autocast"])
    torch.testing.assert_close(y_lean["disabled"], x @ layer.base_weight().T)  # the base output
    assert torch.equal(y_lean["disabled"], y_def["disabled"])


def test_bf16_delta_grad_leaves_fp32_exact_and_is_within_bf16_rounding():
    layer32 = next(layer for _, layer in paca_layers(_paca_model(torch.float32)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, layer32.in_features, generator=g)
    gy = torch.randn(4, 16, layer32.out_features, generator=g)
    xs = x.index_select(-1, layer32.indices)
    from paca_hpu import layer as layer_mod  # the backward's extension point: delta_gradient_in_use

    default = layer_mod.delta_gradient(gy, xs, 2.0)
    with experimental.candidate("bf16_delta_grad"):
        in_use = layer_mod.delta_gradient_in_use()
        assert torch.equal(in_use(gy, xs, 2.0), default)  # float32 inputs: unchanged
        low3 = in_use(gy.bfloat16(), xs.bfloat16(), 2.0)
        low2 = in_use(gy.bfloat16().reshape(-1, gy.shape[-1]), xs.bfloat16().reshape(-1, xs.shape[-1]), 2.0)
    assert layer_mod.delta_gradient_in_use() is layer_mod.delta_gradient
    ref = 2.0 * gy.bfloat16().double().reshape(-1, gy.shape[-1]).T @ xs.bfloat16().double().reshape(-1, xs.shape[-1])
    for got in (low3, low2):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert 0 < err < 2 ** -7  # bf16 rounding of the partial products, nothing worse
    err_default = (layer_mod.delta_gradient(gy.bfloat16(), xs.bfloat16(), 2.0).double() - ref).abs().max()
    assert err_default / ref.abs().max() < 1e-6  # the default keeps float32 accuracy


def test_bf16_delta_grad_in_a_bf16_model_trains_like_the_default():
    ids = random_ids(2, 8)
    grads = {}
    for arm in ("default", "lowp"):
        model = _paca_model(torch.bfloat16, seed=2)
        _randomise_deltas(model, seed=2)
        with experimental.candidate("bf16_delta_grad", on=(arm == "lowp")):
            model(input_ids=ids, labels=ids).loss.backward()
        grads[arm] = {n: layer.delta.grad.clone() for n, layer in paca_layers(model)}
    for n, g in grads["default"].items():
        assert grads["lowp"][n].dtype == torch.float32
        torch.testing.assert_close(grads["lowp"][n], g, rtol=2e-2, atol=2e-2 * g.abs().max().item(), msg=n)


def test_compiled_decoder_layers_match_eager_and_see_the_write_back():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = _paca_model(torch.float32, seed=4)
    model = _paca_model(torch.float32, seed=4)
    counter = CompileCounterWithBackend("aot_eager")
    use_compiled = experimental.compile_decoder_layers(model, backend=counter)
    layers = experimental.decoder_layers(model)
    originals = list(layers)
    use_compiled(True)
    assert all(a is not b for a, b in zip(layers, originals))
    opts = [torch.optim.AdamW(paca_parameters(m), lr=1e-2) for m in (eager, model)]
    for step in range(3):
        ids = random_ids(2, 8, seed=20 + step)
        losses = []
        for m, opt in zip((eager, model), opts):
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)  # step > 0: sees the write-back
    assert 1 <= counter.frame_count <= len(originals)  # compiled, not silently eager
    use_compiled(False)
    assert all(a is b for a, b in zip(layers, originals))
    for (n, a), (_, b) in zip(paca_layers(eager), paca_layers(model)):
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-4, atol=1e-6, msg=n)
    torch._dynamo.reset()


def test_decoder_layers_of_a_model_without_them_is_refused():
    with pytest.raises(ValueError, match="no decoder-layer ModuleList"):
        experimental.decoder_layers(torch.nn.Linear(2, 2))


def test_lean_function_refuses_double_backward():
    layer = next(layer for _, layer in paca_layers(_paca_model(torch.float32)))
    x = torch.randn(2, layer.in_features, requires_grad=True)
    with experimental.candidate("lean_forward"):
        y = layer(x)
        with pytest.raises(RuntimeError, match="functional_paca"):
            torch.autograd.grad(y.sum(), x, create_graph=True)


def test_candidates_never_write_into_a_weight_the_layer_does_not_own():
    """A weight the layer does not own (an engine's gathered copy; here one substituted by functional_call) takes
    the rank-r correction path under lean_forward too, and the fused write-back leaves such a weight alone; the
    output equals a float64 dense reference either way."""
    torch.manual_seed(0)
    w0 = torch.randn(16, 12, dtype=torch.float64)
    layer = PaCALinear(w0.float().clone(), None, torch.tensor([1, 4, 7]), 2.0)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(16, 3))
    gathered = w0.float().clone()  # base columns only, as an engine's gathered weight would hold
    x = torch.randn(5, 12)
    ref = x.double() @ (w0.index_add(1, torch.tensor([1, 4, 7]), 2.0 * layer.delta.detach().double())).T
    with experimental.candidate("lean_forward"), experimental.candidate("fused_writeback"):
        y = torch.func.functional_call(layer, {"weight": gathered}, (x,))
        experimental.fused_write_back([layer])  # the layer owns its own weight: written
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert torch.equal(gathered, w0.float())  # never written
    assert torch.allclose(layer.weight[:, [1, 4, 7]].double(), ref.new_tensor(
        (w0[:, [1, 4, 7]] + 2.0 * layer.delta.detach().double()).numpy()), atol=1e-6)
