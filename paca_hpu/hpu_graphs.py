"""Training under Habana HPU graphs (``--use_hpu_graphs_for_training``: optimum-habana's ``GaudiTrainer`` wraps the
model with ``habana_frameworks.torch.hpu.ModuleCacher``).

What an HPU graph does (Intel Gaudi software, ``habana_frameworks/torch/hpu/graphs.py``): while the model is in
training mode with grad mode on (and lazy mode on), the first call per input signature runs the model's Python
forward once and records its device ops and those of the backward; every later call replays the recording without
running any Python of the model, on fixed device buffers. Two consequences for a training run:

* **Python state inside the forward is frozen at capture.** A PaCA layer's forward branches on host-side state: the
  layer is disabled (:func:`paca_hpu.disable_paca`) or functional (:func:`paca_hpu.functional_paca`), its ``delta``
  was substituted (``torch.func.functional_call``), its weight is partitioned by a sharding engine, or its ``delta``
  changed outside an optimizer step (the version-counter check that refreshes the merged columns first). A replay
  runs whichever branch was taken at capture: a disabled forward would silently compute the enabled one, and a
  write-back captured in the forward would rerun at every micro-batch.
* **The gradients of the trainable parameters come out of one fixed buffer per graph**, returned detached at every
  replay. When a parameter's ``.grad`` is ``None``, autograd keeps that tensor itself as ``.grad`` (when its layout
  matches the parameter's), so ``.grad`` IS the graph's buffer: the next replay overwrites it and autograd then adds
  the new gradient to itself, ``2 * g_last`` instead of ``g_1 + g_2`` under gradient accumulation (and ``2 * g``
  from the second step on, as ``GaudiTrainer`` zeroes gradients in place with HPU graphs). PaCA's own ``delta``
  gradient happens to come out transposed and is copied instead (for ``r >= 2``); LoRA's factors and ``r = 1`` are
  taken as they are.

:func:`guard_hpu_graphs` installs a forward pre-hook on the model (it runs in Python at every call, outside the
graph) that makes each case correct or refuses it. ``paca_hpu.trainer``'s ``GaudiTrainer`` installs it whenever it
wraps the model for HPU graphs; call it yourself after your own ``ModuleCacher()(model=model)``.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from .layer import PaCADelta, PaCALinear
from .writeback import refresh

__all__ = ["guard_hpu_graphs", "check_replayable"]

_GUARD_ATTR = "_paca_hpu_graph_guard"

_NO_HPU_GRAPHS = "train without HPU graphs (drop --use_hpu_graphs_for_training)"


def check_replayable(model: nn.Module, layers: List[Tuple[str, nn.Module]]) -> None:
    """Prepare a training forward of ``model`` that an HPU graph may capture or replay: refresh the merged columns
    of every stale PaCA layer of ``layers`` (``(name, layer)`` pairs) now, in Python
    (:func:`paca_hpu.writeback.refresh`), and give every trainable parameter of ``model`` without a ``.grad`` a zero
    gradient of its own (so the graph's gradient buffer is added into it, never taken as it).

    Raises:
        RuntimeError: a PaCA layer is disabled (``disable_paca``) or functional (``functional_paca``), its ``delta``
            was substituted (``torch.func.functional_call``), or its weight is partitioned by a sharding engine (or
            substituted): an HPU graph would replay another computation than the one asked for. The message names
            the layer and what to do instead.
    """
    for name, layer in layers:
        if not layer._paca_enabled:
            raise RuntimeError(
                f"PaCA layer '{name}' is disabled (disable_paca) in a training forward with gradients on, under HPU "
                "graphs for training: the captured graph replays the enabled forward. Run the reference forward "
                f"under torch.no_grad() or model.eval() (it then runs without the graph), or {_NO_HPU_GRAPHS}")
        if layer._functional:
            raise RuntimeError(
                f"PaCA layer '{name}' is in functional_paca under HPU graphs for training: the captured graph replays "
                f"the fused forward, whose backward cannot be differentiated again; {_NO_HPU_GRAPHS}")
        if not isinstance(layer._parameters.get("delta"), PaCADelta if isinstance(layer, PaCALinear) else nn.Parameter):
            raise RuntimeError(
                f"the delta of PaCA layer '{name}' was substituted (torch.func.functional_call?) under HPU graphs for "
                f"training: a graph replay reads the tensors captured at the first call; {_NO_HPU_GRAPHS}")
        owns = getattr(layer, "owns_weight", None)
        if owns is not None and not owns():
            raise RuntimeError(
                f"the weight of PaCA layer '{name}' is not its own whole Parameter (partitioned by DeepSpeed ZeRO-3 / "
                "FSDP, whose per-forward gathers run in Python hooks, or substituted by torch.func.functional_call): "
                f"an HPU graph replay runs neither; {_NO_HPU_GRAPHS}")
        is_stale = getattr(layer, "is_stale", None)
        if is_stale is not None and is_stale():
            refresh(layer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


def guard_hpu_graphs(model: nn.Module):
    """Install (once) a forward pre-hook on ``model`` that runs :func:`check_replayable` before every call an HPU
    graph would capture or replay (``model.training`` and grad mode on). Returns the hook's handle (the existing one
    when the model is guarded already).

    Install it on the module whose ``forward`` ``ModuleCacher`` replaced (the hook runs around that forward, in
    Python, at every call). The PaCA layers are looked up now: layers added later are not guarded.
    """
    existing = model.__dict__.get(_GUARD_ATTR)
    if existing is not None:
        return existing
    from .model import paca_layers

    layers = list(paca_layers(model))

    def before_forward(module, args):
        if module.training and torch.is_grad_enabled():
            check_replayable(module, layers)

    handle = model.register_forward_pre_hook(before_forward)
    model.__dict__[_GUARD_ATTR] = handle
    return handle
