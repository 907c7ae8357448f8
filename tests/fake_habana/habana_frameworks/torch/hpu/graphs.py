"""Fake HPU graphs: ``ModuleCacher`` (training) and ``wrap_in_hpu_graph`` (inference) that REPLAY like the real ones.

What the real plugin does (``habana_frameworks/torch/hpu/graphs.py`` of Intel Gaudi software, Apache-2.0):

* ``ModuleCacher()(model=model, inplace=True)`` replaces ``model.forward``. While ``model.training``, grad mode is on
  and lazy mode is on (``PT_HPU_LAZY_MODE`` == ``"1"``), the first call per input signature (tensor shapes, other
  arguments by value) captures one graph (``make_graphed_callables``): the Python forward runs ONCE (calling the
  model through a shallow copy made at wrap time, so its hooks run too), the forward's device ops and the ops of
  ``torch.autograd.grad(outputs, inputs requiring grad + parameters requiring grad)`` are recorded; every later
  call copies its inputs into the capture-time input buffers and replays the recorded ops. No Python of the model
  runs at a replay: a Python branch, a flag, a version-counter check inside the forward is frozen as it was at
  capture, and an in-place write captured in the forward reruns at every replay. The captured graph reads and
  writes fixed device buffers: parameters as they were at capture (a parameter replaced later by another tensor is
  never read again), its outputs and its gradients (returned detached, the same buffers every replay). Outside
  those conditions (eval mode, ``torch.no_grad()``, eager mode) the original forward runs.
* ``wrap_in_hpu_graph(module)`` (inference) captures the forward only, per input signature, and returns the
  capture-time output objects refilled at each replay.

This fake does the same on the CPU with a recorder: at capture it records every aten op (function, arguments,
result) below autograd with a ``TorchDispatchMode``; a replay re-executes the recorded ops on the very tensor
objects recorded and copies each result into the recorded result tensor (so every intermediate, output and
gradient lives in a fixed buffer, as in a device graph). Events: ``hpu_graph_wrap``, ``hpu_graph_capture``,
``hpu_graph_replay``, ``hpu_graph_eager`` (the conditions for a graph do not hold), and
``hpu_graph_stale_address`` for every parameter / buffer whose storage changed since the capture.
"""

from __future__ import annotations

import copy
import os

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ...fake import record

__all__ = ["ModuleCacher", "wrap_in_hpu_graph"]


