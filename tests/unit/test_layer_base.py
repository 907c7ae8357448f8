"""The PaCA layer base (issue 21 item 5): every layer class implements :class:`paca_hpu.PaCALayerBase`, and the
model-level functions find every kind of layer through it -- dense, dense with a weight a sharding engine
partitioned, and bitsandbytes 4-bit -- with results checked against float64 references built from the base
weights (not from the layers' own bookkeeping)."""

import importlib

import pytest
import torch
from torch import nn

from helpers import OneLayer, randn

import paca_hpu
from paca_hpu import (PaCAConfig, PaCALayerBase, PaCALinear, PaCALinear4bit, apply_paca, disable_paca, merge_paca,
                      paca_layers, paca_parameters, select_indices, sync_paca, unload_paca)
from paca_hpu.layer.partitioned import PartitionableLayer


def test_every_layer_class_implements_the_base_interface():
    """Each concrete layer overrides every abstract method of the base itself, the sharded-weight path is a base
    too, and a class that leaves one out cannot be built. The old names stay importable where they were."""
    abstract = PaCALayerBase.__abstractmethods__
    assert {"forward", "sync", "restore_original", "merged_columns", "set_indices", "base_weight", "merged_layer",
            "unloaded"} <= abstract
    for cls in (PaCALinear, PaCALinear4bit):
        assert issubclass(cls, PaCALayerBase) and not cls.__abstractmethods__, cls
        inherited = [m for m in abstract if getattr(cls, m) is getattr(PaCALayerBase, m)]
        assert not inherited, (cls, inherited)
    assert issubclass(PaCALinear, PartitionableLayer) and issubclass(PartitionableLayer, PaCALayerBase)
    assert not issubclass(PaCALinear4bit, PartitionableLayer)  # a 4-bit weight is never written

    class ForwardOnly(PaCALayerBase):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="abstract.*unloaded"):
        ForwardOnly()

    assert importlib.import_module("paca_hpu.layer").PaCALinear is PaCALinear
    assert importlib.import_module("paca_hpu.quantized").PaCALinear4bit is PaCALinear4bit
    assert paca_hpu.PaCALayerBase is importlib.import_module("paca_hpu.layer.base").PaCALayerBase


class ThreeKinds(nn.Module):
    """``dense`` and ``sharded`` are float layers (``sharded`` gets its weight flattened into a shard after
    conversion, as FSDP1 leaves it outside forward); ``q4`` is a bitsandbytes NF4 layer."""

    def __init__(self, bnb, with_q4=True):
        super().__init__()
        self.dense = OneLayer(64, 24, seed=1, dtype=torch.float32).proj
        self.sharded = OneLayer(64, 24, seed=2, dtype=torch.float32).proj
        if with_q4:
            src = OneLayer(64, 32, seed=3, dtype=torch.float32).proj
            q = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
            q.load_state_dict(src.state_dict())
            self.q4 = q.to("cpu")


def _set_deltas(model):
    with torch.no_grad():
        for i, (_, layer) in enumerate(paca_layers(model)):
            layer.delta.copy_(randn(*layer.delta.shape, seed=10 + i, dtype=torch.float32) * 0.3)


def _merged64(w0, idx, scaling, delta):
    """float64 ``W0`` with ``W0[:, idx] + scaling * delta`` in the selected columns."""
    w = w0.double().clone()
    w[:, idx.long()] += scaling * delta.detach().double()
    return w


def test_callers_find_every_kind_through_the_base():
    """``paca_layers`` / ``paca_parameters`` / ``sync_paca`` / ``disable_paca`` / ``merge_paca`` /
    ``unload_paca`` reach the dense, the partitioned and the 4-bit layer alike."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbF

    model = ThreeKinds(bnb)
    w0 = {n: getattr(model, n).weight.detach().clone() for n in ("dense", "sharded")}
    b0 = {n: getattr(model, n).bias.detach().clone() for n in ("dense", "sharded", "q4")}
    q4_base = model.q4
    apply_paca(model, PaCAConfig(r=8, paca_alpha=16, target_modules=["dense", "sharded", "q4"]))
    model.sharded.weight.data = model.sharded.weight.data.flatten()[:100].clone()  # partitioned (FSDP1 shard)
    shard = model.sharded.weight.detach().clone()

    found = dict(paca_layers(model))
    assert list(found) == ["dense", "sharded", "q4"] and all(isinstance(m, PaCALayerBase) for m in found.values())
    assert [type(m) for m in found.values()] == [PaCALinear, PaCALinear, PaCALinear4bit]
    assert not model.sharded.owns_weight() and model.dense.owns_weight()
    assert [id(p) for p in paca_parameters(model)] == [id(m.delta) for m in found.values()]

    _set_deltas(model)
    sync_paca(model)
    dense, q4 = model.dense, model.q4
    want = _merged64(w0["dense"], dense.indices, dense.scaling, dense.delta)
    torch.testing.assert_close(dense.weight.double(), want, rtol=0, atol=1e-6)  # merged columns written
    assert torch.equal(model.sharded.weight.detach(), shard)  # a shard is never written

    x = randn(3, 64, seed=4, dtype=torch.float32)
    d64 = bnbF.dequantize_4bit(q4_base.weight.data, q4_base.weight.quant_state).double()
    y_q4 = q4(x)
    torch.testing.assert_close(y_q4.double(), x.double() @ _merged64(d64, q4.indices, q4.scaling, q4.delta).T
                               + b0["q4"].double(), rtol=1e-5, atol=1e-5)
    with disable_paca(model):
        assert not any(m._paca_enabled for m in found.values())
        torch.testing.assert_close(dense(x).double(), x.double() @ w0["dense"].double().T + b0["dense"].double(),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(q4(x), q4_base(x))  # bitsandbytes' own base output
    assert all(m._paca_enabled for m in found.values())


@pytest.mark.parametrize("merged", [True, False], ids=["merge_paca", "unload_paca"])
def test_merge_and_unload_replace_every_kind_through_the_base(merged):
    """The model-level merge / unload ask each layer for its replacement (no type branches): plain ``nn.Linear``
    layers whose outputs are the adapted ones (merged) or the base ones, bit for bit, with the 4-bit base layer
    object itself back after unloading."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbF

    model = ThreeKinds(bnb)
    w0 = model.dense.weight.detach().clone()
    q4_base = model.q4
    d64 = bnbF.dequantize_4bit(q4_base.weight.data, q4_base.weight.quant_state).double()
    idx = {"dense": select_indices("dense", 64, 8, 0), "q4": select_indices("q4", 64, 8, 0)}
    apply_paca(model, PaCAConfig(r=8, paca_alpha=16), indices=idx)
    _set_deltas(model)
    deltas = {n: m.delta.detach().clone() for n, m in paca_layers(model)}
    (merge_paca if merged else unload_paca)(model)

    assert not list(paca_layers(model)) and type(model.dense) is nn.Linear
    assert type(model.q4) is (nn.Linear if merged else type(q4_base))
    if merged:
        want = _merged64(w0, idx["dense"], 2.0, deltas["dense"])
        torch.testing.assert_close(model.dense.weight.double(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.q4.weight.double(), _merged64(d64, idx["q4"], 2.0, deltas["q4"]),
                                   rtol=0, atol=1e-6)
    else:
        assert torch.equal(model.dense.weight, w0) and model.q4 is q4_base
