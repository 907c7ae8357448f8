"""Static-shape hot path, proven op by op on CPU.

Gaudi's graph compiler (lazy mode, HPU graphs, ``torch.compile`` with ``hpu_backend``) builds a graph from the aten
ops a step runs and reuses it as long as the next step runs the same ops on the same shapes.  What breaks that
reuse is an op whose output shape depends on tensor *values* (``nonzero``, ``masked_select``, ``unique``, boolean
indexing), a host synchronisation (``.item()`` -> ``aten._local_scalar_dense``, a Python ``if`` on a tensor, a
``.cpu()`` copy), or a step whose op sequence changes.

These tests record every aten op (a ``TorchDispatchMode``) that the forward, the backward and the optimizer step of
PaCA layers run, and check those properties.  Each check is also run against deliberately bad toy layers (a boolean
mask, ``nonzero``, ``masked_select``, ``unique``, ``.item()``, a Python branch on a value, ``.cpu()``, a write into the
weight inside forward, a step-dependent gather length), so a checker that stopped seeing ops would fail here.

A copy to the host cannot be seen on CPU (``x.cpu()`` of a CPU tensor dispatches nothing), so the forward and
backward are also run on the ``meta`` device, where every device change is a visible ``_to_copy`` and every value
read raises.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from paca_hpu import PaCAConfig, PaCALinear, apply_paca, load_adapter, paca_layers, save_adapter
from paca_hpu.layer import default_index_dtype

# --------------------------------------------------------------------------------------------------------------
# the op recorder and the checker
# --------------------------------------------------------------------------------------------------------------

#: ops whose output shape depends on tensor values, or that read a value to the host
DATA_DEPENDENT_OPS = {
    "nonzero", "argwhere", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "bincount", "repeat_interleave",
}
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "tolist"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"}


@dataclass(frozen=True)
class Op:
    """One aten op as the dispatcher saw it."""

    name: str                      # overload packet, e.g. "mm"
    overload: str                  # full name, e.g. "aten.mm.default"
    inputs: Tuple                  # ((shape, dtype, device), ...) of every tensor argument, in order
    outputs: Tuple                 # same for the outputs (empty when the op raised)
    scalars: Tuple                 # the non-tensor arguments (dims, flags), as reprs
    writes: Tuple[str, ...]        # names of watched tensors this op writes into
    to_devices: Tuple[str, ...] = ()  # device types named by a ``device=`` argument (e.g. ``_to_copy`` of .cpu())

    @property
    def signature(self):
        return (self.overload, self.inputs, self.outputs, self.scalars)


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _meta(t: torch.Tensor):
    return (tuple(t.shape), t.dtype, t.device.type)


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched inside the ``with`` block, tagged with the current ``phase``.

    ``watched``: name -> tensor (parameters, buffers); an op that writes into one of their storages is recorded in
    ``Op.writes`` (only for tensors with real storage; meta tensors have none).
    """

    def __init__(self, watched: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.phase = "default"
        self.ops: List[Tuple[str, Op]] = []
        self._watched = {}
        for name, t in (watched or {}).items():
            if t.device.type != "meta":
                self._watched[t.untyped_storage().data_ptr()] = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function markers (optimizer.step), not compute
            return func(*args, **kwargs)
        writes = []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            val = args[i] if i < len(args) else kwargs.get(arg.name)
            for t in tree_leaves(val):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    name = self._watched.get(t.untyped_storage().data_ptr())
                    if name is not None:
                        writes.append(name)
        leaves = tree_leaves((args, kwargs))
        inputs = tuple(_meta(t) for t in leaves if isinstance(t, torch.Tensor))
        scalars = tuple(repr(a) for a in leaves if isinstance(a, _PLAIN))
        name = func.overloadpacket.__name__
        to_devices = tuple(torch.device(v).type for k, v in kwargs.items() if k == "device" and v is not None)
        record = dict(name=name, overload=str(func), inputs=inputs, scalars=scalars, writes=tuple(writes),
                      to_devices=to_devices)
        try:
            out = func(*args, **kwargs)
        except Exception:
            # record what was attempted (e.g. .item() on a meta tensor raises) before re-raising
            self.ops.append((self.phase, Op(outputs=(), **record)))
            raise
        outputs = tuple(_meta(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.ops.append((self.phase, Op(outputs=outputs, **record)))
        return out

    def of(self, *phases: str) -> List[Op]:
        return [op for phase, op in self.ops if phase in phases]


def violations(ops: Sequence[Op], device: str, may_write: Sequence[str] = ()) -> List[str]:
    """Everything in ``ops`` that would stop a graph compiler from building one static graph on ``device``."""
    found = []
    for op in ops:
        if op.name in DATA_DEPENDENT_OPS:
            found.append(f"data-dependent output shape: {op.overload}")
        if op.name in HOST_SYNC_OPS:
            found.append(f"host synchronisation: {op.overload}")
        if op.name in INDEX_OPS and any(dt in (torch.bool, torch.uint8) for _, dt, _ in op.inputs[1:]):
            found.append(f"boolean-mask indexing: {op.overload}")
        devices = {dev for _, _, dev in op.inputs + op.outputs} | set(op.to_devices)
        if devices - {device}:
            found.append(f"device transfer {sorted(devices)}: {op.overload}")
        for name in op.writes:
            if name not in may_write:
                found.append(f"writes into {name}: {op.overload}")
    return found


def signatures(ops: Sequence[Op]):
    return [op.signature for op in ops]


# --------------------------------------------------------------------------------------------------------------
# models and the step driver
# --------------------------------------------------------------------------------------------------------------

IN, HID, OUT, R = 64, 48, 24, 8


class MLP(nn.Module):
    """Two linear layers with a nonlinearity: both become PaCA layers (``all-linear``)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up = nn.Linear(IN, HID)
        self.down = nn.Linear(HID, OUT, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def paca_mlp(index_dtype: Optional[torch.dtype] = None, seed: int = 0) -> nn.Module:
    return apply_paca(MLP(seed), PaCAConfig(r=R, paca_alpha=16), index_dtype=index_dtype)


def watched_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    named.update({n: b for n, b in model.named_buffers()})
    return named


def batch(step: int, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(2, 5, IN, generator=g).requires_grad_(requires_grad)


def record_training(model: nn.Module, steps: int, autocast: Optional[torch.dtype] = None,
                    x_requires_grad: bool = False) -> List[OpRecorder]:
    """Run ``steps`` full training steps (forward, backward, AdamW step with PaCA's write-back, zero_grad) and
    return one recorder per step, its ops tagged ``forward`` / ``backward`` / ``update`` / ``writeback``.

    ``writeback`` starts when the optimizer's own step post-hook runs: torch runs an optimizer's instance post-hooks
    before the global ones, and PaCA's write-back is a global post-hook."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    recorders = []
    current: List[OpRecorder] = []

    def mark_writeback(optimizer, args, kwargs):
        current[0].phase = "writeback"

    opt.register_step_post_hook(mark_writeback)
    for step in range(steps):
        x = batch(step, x_requires_grad)
        target = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(step))
        rec = OpRecorder(watched_tensors(model))
        current[:] = [rec]
        with rec:
            rec.phase = "forward"
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                y = model(x)
            rec.phase = "loss"
            loss = F.mse_loss(y.float(), target)
            rec.phase = "backward"
            loss.backward()
            rec.phase = "update"
            opt.step()
            rec.phase = "zero_grad"
            opt.zero_grad()
        recorders.append(rec)
    return recorders


# --------------------------------------------------------------------------------------------------------------
# PaCA: the hot path is static
# --------------------------------------------------------------------------------------------------------------

MODES = {"float32": None, "bf16_autocast": torch.bfloat16}


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("mode", list(MODES))
def test_paca_training_step_is_static(mode, index_dtype):
    model = paca_mlp(index_dtype)
    layers = dict(paca_layers(model))
    assert len(layers) == 2 and all(layer.indices.dtype == index_dtype for layer in layers.values())
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    storages = {n: layer.weight.untyped_storage().data_ptr() for n, layer in layers.items()}
    recs = record_training(model, steps=4, autocast=MODES[mode], x_requires_grad=True)

    for step, rec in enumerate(recs):
        fwd, bwd, wb = rec.of("forward"), rec.of("backward"), rec.of("writeback")
        # the hot path: nothing data dependent, no host sync, no device change, nothing written into the model
        assert violations(fwd, "cpu") == [], step
        assert violations(bwd, "cpu") == [], step
        # forward = one GEMM and one static gather of r columns per layer; backward = two GEMMs per layer
        assert sum(op.name in GEMM_OPS for op in fwd) == len(layers)
        gathers = [op for op in fwd if op.name == "index_select"]
        assert len(gathers) == len(layers)
        assert all(op.inputs[1] == ((R,), index_dtype, "cpu") and op.outputs[0][0][-1] == R for op in gathers)
        assert sum(op.name in GEMM_OPS for op in bwd) == 2 * len(layers)
        # no write-back anywhere but after the optimizer step
        for phase in ("forward", "loss", "backward", "zero_grad"):
            assert not any(op.name == "index_copy" for op in rec.of(phase)), phase
            assert not [w for op in rec.of(phase) for w in op.writes if not w.endswith(".delta")], phase
        # the write-back: a fixed-shape index_copy_ of (out, r) columns into each merged weight, and nothing that
        # would need a value on the host
        may_write = [f"{n}.weight" for n in layers]
        assert violations(wb, "cpu", may_write=may_write) == [], step
        copies = [op for op in wb if op.name == "index_copy_"]
        assert len(copies) == len(layers)
        for op, (name, layer) in zip(copies, layers.items()):
            out_f, in_f = layer.weight.shape
            assert op.writes == (f"{name}.weight",)
            assert op.inputs == (((out_f, in_f), torch.float32, "cpu"), ((R,), torch.int64, "cpu"),
                                 ((out_f, R), torch.float32, "cpu"))
        assert {w for op in wb for w in op.writes} == set(may_write)

    # the same ops on the same shapes in every step (each step had different data)
    for rec in recs[1:]:
        hot = ("forward", "loss", "backward")
        assert signatures(rec.of(*hot)) == signatures(recs[0].of(*hot))
        assert signatures(rec.of("writeback")) == signatures(recs[0].of("writeback"))
    # and the write-back reached the weights in place (same storage: an HPU graph / compiled graph reads it)
    for name, layer in layers.items():
        assert layer.weight.untyped_storage().data_ptr() == storages[name]
        assert not torch.equal(layer.weight, before[name])
        torch.testing.assert_close(layer.weight.detach().index_select(1, layer.indices.long()),
                                   layer.merged_columns(), rtol=0, atol=0)


def test_recorder_sees_autocast_casts_and_float32_delta_grads():
    """Under bf16 autocast the GEMMs run in bf16 (casts visible in the trace) and the delta GEMM in float32."""
    model = paca_mlp()
    rec = record_training(model, steps=1, autocast=torch.bfloat16)[0]
    fwd_gemms = [op for op in rec.of("forward") if op.name in GEMM_OPS]
    assert all(dt == torch.bfloat16 for op in fwd_gemms for _, dt, _ in op.inputs)
    bwd_gemms = [op for op in rec.of("backward") if op.name in GEMM_OPS]
    dtypes = sorted({op.inputs[0][1] for op in bwd_gemms}, key=str)
    assert dtypes == [torch.bfloat16, torch.float32]
    for _, layer in paca_layers(model):
        assert layer.delta.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_meta_device_forward_backward_reads_no_value_and_stays_on_device(dtype, index_dtype):
    """On ``meta`` a copy to the host is a visible op and any value read raises: PaCA does neither."""
    layer = dict(paca_layers(paca_mlp(index_dtype)))["up"].to(device="meta", dtype=dtype)
    layer.delta.data = layer.delta.data.float()
    x = torch.empty(2, 5, IN, device="meta", dtype=dtype, requires_grad=True)
    rec = OpRecorder()
    with rec:
        rec.phase = "forward"
        y = layer(x)
        rec.phase = "backward"
        y.sum().backward()
    assert violations(rec.of("forward", "backward"), "meta") == []
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert layer.delta.grad.shape == (HID, R) and layer.delta.grad.dtype == torch.float32


def test_whole_tiny_llama_adds_only_static_ops():
    """A PaCA LLaMA's extra ops over full fine-tuning's (forward + backward) are static gathers and small copies."""
    from helpers import random_ids, tiny_llama

    ids = random_ids(2, 8)

    def run(model):
        rec = OpRecorder()
        with rec:
            model(input_ids=ids, labels=ids).loss.backward()
        return rec.of("default")

    base = tiny_llama()  # fully trainable: the reference is full fine-tuning
    base.train()
    paca = apply_paca(copy.deepcopy(base), PaCAConfig(r=4))
    ops_base, ops_paca = run(base), run(paca)
    extra = {op.name for op in ops_paca} - {op.name for op in ops_base}
    assert extra <= {"index_select", "mul_", "new_empty_strided", "copy_", "detach", "_to_copy", "t", "mm", "addmm",
                     "view", "_unsafe_view"}, extra
    # (transformers 4.55's LLaMA has none of its own; counted as a multiset in case a later version adds some)
    new_problems = Counter(violations(ops_paca, "cpu")) - Counter(violations(ops_base, "cpu"))
    assert not new_problems, new_problems
    assert sum(op.name == "index_select" for op in ops_paca) == 7 * 2  # one gather per projection


# --------------------------------------------------------------------------------------------------------------
# the checker catches bad designs (so the tests above can fail)
# --------------------------------------------------------------------------------------------------------------


class BadPaCA(nn.Module):
    """A PaCA-like layer, ``y = x @ W.T + x[..., idx] @ D.T``, with one deliberate flaw."""

    def __init__(self, flaw: str, in_features: int = IN, out_features: int = OUT, r: int = R):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.flaw = flaw
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=g), requires_grad=False)
        self.delta = nn.Parameter(torch.zeros(out_features, r))
        self.register_buffer("indices", torch.arange(0, in_features, in_features // r)[:r])
        self.calls = 0

    def forward(self, x):
        idx, flaw = self.indices, self.flaw
        mask = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        if flaw in ("bool_mask", "nonzero", "masked_select"):
            mask[idx] = True
        if flaw == "bool_mask":
            x_sel = x[..., mask]
        elif flaw == "nonzero":
            x_sel = x.index_select(-1, mask.nonzero().squeeze(-1))
        elif flaw == "masked_select":
            x_sel = torch.masked_select(x, mask.expand_as(x)).view(*x.shape[:-1], -1)
        elif flaw == "unique":
            x_sel = x.index_select(-1, torch.unique(idx))
        elif flaw == "item":
            x_sel = x.narrow(-1, 0, int(idx.max()) + 1).index_select(-1, idx)
        elif flaw == "python_branch":
            x_sel = x.index_select(-1, idx) if bool((x != 0).any()) else x[..., :1].expand(*x.shape[:-1], idx.numel())
        elif flaw == "cpu":
            x_sel = x.index_select(-1, idx.cpu().to(x.device))
        elif flaw == "write_in_forward":
            with torch.no_grad():
                self.weight.index_copy_(1, idx, self.weight.index_select(1, idx) + self.delta)
            x_sel = x.index_select(-1, idx)
        elif flaw == "step_dependent_length":
            self.calls += 1
            k = 1 + self.calls % idx.numel()
            return F.linear(x, self.weight) + x.index_select(-1, idx[:k]) @ self.delta[:, :k].t()
        else:
            raise AssertionError(flaw)
        return F.linear(x, self.weight) + x_sel @ self.delta.t()


def _run_bad(flaw: str, device: str):
    model = BadPaCA(flaw).to(device)
    rec = OpRecorder(watched_tensors(model))
    x = torch.randn(2, 5, IN).to(device)
    try:
        with rec:
            model(x).sum().backward()
    except Exception:  # on meta, reading a value or copying to the host raises; the attempt is recorded
        pass
    return rec.of("default")


@pytest.mark.parametrize("flaw,device,expected", [
    ("bool_mask", "cpu", "boolean-mask indexing"),
    ("nonzero", "cpu", "data-dependent output shape: aten.nonzero"),
    ("masked_select", "cpu", "data-dependent output shape: aten.masked_select"),
    ("unique", "cpu", "data-dependent output shape: aten._unique2"),
    ("item", "cpu", "host synchronisation: aten._local_scalar_dense"),
    ("python_branch", "cpu", "host synchronisation"),
    ("cpu", "meta", "device transfer"),
    ("item", "meta", "host synchronisation"),
    ("write_in_forward", "cpu", "writes into weight: aten.index_copy_"),
])
def test_checker_catches_bad_layer(flaw, device, expected):
    found = violations(_run_bad(flaw, device), device)
    assert any(v.startswith(expected) for v in found), found


def test_checker_passes_good_version_of_bad_layer():
    """The same toy without a flaw (static ``index_select``) is clean: the checker flags flaws, not the toy."""
    model = BadPaCA("unique")
    model.flaw = "none"

    def fwd(x):
        return F.linear(x, model.weight) + x.index_select(-1, model.indices) @ model.delta.t()

    rec = OpRecorder(watched_tensors(model))
    with rec:
        fwd(torch.randn(2, 5, IN)).sum().backward()
    assert violations(rec.of("default"), "cpu") == []


def test_checker_catches_step_dependent_shapes():
    model = BadPaCA("step_dependent_length")
    sigs = []
    for step in range(2):
        rec = OpRecorder()
        with rec:
            model(batch(step)).sum().backward()
        assert violations(rec.of("default"), "cpu") == []  # each step alone looks fine ...
        sigs.append(signatures(rec.of("default")))
    assert sigs[0] != sigs[1]  # ... but the shapes change from step to step


def test_checker_catches_write_back_inside_forward_of_a_training_step():
    """``record_training`` + the phase checks of the main test flag a design that merges columns in forward."""

    class ForwardMerging(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = BadPaCA("write_in_forward")

        def forward(self, x):
            return self.layer(x)

    model = ForwardMerging()
    rec = record_training(model, steps=1)[0]
    assert any(op.name == "index_copy_" for op in rec.of("forward"))
    assert "writes into layer.weight: aten.index_copy_.default" in violations(rec.of("forward"), "cpu")
    assert rec.of("writeback") == []  # nothing happens after the step: no PaCA layer here


# --------------------------------------------------------------------------------------------------------------
# index dtype: int32 and int64 give identical results; the default suits the device
# --------------------------------------------------------------------------------------------------------------


def test_default_index_dtype_per_device():
    assert default_index_dtype(torch.device("hpu")) == torch.int32
    assert default_index_dtype("hpu:0") == torch.int32
    assert default_index_dtype(torch.device("cuda")) == torch.int64
    assert default_index_dtype("cpu") == torch.int64
    layer = dict(paca_layers(paca_mlp()))["up"]
    assert layer.indices.dtype == torch.int64  # built on CPU


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bf16_autocast"])
def test_int32_and_int64_indices_train_identically(autocast):
    m64, m32 = paca_mlp(torch.int64), paca_mlp(torch.int32)
    for (n64, l64), (n32, l32) in zip(paca_layers(m64), paca_layers(m32)):
        assert n64 == n32 and l64.indices.dtype == torch.int64 and l32.indices.dtype == torch.int32
        assert torch.equal(l64.indices, l32.indices.long())
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (m64, m32)]
    for step in range(3):
        outs = []
        for model, opt in zip((m64, m32), opts):
            x = batch(step, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                y = model(x)
            y.float().square().mean().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            outs.append((y.detach(), x.grad, grads))
            opt.step()
            opt.zero_grad()
        (y64, gx64, g64), (y32, gx32, g32) = outs
        assert torch.equal(y64, y32) and torch.equal(gx64, gx32)
        assert all(torch.equal(a, b) for a, b in zip(g64, g32))
    for (_, l64), (_, l32) in zip(paca_layers(m64), paca_layers(m32)):
        assert torch.equal(l64.delta, l32.delta) and torch.equal(l64.weight, l32.weight)


def test_int32_adapter_round_trip_into_int64_model(tmp_path):
    m32 = paca_mlp(torch.int32)
    with torch.no_grad():
        for _, layer in paca_layers(m32):
            layer.delta.normal_()
            layer.sync()
    save_adapter(m32, tmp_path / "adapter")
    m64 = load_adapter(MLP(), tmp_path / "adapter", index_dtype=torch.int64)
    assert {layer.indices.dtype for _, layer in paca_layers(m64)} == {torch.int64}
    x = batch(0)
    assert torch.equal(m32(x), m64(x))
    for (_, a), (_, b) in zip(paca_layers(m32), paca_layers(m64)):
        assert torch.equal(a.indices.long(), b.indices)


def test_set_indices_keeps_index_dtype():
    layer = dict(paca_layers(paca_mlp(torch.int32)))["up"]
    layer.set_indices(torch.arange(R, dtype=torch.int64) * 3)
    assert layer.indices.dtype == torch.int32
    assert torch.equal(layer.indices, torch.arange(R, dtype=torch.int32) * 3)
    assert isinstance(layer, PaCALinear)


def test_default_index_dtype_follows_the_device_when_the_model_moves(monkeypatch):
    """The usual Gaudi flow converts the model on the CPU, then the trainer moves it to the HPU: the default index
    dtype must follow that move (int32 on HPU).  ``meta`` stands in for ``hpu`` here (a CPU build cannot allocate
    HPU tensors)."""
    import paca_hpu.layer.base as layer_mod  # where the layers look the default up

    real = layer_mod.default_index_dtype
    monkeypatch.setattr(layer_mod, "default_index_dtype",
                        lambda device: torch.int32 if torch.device(device).type in ("hpu", "meta") else real(device))
    auto = paca_mlp()  # index_dtype not given
    explicit = paca_mlp(torch.int64)
    assert {layer.indices.dtype for _, layer in paca_layers(auto)} == {torch.int64}
    auto.to("meta")
    explicit.to("meta")
    assert {layer.indices.dtype for _, layer in paca_layers(auto)} == {torch.int32}
    assert {layer.indices.dtype for _, layer in paca_layers(explicit)} == {torch.int64}  # an explicit choice is kept
    auto.to_empty(device="cpu")
    assert {layer.indices.dtype for _, layer in paca_layers(auto)} == {torch.int64}
    # a dtype cast never touches the integer indices
    model = paca_mlp(torch.int32).to(torch.bfloat16)
    assert {layer.indices.dtype for _, layer in paca_layers(model)} == {torch.int32}