class _Recorder(TorchDispatchMode):
    """Records ``(func, args, kwargs, result)`` of every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.tape = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tape.append((func, args, kwargs, out))
        return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())


def _copy_into(dst, src) -> None:
    """Write a replayed result into the buffer recorded at capture (views and in-place results already are it)."""
    if isinstance(dst, torch.Tensor):
        if src is not dst and not _same_memory(dst, src):
            dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)
    # anything else (a Python number from .item(), None) stays as it was at capture: a graph has no host values


@torch.no_grad()
def _replay(tape) -> None:
    for func, args, kwargs, out in tape:
        _copy_into(out, func(*args, **kwargs))


def _key(value):
    """The real plugin hashes tensors by shape and view layout, everything else by value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), str(value.dtype))
    if isinstance(value, dict):
        return tuple((k, _key(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return type(value).__name__


def _addresses(module):
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    return {name: t.untyped_storage().data_ptr() for name, t in named.items()}


class _Graph:
    """One captured forward + backward (``make_graphed_callables`` of the real plugin)."""

    def __init__(self, call, module, args, kwargs, with_backward: bool):
        self.static_in, self.in_spec = pytree.tree_flatten((args, kwargs))
        self.params = list(module.parameters())
        recorder = _Recorder()
        with recorder:
            out = call(*args, **kwargs)
        self.fwd_tape = recorder.tape
        self.flat_out, self.out_spec = pytree.tree_flatten(out)
        self.out_idx = [i for i, o in enumerate(self.flat_out) if isinstance(o, torch.Tensor)]
        self.captured_out = out
        self.bwd_tape, self.grad_out, self.grad_in = [], [], []
        if with_backward:
            self._capture_backward()

    def _capture_backward(self) -> None:
        outs = [self.flat_out[i] for i in self.out_idx]
        self.needs_grad = [o.requires_grad for o in outs]
        self.grad_out = [torch.empty_like(o) for o in outs if o.requires_grad]
        surface = [t for t in self._tensor_inputs() + self.params]
        wanted = [t for t in surface if t.requires_grad]
        recorder = _Recorder()
        with recorder:
            grads = torch.autograd.grad([o for o in outs if o.requires_grad], wanted, self.grad_out,
                                        allow_unused=True, materialize_grads=True)
        self.bwd_tape = recorder.tape
        it = iter(grads)
        self.grad_in = [next(it) if t.requires_grad else None for t in surface]

    def _tensor_inputs(self):
        return [t for t in self.static_in if isinstance(t, torch.Tensor)]

    def refill(self, args, kwargs) -> None:
        """Copy this call's inputs into the capture-time input buffers (``copy_to`` of the real plugin)."""
        flat, _ = pytree.tree_flatten((args, kwargs))
        with torch.no_grad():
            for static, new in zip(self.static_in, flat):
                if isinstance(static, torch.Tensor) and new is not static:
                    static.copy_(new)


class _Graphed(torch.autograd.Function):
    """The autograd function around a captured graph: forward = replay, backward = replay of the captured backward;
    outputs and input gradients are the graph's fixed buffers, returned detached (as the real plugin does)."""

    @staticmethod
    def forward(ctx, graph, *inputs):
        ctx.graph = graph
        _replay(graph.fwd_tape)
        return tuple(graph.flat_out[i].detach() for i in graph.out_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        graph = ctx.graph
        with torch.no_grad():
            for buf, g in zip(graph.grad_out, [g for g, need in zip(grads, graph.needs_grad) if need]):
                buf.copy_(g)
        _replay(graph.bwd_tape)
        return (None,) + tuple(None if g is None else g.detach() for g in graph.grad_in)


def _rebuild(graph, tensors):
    flat = list(graph.flat_out)
    for i, t in zip(graph.out_idx, tensors):
        flat[i] = t
    return pytree.tree_unflatten(flat, graph.out_spec)


class ModuleCacher:
    """``ht.hpu.ModuleCacher(max_graphs=...)(model=model, inplace=True, ...)``: HPU graphs for training."""

    def __init__(self, max_graphs=10):
        self.max_graphs = max_graphs

    def __call__(self, model, inplace=True, allow_unused_input=False, have_grad_accumulation=False, **kwargs):
        if not inplace or have_grad_accumulation:
            raise NotImplementedError("the fake ModuleCacher models inplace=True, have_grad_accumulation=False only "
                                      "(what optimum-habana's GaudiTrainer passes)")
        name = type(model).__name__
        orig_model = copy.copy(model)  # the real plugin calls this copy (hooks shared with the model) at capture
        orig_forward = model.forward
        lazy = os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"
        graphs, addresses = {}, {}
        max_graphs = self.max_graphs

        def forward(*args, **kw):
            if not (model.training and torch.is_grad_enabled() and lazy):
                record("hpu_graph_eager", name)
                return orig_forward(*args, **kw)
            key = _key((args, kw))
            graph = graphs.get(key)
            if graph is None:
                if len(graphs) >= max_graphs:
                    record("hpu_graph_eager", name)
                    return orig_forward(*args, **kw)
                graph = graphs[key] = _Graph(orig_model, model, args, kw, with_backward=True)
                addresses[key] = _addresses(model)
                record("hpu_graph_capture", name, len(graphs))
            else:
                for tname, ptr in addresses[key].items():
                    if _addresses(model).get(tname) != ptr:
                        record("hpu_graph_stale_address", name, tname)
                graph.refill(args, kw)
                record("hpu_graph_replay", name)
            outs = _Graphed.apply(graph, *graph._tensor_inputs(), *graph.params)
            return _rebuild(graph, outs)

        model.forward = forward
        model._fake_hpu_graph = graphs
        record("hpu_graph_wrap", name)
        return model


def wrap_in_hpu_graph(module, asynchronous=False, disable_tensor_cache=False, max_graphs=None, **kwargs):
    """HPU graphs for inference: the forward captured once per input signature, replayed after; the capture-time
    output objects are returned, refilled."""
    name = type(module).__name__
    orig_forward = module.forward
    graphs = {}

    def forward(*args, **kw):
        key = _key((args, kw))
        graph = graphs.get(key)
        if graph is None:
            if max_graphs is not None and len(graphs) >= max_graphs:
                return orig_forward(*args, **kw)
            graphs[key] = _Graph(orig_forward, module, args, kw, with_backward=False)
            record("hpu_graph_capture", name, len(graphs))
            return graphs[key].captured_out
        graph.refill(args, kw)
        _replay(graph.fwd_tape)
        record("hpu_graph_replay", name)
        return graph.captured_out

    module.forward = forward
    module._fake_hpu_graph = graphs
    record("hpu_graph_wrap", name)
    return module
