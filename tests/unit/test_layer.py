"""Single-layer tests of PaCALinear (nn.Linear and transformers Conv1D), written from the spec.

Every numeric check is against an independent dense reference (a plain nn.Linear / Conv1D copy of
the base layer, or an explicit float64 formula), never against the implementation's own output.
"""
import copy

import pytest
import torch
from torch import nn

from helpers import OneConv1D, OneLayer, dense_weight, dense_weight_grad, max_rel_err, randn, saved_bytes

from paca_hpu import PaCAConfig, PaCALinear, apply_paca, sync_paca


def _adapt(module, r=8, alpha=16, **kw):
    base = copy.deepcopy(module)
    model = apply_paca(module, PaCAConfig(r=r, paca_alpha=alpha, target_modules=["proj"], **kw))
    return base, model


def _delta_tol(delta):
    # delta is float32 by spec; if the implementation keeps float64 deltas in a float64 model we
    # can be much stricter.
    if delta.dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# construction / attributes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_attributes_linear(bias):
    base, model = _adapt(OneLayer(64, 24, bias=bias, dtype=torch.float32), r=8, alpha=12)
    layer = model.proj
    assert isinstance(layer, PaCALinear)
    assert isinstance(layer, nn.Module)
    assert (layer.in_features, layer.out_features, layer.r) == (64, 24, 8)
    assert isinstance(layer.scaling, float) and layer.scaling == 12 / 8
    # weight: frozen, nn.Linear layout, bit-for-bit the base weight at start
    assert layer.weight.shape == (24, 64)
    assert not layer.weight.requires_grad
    assert torch.equal(layer.weight, base.proj.weight)
    if bias:
        assert layer.bias is not None and not layer.bias.requires_grad
        assert torch.equal(layer.bias, base.proj.bias)
    else:
        assert layer.bias is None
    # indices: a buffer, shape (r,), unique, sorted, in range, integer
    buffers = dict(layer.named_buffers())
    assert "indices" in buffers and buffers["indices"] is layer.indices
    idx = layer.indices
    assert idx.shape == (8,)
    assert not idx.is_floating_point()
    assert torch.equal(idx, torch.sort(idx).values)
    assert torch.unique(idx).numel() == 8
    assert int(idx.min()) >= 0 and int(idx.max()) < 64
    # delta: trainable float32 Parameter of zeros, (out, r)
    assert isinstance(layer.delta, nn.Parameter)
    assert layer.delta.requires_grad
    assert layer.delta.dtype == torch.float32
    assert layer.delta.shape == (24, 8)
    assert torch.count_nonzero(layer.delta) == 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["proj.delta"]


def test_attributes_conv1d():
    base, model = _adapt(OneConv1D(40, 24, dtype=torch.float32), r=4, alpha=8)
    layer = model.proj
    assert isinstance(layer, PaCALinear)
    assert (layer.in_features, layer.out_features, layer.r) == (40, 24, 4)
    # Conv1D stores (in, out); PaCALinear stores nn.Linear layout (out, in)
    assert layer.weight.shape == (24, 40)
    assert torch.equal(layer.weight, base.proj.weight.t())
    assert torch.equal(layer.bias, base.proj.bias)
    assert layer.delta.shape == (24, 4) and layer.delta.dtype == torch.float32
    assert int(layer.indices.max()) < 40


# ------------------------------------------------------------------------------------------
# gradients against the dense layer (float64, any input rank)
# ------------------------------------------------------------------------------------------

