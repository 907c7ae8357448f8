"""When a PaCA layer's merged ``weight`` is current: every trigger of the write-back, and its one extension point.

A dense PaCA layer (:class:`paca_hpu.layer.PaCALinear`) keeps the merged weight, ``W0`` with
``W0[:, idx] + scaling * delta`` in the selected columns, in its ``weight``. Writing those columns is the
write-back (:meth:`PaCALinear.sync`, a fixed-shape ``index_copy_``); it is tied to changes of ``delta``, not to
forward calls, so it is right under gradient accumulation, evaluation, gradient checkpointing recompute and repeated
forwards. The triggers, all of them here:

* **after every optimizer step**: a global optimizer step post-hook
  (``torch.optim.optimizer.register_optimizer_step_post_hook``, :func:`install_step_hook`; registered when
  :mod:`paca_hpu` is imported) writes back the layers whose ``delta`` the stepped optimizer holds (matched by
  identity, so layers built by hand, deep-copied or unpickled are covered too; in the optimizer's parameter order,
  the same op sequence every step). SGD, AdamW, fused/foreach variants and optimizers wrapped by accelerate or a
  Trainer all fire it. At a layer's first write-back the hook checks that no other module holds the layer's base
  weight (:func:`check_unshared_weights`).
* **after an optimizer step the hook cannot see** (an optimizer that is no ``torch.optim.Optimizer`` and steps a
  master copy, copying it back afterwards: DeepSpeed ZeRO): :func:`hook_covers` says whether a training loop must
  write back itself, :func:`write_back_model` does it. The Trainer callback of :mod:`paca_hpu.trainer.callbacks`
  calls both.
* **before a forward** of a layer whose ``delta`` changed by any other route (schedule-free ``eval()/train()``,
  LOMO's update in backward, ``load_state_dict``, a manual edit): the layer's host-side staleness test
  (:meth:`PaCALinear.is_stale`: another ``delta`` version or object, or a write through ``delta.data``), then
  :func:`refresh`. Before an HPU graph captures or replays a training forward, :mod:`paca_hpu.hpu_graphs` does the
  same in Python.
* **before** ``state_dict()``: :func:`before_state_dict`, every dense layer's state-dict pre-hook, so a saved
  ``weight`` is always current.

:func:`paca_hpu.sync_paca` writes back on request (:func:`write_back_model`). Loading (``load_state_dict``,
``set_indices``) is the layer's own: it leaves the layer current itself.

Every trigger writes back through one function, the installed write-back (:func:`set_write_back`; default
:func:`per_layer`, each layer's :meth:`~PaCALinear.sync` in order). :mod:`paca_hpu.experimental` installs its fused
candidate there; the benchmark harness times :func:`write_back`. (The backward's extension point, the ``delta``
gradient, is the layer's: :func:`paca_hpu.layer.set_delta_gradient`.)

This module imports no other module of :mod:`paca_hpu`: the dense layer imports it, to register itself
(:func:`track`) and its state-dict pre-hook, and to refresh itself when stale.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["WriteBack", "per_layer", "set_write_back", "write_back_in_use", "write_back", "write_back_model",
           "refresh", "before_state_dict", "track", "live_layers", "install_step_hook", "hook_covers",
           "check_unshared_weights"]

#: A write-back: called with a sequence of dense PaCA layers (:class:`paca_hpu.layer.PaCALinear`) whose ``delta``
#: may have changed; afterwards each layer's ``weight`` holds its merged columns and the layer notes the ``delta``
#: version they reflect (what :meth:`PaCALinear.sync` does). Returns nothing.
WriteBack = Callable[[Sequence[nn.Module]], None]

# ---------------------------------------------------------------------------------------------------------------
# the layers that keep merged columns
# ---------------------------------------------------------------------------------------------------------------

#: Every dense PaCA layer alive in this process (built, deep-copied or unpickled: each registers itself).
_LIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def track(layer: nn.Module) -> None:
    """Register ``layer``, a dense PaCA layer that keeps merged columns in its ``weight``, for the optimizer step
    hook (held weakly: a layer that is no longer referenced elsewhere drops out)."""
    _LIVE.add(layer)


def live_layers() -> List[nn.Module]:
    """A snapshot list of every tracked dense PaCA layer (:func:`track`) alive in this process."""
    return list(_LIVE)


# ---------------------------------------------------------------------------------------------------------------
# the write-back and its extension point
# ---------------------------------------------------------------------------------------------------------------


def per_layer(layers: Sequence[nn.Module]) -> None:
    """The default write-back: :meth:`PaCALinear.sync` of each layer, in order."""
    for layer in layers:
        layer.sync()


_installed: WriteBack = per_layer


def set_write_back(fn: Optional[WriteBack]) -> WriteBack:
    """Install ``fn`` as the write-back every trigger runs (optimizer step hook, :func:`write_back_model`,
    :func:`refresh`, :func:`before_state_dict`); ``None`` installs the default :func:`per_layer`. For the whole
    process. ``fn`` must leave the layers as :func:`per_layer` does (bit for bit, to be a drop-in).

    Returns:
        The write-back installed before (to restore it).

    Raises:
        TypeError: ``fn`` is neither callable nor None."""
    global _installed
    if fn is None:
        fn = per_layer
    elif not callable(fn):
        raise TypeError(f"set_write_back expects a callable taking a sequence of PaCA layers, or None for the "
                        f"default; got {type(fn).__name__}")
    before = _installed
    _installed = fn
    return before


def write_back_in_use() -> WriteBack:
    """The write-back installed now (:func:`per_layer` unless :func:`set_write_back` installed another)."""
    return _installed


def write_back(layers: Sequence[nn.Module]) -> None:
    """Write back ``layers`` (dense PaCA layers) now, with the installed write-back."""
    _installed(layers)


def write_back_model(model: nn.Module) -> nn.Module:
    """Write back every dense PaCA layer of ``model`` now (in ``model.modules()`` order), with the installed
    write-back; layers that keep no merged columns (4-bit) have nothing to write. Returns ``model``."""
    _installed([m for m in model.modules() if m in _LIVE])
    return model


def refresh(layer: nn.Module) -> None:
    """Write back one ``layer`` that found itself stale (before its forward, before an HPU graph capture), with the
    installed write-back."""
    _installed([layer])


def before_state_dict(module: nn.Module, prefix, keep_vars) -> None:
    """``state_dict()`` pre-hook of every dense PaCA layer (``register_state_dict_pre_hook``): a stale layer writes
    back first, so a saved ``weight`` always equals ``W0`` with ``original_columns + scaling * delta`` in the
    selected columns (what loading checks)."""
    if module.is_stale():
        _installed([module])


# ---------------------------------------------------------------------------------------------------------------
# after every optimizer step
# ---------------------------------------------------------------------------------------------------------------

_HOOK_HANDLE = None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """The global optimizer step post-hook: write back every live layer whose ``delta`` this optimizer holds, in
    the optimizer's parameter order; at a layer's first write-back, :func:`check_unshared_weights` first."""
    layers = live_layers()
    if not layers:
        return
    by_delta = {id(layer.delta): layer for layer in layers}
    # in the optimizer's parameter order: the same op sequence every step (one graph for lazy mode / HPU graphs)
    stepped = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = by_delta.get(id(p))
            if layer is not None and layer.delta is p:
                stepped.append(layer)
    if not stepped:  # e.g. the inner optimizer of a ZeRO-style master copy: nothing of PaCA's stepped
        return
    unchecked = [layer for layer in stepped if not layer.__dict__.get("_paca_shared_checked", False)]
    if unchecked:
        check_unshared_weights(unchecked)
    _installed(stepped)


def install_step_hook() -> None:
    """Register the global optimizer step post-hook (once per process; later calls do nothing)."""
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        # Not reachable as torch.optim.register_optimizer_step_post_hook in torch 2.13; the submodule has it.
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK_HANDLE = register_optimizer_step_post_hook(_after_optimizer_step)


def hook_covers(optimizer, model: nn.Module) -> bool:
    """Whether the optimizer step hook writes back every dense PaCA layer of ``model`` after ``optimizer.step()``.

    The hook fires after the ``step()`` of a ``torch.optim.Optimizer`` and writes back the layers whose ``delta``
    that optimizer holds. Wrappers are unwrapped through ``.optimizer`` (accelerate's ``AcceleratedOptimizer``).
    Not covered: optimizers that are no ``torch.optim.Optimizer`` and step a master copy of the parameters, copying
    it back afterwards (DeepSpeed ZeRO), where the hook sees no ``delta`` (or an outdated one): a training loop
    then calls :func:`write_back_model` after each step. True for a model without dense PaCA layers.
    """
    deltas = [m.delta for m in model.modules() if m in _LIVE]
    if not deltas:
        return True
    seen = set()
    opt = optimizer
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        inner = getattr(opt, "optimizer", None)
        wrapper = inner is not None and type(opt).__name__ == "AcceleratedOptimizer"
        if isinstance(opt, torch.optim.Optimizer) and not wrapper:
            held = {id(p) for group in opt.param_groups for p in group["params"]}
            return all(id(d) in held for d in deltas)
        opt = inner
    return False


# ---------------------------------------------------------------------------------------------------------------
# a base weight held by another module
# ---------------------------------------------------------------------------------------------------------------


def _storage_ptr(t) -> int:
    """Address of ``t``'s storage; 0 for no tensor, a meta tensor, or a tensor subclass without plain storage."""
    try:
        return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else 0
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


def _live_modules() -> List[nn.Module]:
    """Every ``nn.Module`` the garbage collector tracks. ``isinstance`` on some objects of the heap warns (torch's
    deprecated ``torch.distributed.reduce_op`` raises a FutureWarning on attribute access) or raises (a dead
    ``weakref.proxy``, which torch.compile leaves behind): neither is a module, and neither reaches the user."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            try:
                if isinstance(obj, nn.Module):
                    found.append(obj)
            except ReferenceError:
                continue
    return found


def check_unshared_weights(layers: Sequence[nn.Module]) -> None:
    """Raise if a module other than the PaCA layer itself holds a layer's base ``weight``: the same Parameter, or
    another tensor over the same storage (e.g. ``load_state_dict(policy.state_dict(), assign=True)``).

    PaCA writes its update into ``weight`` in place; a second model built from the same tensors (a reference model
    that shares layers with the policy, a hand-made frozen copy) would change with every step. One pass over the
    garbage collector's objects (run once per layer, at its first write-back by the optimizer step hook). Dense PaCA
    layers (:func:`track`) are not counted as other holders; no other PaCA layer holds a float weight of that shape.

    Raises:
        RuntimeError: names the layer and the type of the other module holding its weight.
    """
    by_storage = {}
    for layer in layers:
        ptr = _storage_ptr(layer.weight)
        if ptr:
            by_storage[ptr] = layer
    if not by_storage:
        return
    for obj in _live_modules():
        if obj in _LIVE:
            continue
        for p in obj._parameters.values():
            layer = by_storage.get(_storage_ptr(p))
            # the same shape too: sharding engines keep flat views over the weights (FSDP's FlatParameter)
            if layer is not None and p.shape == layer.weight.shape:
                raise RuntimeError(
                    f"the base weight of PaCA layer '{getattr(layer, 'paca_name', '?')}' is also held (shared) by a "
                    f"{type(obj).__name__} outside it: PaCA writes its update into that tensor, so the other model "
                    "would change with every optimizer step. Give the other model its own copy of the weights (e.g. "
                    "copy.deepcopy(base) before apply_paca; trl.create_reference_model copies every tensor), or use "
                    "no reference model and compute reference outputs inside "
                    "paca_hpu.disable_paca(model)")
    for layer in layers:
        layer.__dict__["_paca_shared_checked"] = True
