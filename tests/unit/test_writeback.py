"""paca_hpu.writeback: every trigger of the write-back runs the one installed write-back (issue 21 item 4), and the
candidates of paca_hpu.experimental switch through the public extension points with the default path's results.

The reference for every merged weight is independent of the layer: the base columns captured before conversion,
plus ``scaling * delta``, in float64, rounded once to float32 (what the layer must hold bit for bit)."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from helpers import ZeroStyleOptimizer, random_ids, tiny_llama

from paca_hpu import PaCAConfig, apply_paca, experimental, paca_layers, paca_parameters, sync_paca, writeback
from paca_hpu.hpu_graphs import check_replayable
from paca_hpu.layer import delta_gradient, delta_gradient_in_use, set_delta_gradient


def _model():
    base = tiny_llama()
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))}
    model = apply_paca(base, PaCAConfig(r=4, paca_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    return model, w0


def _reference(w0, layer):
    """``W0`` with ``W0[:, idx] + scaling * delta`` (float64 sum of the captured base weight, one rounding)."""
    idx = layer.indices.long()
    w = w0.clone()
    w[:, idx] = (w0[:, idx].double() + layer.scaling * layer.delta.detach().double()).float()
    return w


def _assert_current(model, w0):
    for name, layer in paca_layers(model):
        assert torch.equal(layer.weight.detach(), _reference(w0[name], layer)), name
        assert not layer.is_stale(), name


@pytest.fixture
def observed():
    """The write-back every trigger runs, replaced by one that records the layers it is given (then runs the
    default), through the public extension point; the previous one is restored afterwards."""
    calls = []

    def recording(layers):
        calls.append(list(layers))
        writeback.per_layer(layers)

    before = writeback.set_write_back(recording)
    yield calls
    assert writeback.set_write_back(before) is recording


def _edit_delta(layer, value):
    with torch.no_grad():
        layer.delta.fill_(value)  # outside an optimizer step: the layer is stale now


def test_every_trigger_runs_the_installed_write_back(observed):
    model, w0 = _model()
    layers = [layer for _, layer in paca_layers(model)]
    ids = random_ids(2, 8)
    opt = torch.optim.AdamW(paca_parameters(model), lr=1e-2)

    # 1. after an optimizer step: the stepped layers, in the optimizer's parameter order, once
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert observed == [layers]
    _assert_current(model, w0)

    # 2. the forward staleness test: only the layer whose delta changed, before its forward
    observed.clear()
    _edit_delta(layers[1], 0.25)
    model(input_ids=ids)
    assert observed == [[layers[1]]]
    _assert_current(model, w0)

    # 3. the state-dict pre-hook: a saved weight is current
    observed.clear()
    _edit_delta(layers[2], -0.5)
    sd = model.state_dict()
    assert observed == [[layers[2]]]
    name = [n for n, lay in paca_layers(model) if lay is layers[2]][0]
    assert torch.equal(sd[name + ".weight"], _reference(w0[name], layers[2]))

    # 4. before an HPU graph captures a training forward (checked in Python)
    observed.clear()
    layers[0].delta.data.mul_(3.0)  # a write through .data (LOMO, DeepSpeed): no version bump, noted by PaCADelta
    check_replayable(model, list(paca_layers(model)))
    assert observed == [[layers[0]]]

    # 5. sync_paca: every dense layer of the model, in module order, in one call
    observed.clear()
    _edit_delta(layers[3], 1.0)
    sync_paca(model)
    assert observed == [layers]
    _assert_current(model, w0)


def test_the_trainer_callback_writes_back_through_the_module_after_a_step_the_hook_cannot_see(observed):
    """A ZeRO-style optimizer (a master copy stepped by an inner torch optimizer, copied back) fires the global hook
    for the inner optimizer only: :func:`writeback.hook_covers` says so, and the trainer's callback writes back."""
    from paca_hpu.trainer import _WriteBackGuard

    model, w0 = _model()
    layers = [layer for _, layer in paca_layers(model)]
    ids = random_ids(2, 8)
    zero = ZeroStyleOptimizer(model.parameters(), lr=1e-2, inner=torch.optim.SGD)
    plain = torch.optim.SGD(paca_parameters(model), lr=1e-2)
    assert not writeback.hook_covers(zero, model) and writeback.hook_covers(plain, model)
    assert writeback.hook_covers(zero, tiny_llama())  # no PaCA layer: nothing to write back
    guard = _WriteBackGuard(types.SimpleNamespace(model=model, optimizer=zero))
    model(input_ids=ids, labels=ids).loss.backward()
    zero.step()
    assert observed == []  # the hook saw no delta
    guard.on_optimizer_step(None, None, None)
    assert guard._needed is True and observed == [layers]
    _assert_current(model, w0)
    assert torch.count_nonzero(layers[0].delta) > 0


def test_set_write_back_refuses_what_is_not_callable_and_none_restores_the_default():
    with pytest.raises(TypeError, match="set_write_back expects a callable"):
        writeback.set_write_back("fused")
    with pytest.raises(TypeError, match="set_delta_gradient expects a callable"):
        set_delta_gradient(3)
    assert writeback.write_back_in_use() is writeback.per_layer and delta_gradient_in_use() is delta_gradient
    before = writeback.set_write_back(None)
    assert before is writeback.per_layer and writeback.write_back_in_use() is writeback.per_layer


def _train(model, ids, steps=2):
    """Optimizer steps, then a delta edited outside a step (forward refresh) and a state dict."""
    opt = torch.optim.AdamW(paca_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    _edit_delta(next(layer for _, layer in paca_layers(model)), 0.125)
    losses.append(model(input_ids=ids, labels=ids).loss.detach())
    return losses, model.state_dict()


@pytest.mark.parametrize("name", ["fused_writeback", "bf16_delta_grad"])
def test_candidates_switch_through_the_extension_points_and_match_the_default(name):
    """On a float32 model both candidates are bit-identical to the default (``bf16_delta_grad`` falls back to it for
    float32 inputs); while on, the extension point holds the candidate, and the default again after."""
    model, w0 = _model()
    ids = random_ids(2, 8)
    copy_ = copy.deepcopy(model)
    default_losses, default_sd = _train(model, ids)
    in_use = {"fused_writeback": writeback.write_back_in_use, "bf16_delta_grad": delta_gradient_in_use}[name]
    candidate_fn = {"fused_writeback": experimental.fused_write_back,
                    "bf16_delta_grad": experimental.lowp_delta_gradient}[name]
    with experimental.candidate(name):
        assert in_use() is candidate_fn
        losses, sd = _train(copy_, ids)
    assert in_use() is {"fused_writeback": writeback.per_layer, "bf16_delta_grad": delta_gradient}[name]
    assert all(torch.equal(a, b) for a, b in zip(losses, default_losses))
    assert sd.keys() == default_sd.keys()
    assert all(torch.equal(sd[k], default_sd[k]) for k in sd)
    _assert_current(copy_, w0)