SHAPES = [(64,), (5, 64), (3, 5, 64), (2, 3, 4, 64)]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_grads_match_dense(kind, shape):
    module = OneLayer(64, 24, dtype=torch.float64) if kind == "linear" else OneConv1D(64, 24)
    base, model = _adapt(module, r=8, alpha=12)
    layer = model.proj
    idx = layer.indices.long()

    x = randn(*shape, seed=3)
    x_p = x.clone().requires_grad_(True)
    x_b = x.clone().requires_grad_(True)
    y_p = model(x_p)
    y_b = base(x_b)
    assert y_p.shape == y_b.shape == (*shape[:-1], 24)
    torch.testing.assert_close(y_p, y_b, rtol=1e-12, atol=1e-12)

    g = randn(*y_b.shape, seed=4)
    y_p.backward(g)
    y_b.backward(g)

    expected = layer.scaling * dense_weight_grad(base.proj)[:, idx]
    assert layer.delta.grad is not None
    assert layer.delta.grad.dtype == layer.delta.dtype
    torch.testing.assert_close(layer.delta.grad.double(), expected, **_delta_tol(layer.delta))
    # input gradient is the dense one (computed with the full merged weight)
    torch.testing.assert_close(x_p.grad, x_b.grad, rtol=1e-12, atol=1e-12)
    # nothing else gets a gradient
    assert layer.weight.grad is None
    assert layer.bias is None or layer.bias.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_grads_match_dense_with_nonzero_delta(kind):
    """After a (manual) update + sync, forward and grads match a dense layer holding W0 + s*delta."""
    module = OneLayer(64, 24, dtype=torch.float64) if kind == "linear" else OneConv1D(64, 24)
    base, model = _adapt(module, r=8, alpha=12)
    layer = model.proj
    idx = layer.indices.long()
    with torch.no_grad():
        layer.delta.copy_(randn(24, 8, seed=9, dtype=layer.delta.dtype))
    sync_paca(model)

    dense = copy.deepcopy(base)
    with torch.no_grad():
        w = dense_weight(dense.proj)
        w[:, idx] += layer.scaling * layer.delta.double()

    x = randn(3, 7, 64, seed=5)
    x_p = x.clone().requires_grad_(True)
    x_d = x.clone().requires_grad_(True)
    y_p, y_d = model(x_p), dense(x_d)
    torch.testing.assert_close(y_p, y_d, rtol=1e-9, atol=1e-9)
    g = randn(*y_d.shape, seed=6)
    y_p.backward(g)
    y_d.backward(g)
    torch.testing.assert_close(layer.delta.grad.double(), layer.scaling * dense_weight_grad(dense.proj)[:, idx],
                               **_delta_tol(layer.delta))
    torch.testing.assert_close(x_p.grad, x_d.grad, rtol=1e-9, atol=1e-9)


def test_repeated_backward_accumulates_and_never_touches_weight():
    base, model = _adapt(OneLayer(32, 16, dtype=torch.float64), r=4, alpha=4)
    layer = model.proj
    w0 = layer.weight.detach().clone()
    x = randn(6, 32, seed=1)
    g = randn(6, 16, seed=2)
    model(x).backward(g)
    first = layer.delta.grad.clone()
    for _ in range(2):
        model(x).backward(g)
    torch.testing.assert_close(layer.delta.grad, 3 * first, rtol=1e-6, atol=1e-7)
    assert torch.equal(layer.weight, w0)  # no optimizer step -> weight untouched


# ------------------------------------------------------------------------------------------
# memory: only x[..., idx] is saved
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_requires_grad", [True, False])
@pytest.mark.parametrize("shape", [(64, 64), (4, 16, 64)], ids=["2d", "3d"])
def test_saved_bytes_are_r_over_in_of_plain_linear(shape, x_requires_grad):
    in_f, out_f, r = 64, 32, 8
    _, model = _adapt(OneLayer(in_f, out_f, bias=False, dtype=torch.float32), r=r, alpha=16)
    plain = OneLayer(in_f, out_f, bias=False, dtype=torch.float32).proj  # trainable weight

    x = torch.randn(*shape).requires_grad_(x_requires_grad)
    plain_bytes = saved_bytes(lambda: plain(x), exclude=list(plain.parameters()))
    paca_bytes = saved_bytes(lambda: model(x),
                             exclude=list(model.parameters()) + list(model.buffers()))
    # sanity of the reference: the plain linear keeps x (for grad_W)
    assert plain_bytes == x.numel() * x.element_size()
    assert paca_bytes == plain_bytes * r // in_f, (paca_bytes, plain_bytes)


# ------------------------------------------------------------------------------------------
# bf16 / autocast
# ------------------------------------------------------------------------------------------

def test_bf16_layer_delta_grad_is_float32_accumulated():
    _, model = _adapt(OneLayer(64, 32, dtype=torch.bfloat16), r=8, alpha=16)
    layer = model.proj
    assert layer.weight.dtype == torch.bfloat16
    assert layer.delta.dtype == torch.float32
    x = randn(2048, 64, seed=1, dtype=torch.bfloat16)
    g = randn(2048, 32, seed=2, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    assert layer.delta.grad.dtype == torch.float32
    idx = layer.indices.long()
    ref = layer.scaling * (g.double().t() @ x.double()[:, idx])  # exact products of the bf16 values
    err = max_rel_err(layer.delta.grad, ref)
    # float32 accumulation gives ~1e-7; a bf16 GEMM rounded to bf16 gives ~1e-3
    assert err < 1e-4, err


def test_autocast_cpu_bf16():
    base, model = _adapt(OneLayer(64, 32, dtype=torch.float32), r=8, alpha=16)
    layer = model.proj
    x = randn(16, 64, seed=1, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = base(x)
        y = model(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    g = randn(16, 32, seed=2, dtype=torch.bfloat16)
    y.backward(g)
    assert layer.delta.grad.dtype == torch.float32
    idx = layer.indices.long()
    ref = layer.scaling * (g.double().t() @ x.bfloat16().double()[:, idx])
    assert max_rel_err(layer.delta.grad, ref) < 2e-2


# ------------------------------------------------------------------------------------------
# write-back after optimizer.step() and via sync_paca
# ------------------------------------------------------------------------------------------

def _optimizers():
    opts = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
        "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    }
    return opts


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("opt_name", list(_optimizers()))
def test_write_back_after_optimizer_step(opt_name, kind):
    module = OneLayer(48, 20, dtype=torch.float32) if kind == "linear" else OneConv1D(48, 20, dtype=torch.float32)
    base, model = _adapt(module, r=8, alpha=16)  # scaling 2.0: exact in float32
    layer = model.proj
    idx = layer.indices.long()
    w0 = dense_weight(base.proj).detach().clone()
    others = torch.ones(48, dtype=torch.bool)
    others[idx] = False
    try:
        opt = _optimizers()[opt_name]([p for p in model.parameters() if p.requires_grad])
    except (RuntimeError, TypeError, ValueError) as e:  # e.g. fused not available
        pytest.skip(f"{opt_name} unavailable on CPU: {e}")

    for step in range(3):
        x = randn(4, 48, seed=10 + step, dtype=torch.float32)
        g = randn(4, 20, seed=20 + step, dtype=torch.float32)
        opt.zero_grad()
        (model(x) * g).sum().backward()
        opt.step()
        assert torch.count_nonzero(layer.delta) > 0
        expected = w0[:, idx] + layer.scaling * layer.delta.detach()
        assert torch.equal(layer.weight[:, idx], expected), f"step {step}"
        assert torch.equal(layer.weight[:, others], w0[:, others])
        if layer.bias is not None:
            assert torch.equal(layer.bias, base.proj.bias)
        # the forward after the step uses the updated weight
        y = model(x)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
        w_dense = w0.clone()
        w_dense[:, idx] += layer.scaling * layer.delta.detach()
        torch.testing.assert_close(y.double(), torch.nn.functional.linear(
            x.double(), w_dense.double(), None if layer.bias is None else layer.bias.double()),
            rtol=1e-5, atol=1e-5)


def test_write_back_non_power_of_two_scaling():
    base, model = _adapt(OneLayer(48, 20, dtype=torch.float32), r=3, alpha=5)
    layer = model.proj
    assert layer.scaling == pytest.approx(5 / 3)
    idx = layer.indices.long()
    w0 = base.proj.weight.detach().clone()
    opt = torch.optim.AdamW([layer.delta], lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        (model(randn(4, 48, seed=step, dtype=torch.float32)) ** 2).sum().backward()
        opt.step()
    expected = w0[:, idx].double() + (5 / 3) * layer.delta.detach().double()
    torch.testing.assert_close(layer.weight[:, idx].double(), expected, rtol=1e-6, atol=1e-7)
    mask = torch.ones(48, dtype=torch.bool)
    mask[idx] = False
    assert torch.equal(layer.weight[:, mask], w0[:, mask])


def test_sync_paca_on_demand():
    base, model = _adapt(OneLayer(48, 20, dtype=torch.float32), r=8, alpha=16)
    layer = model.proj
    idx = layer.indices.long()
    w0 = base.proj.weight.detach().clone()
    new_delta = randn(20, 8, seed=7, dtype=torch.float32)
    with torch.no_grad():
        layer.delta.copy_(new_delta)
    sync_paca(model)
    assert torch.equal(layer.weight[:, idx], w0[:, idx] + 2.0 * new_delta)
    # idempotent: a second sync does not add the delta twice
    sync_paca(model)
    assert torch.equal(layer.weight[:, idx], w0[:, idx] + 2.0 * new_delta)
    mask = torch.ones(48, dtype=torch.bool)
    mask[idx] = False
    assert torch.equal(layer.weight[:, mask], w0[:, mask])


def test_step_write_back_is_idempotent_across_steps_without_grad():
    """A step of an optimizer that has no grads must not re-add delta (write-back is absolute)."""
    base, model = _adapt(OneLayer(48, 20, dtype=torch.float32), r=8, alpha=16)
    layer = model.proj
    idx = layer.indices.long()
    w0 = base.proj.weight.detach().clone()
    opt = torch.optim.SGD([layer.delta], lr=0.1)
    (model(randn(4, 48, seed=1, dtype=torch.float32)) ** 2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    opt.step()  # no grads: delta unchanged
    opt.step()
    assert torch.equal(layer.weight[:, idx], w0[:, idx] + 2.0 * layer.delta.detach())


@pytest.mark.parametrize("how", ["deepcopy", "torch_save_load"])
def test_write_back_survives_copying_the_adapted_model(how):
    """A copy of an adapted model (copy.deepcopy, torch.save/torch.load) must still get its write-back after
    optimizer.step(): the spec requires it after ANY step with no call needed from the user."""
    import io

    base, model = _adapt(OneLayer(48, 20, dtype=torch.float32), r=8, alpha=16)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    layer = clone.proj
    idx = layer.indices.long()
    w0 = base.proj.weight.detach().clone()
    opt = torch.optim.SGD([layer.delta], lr=0.1)
    (clone(randn(4, 48, seed=1, dtype=torch.float32)) ** 2).sum().backward()
    opt.step()
    assert torch.count_nonzero(layer.delta) > 0
    assert torch.equal(layer.weight[:, idx], w0[:, idx] + 2.0 * layer.delta.detach())
    # and the original model is untouched by the copy's step
    assert torch.equal(model.proj.weight, w0)


def test_whole_model_cast_keeps_delta_values_and_training_continues(tmp_path):
    """Issue 23 item 4: ``model.to(torch.bfloat16)`` (a Trainer's ``bf16_full_eval``) let nn.Module cast ``delta`` to
    bf16, and the layer cast it back: float32 again, but rounded in every layer, and saved rounded. The deltas and
    their gradients now keep their exact values (same Parameter objects), the adapter saved after the cast holds
    them, and the next optimizer step equals that of a model cast to bf16 before PaCA was applied and given the
    deltas of before the cast."""
    from helpers import lm_loss, random_ids, tiny_llama
    from safetensors.torch import load_file

    from paca_hpu import paca_layers, save_adapter

    config = PaCAConfig(r=4, paca_alpha=8)
    base = tiny_llama(seed=0).train()
    model = apply_paca(copy.deepcopy(base), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = random_ids(2, 8, seed=3)
    for _ in range(2):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    lm_loss(model, ids).backward()  # a gradient is cast too
    before = {n: (layer.delta, layer.delta.detach().clone(), layer.delta.grad.clone()) for n, layer in
              paca_layers(model)}
    assert all(not torch.equal(d, d.bfloat16().float()) for _, d, _ in before.values())  # bf16 would round them

    model.to(torch.bfloat16)
    for n, layer in paca_layers(model):
        param, delta, grad = before[n]
        assert layer.weight.dtype == torch.bfloat16 and layer.delta is param, n
        assert layer.delta.dtype == layer.delta.grad.dtype == torch.float32, n
        assert torch.equal(layer.delta.detach(), delta) and torch.equal(layer.delta.grad, grad), n
    save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for n, (_, delta, _) in before.items():
        assert torch.equal(saved[f"{n}.delta"], delta), n

    ref = apply_paca(copy.deepcopy(base).to(torch.bfloat16), config)
    with torch.no_grad():
        for n, layer in paca_layers(ref):
            layer.delta.copy_(before[n][1])
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=2e-2)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: it would share the moment tensors
    opt.zero_grad()
    ids = random_ids(2, 8, seed=4)
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        m.loss_ = lm_loss(m, ids)
        m.loss_.backward()
        o.step()
    assert torch.equal(model.loss_, ref.loss_)
    for (n, a), (_, b) in zip(paca_layers(model), paca_layers(ref)):
        assert torch.equal(a.delta, b.delta) and torch.equal(a.weight, b.weight), n
        assert not torch.equal(a.delta.detach(), before[n][1]), n  # it trained


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_4bit_layer_cast_keeps_delta_values(cast):
    """Issue 23 item 4 for QPaCA: casting a ``PaCALinear4bit`` rounded its float32 ``delta`` (and gradient) the same
    way; they now keep their values, bit for bit."""
    pytest.importorskip("bitsandbytes")
    from test_quantized import _layer

    layer = _layer()
    with torch.no_grad():
        layer.delta.copy_(randn(*layer.delta.shape, seed=7, dtype=torch.float32) * 0.05)
    layer.delta.grad = randn(*layer.delta.shape, seed=8, dtype=torch.float32)
    delta, grad = layer.delta.detach().clone(), layer.delta.grad.clone()
    layer.to(torch.bfloat16) if cast == "bfloat16" else layer.half()
    assert layer.delta.dtype == layer.delta.grad.dtype == torch.float32
    assert torch.equal(layer.delta.detach(), delta) and torch.equal(layer.delta.grad, grad)
