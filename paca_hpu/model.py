"""Converting a model to PaCA and back (peft-style ``tuners/<method>/model.py``).

* :func:`apply_paca` swaps targeted ``nn.Linear`` / transformers ``Conv1D`` layers for :class:`PaCALinear`, and
  bitsandbytes 4-bit ``Linear4bit`` layers for :class:`paca_hpu.layer.PaCALinear4bit` (QPaCA; 8-bit layers are
  refused). Everything after conversion finds the layers as :class:`paca_hpu.layer.PaCALayerBase` and uses only its
  interface.
* When the merged weights are written (after every optimizer step, before a stale layer's forward, before
  ``state_dict()``) is decided in one place, :mod:`paca_hpu.writeback`; :func:`apply_paca` makes sure its optimizer
  step hook is registered, and :func:`sync_paca` writes back on request.
* :func:`sync_paca`, :func:`disable_paca`, :func:`functional_paca`, :func:`merge_paca`, :func:`unload_paca`.
* ``modules_to_save`` train a copy beside the frozen original (:mod:`paca_hpu.modules_to_save`): :func:`apply_paca`
  makes the copies, :func:`disable_paca` switches the originals in, :func:`unload_paca` puts them back,
  :func:`merge_paca` keeps the copies.
* Which layers are converted is :mod:`paca_hpu.targets` (:func:`find_target_modules`, :func:`name_matches` and
  :func:`paca_layers` are importable from here as before).
* :func:`apply_paca` here is the conversion alone; the public ``paca_hpu.apply_paca`` (:mod:`paca_hpu.integration`)
  also makes the model's ``save_pretrained`` / ``load_state_dict`` handle the adapter (this module knows no files).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .config import PaCAConfig
from .distributed import gathered, wrapping_engine
from .layer import PaCALinear, PaCALinear4bit
from .layer.quantized4bit import (clear_quantization_markers, is_linear4bit, linear_features, prevent_cpu_repack,
                                  unsupported_reason)
from .modules_to_save import ORIGINAL_PREFIX  # noqa: F401 (importable from here, as before the split)
from .modules_to_save import find_modules_to_save, keep_originals, originals_in_place, settle_originals
from .selection import (DATA_AWARE_INIT_INDICES, activation_norms, agree_across_ranks, check_indices,
                        initial_indices, select_indices, top_r)
from .targets import find_target_modules, is_supported, name_matches, paca_layers, weight_shape
from .writeback import install_step_hook, write_back_model

__all__ = [
    "apply_paca",
    "calibrate_indices",
    "sync_paca",
    "disable_paca",
    "functional_paca",
    "merge_paca",
    "unload_paca",
    "paca_layers",
    "paca_parameters",
    "find_target_modules",
    "name_matches",
    "trainable_parameters",
]


# ---------------------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _to_paca(name: str, module: nn.Module, indices: torch.Tensor, scaling: float,
             index_dtype: Optional[torch.dtype]) -> nn.Module:
    if is_linear4bit(module):
        return PaCALinear4bit(module, indices, scaling, index_dtype=index_dtype, name=name)
    if isinstance(module, nn.Linear):
        weight, kind = module.weight, "linear"
    else:  # Conv1D: weight (in, out) -> nn.Linear layout (out, in)
        weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=module.weight.requires_grad)
        kind = "conv1d"
    layer = PaCALinear(weight, module.bias, indices, scaling, base_layer_type=kind, index_dtype=index_dtype)
    layer.train(module.training)
    return layer


def _linear_layout(module: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` / ``Conv1D`` as ``(out_features, in_features)`` (a view, no copy)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def _initial_indices(name: str, module: nn.Module, config: PaCAConfig) -> torch.Tensor:
    """Columns of layer ``name`` for a data-free ``config.init_indices``; a bitsandbytes 4-bit layer has no dense
    weight to rank, so it takes ``"random"`` only (``"activation_norm"`` works on it through
    :func:`calibrate_indices`).

    Raises:
        ValueError: ``"weight_norm"`` on a 4-bit layer (names the layer and the alternatives).
    """
    if is_linear4bit(module):
        if config.init_indices != "random":
            raise ValueError(f"init_indices={config.init_indices!r} ranks the dense weight, but layer '{name}' is "
                             "bitsandbytes 4-bit; use init_indices='random', or 'activation_norm' with "
                             "calibrate_indices(model, config, batches)")
        return select_indices(name, linear_features(module)[0], config.r, config.random_seed)
    with gathered([module.weight]):  # a ZeRO-3 placeholder: whole (every rank the same) for the column choice
        return initial_indices(name, _linear_layout(module), config)


def _target_names(model: nn.Module, config: PaCAConfig, indices: Optional[Dict[str, torch.Tensor]]) -> List[str]:
    """The layers :func:`apply_paca` converts: ``config``'s targets, or exactly the names in ``indices`` (each must be a
    supported linear layer of ``model``; ValueError naming it otherwise)."""
    if indices is None:
        return find_target_modules(model, config)
    names = list(indices)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ValueError(f"adapter module '{name}' does not exist in {type(model).__name__}; the adapter was "
                             "trained on a different architecture")
        reason = unsupported_reason(name, modules[name])
        if reason:
            raise ValueError(reason)
        if not is_supported(modules[name]):
            raise ValueError(f"adapter module '{name}' is a {type(modules[name]).__name__} in this model, not an "
                             "nn.Linear / Conv1D")
    return names


def _plan(model: nn.Module, config: PaCAConfig, names: List[str], indices: Optional[Dict[str, torch.Tensor]]
          ) -> List[Tuple[str, nn.Module, torch.Tensor]]:
    """``(name, module, (r,) int64 indices)`` for each layer to convert, everything checked before the model changes
    (tied weights, the shape and range of given indices; ValueError naming the layer)."""
    # weights shared between modules (tied) cannot carry a PaCA update for one module only
    owners: Dict[int, List[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)

    modules = dict(model.named_modules())
    planned: List[Tuple[str, nn.Module, torch.Tensor]] = []
    for name in names:
        module = modules[name]
        out_features, in_features = weight_shape(name, module)
        sharers = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
        if sharers:
            raise ValueError(f"layer '{name}' shares its weight with {sharers[0]} (tied weights); PaCA cannot adapt "
                             "it alone. Exclude it (exclude_modules) or untie the weights")
        if indices is None:
            idx = _initial_indices(name, module, config)
        else:
            try:
                idx = check_indices(indices[name], in_features, config.r, what=f"adapter indices of '{name}'")
            except ValueError as err:
                raise ValueError(f"{err}; this model's layer has out_features={out_features}, in_features="
                                 f"{in_features}: the indices belong to another model or are corrupt") from None
        planned.append((name, module, idx))
    return planned


def apply_paca(
    model: nn.Module,
    config: PaCAConfig,
    *,
    indices: Optional[Dict[str, torch.Tensor]] = None,
    index_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Convert ``model`` to PaCA in place and return it.

    Every targeted ``nn.Linear`` / ``Conv1D`` becomes a :class:`PaCALinear` (weights reused, no copy for
    ``nn.Linear``); every other parameter is frozen. The parameters of ``config.modules_to_save`` are replaced by
    trainable copies, their originals kept frozen beside them (:func:`keep_originals`; tied weights share one copy, so
    ``["lm_head"]`` of a model with tied embeddings trains the embedding too, as peft with
    ``ensure_weight_tying=True``), so :func:`disable_paca` and :func:`unload_paca` give the base model.

    On a model built under DeepSpeed's ``zero.Init`` (ZeRO-3: ``from_pretrained`` with a ZeRO-3 config, weights are
    ``(0,)`` placeholders with ``ds_shape``), each targeted weight is gathered once, on every rank, to capture its
    original columns; call it on every rank then (it is a collective). Models sharded by FSDP are refused: apply
    PaCA before wrapping.

    Args:
        model: any ``nn.Module`` (typically a transformers ``PreTrainedModel``).
        config: :class:`PaCAConfig`.
        indices: optional ``{qualified_name: (r,) int32 / int64 tensor}`` of distinct columns within the layer's
            ``in_features`` (:func:`paca_hpu.selection.check_indices`); when given, exactly these layers are
            converted with these columns (from :func:`calibrate_indices`, or :func:`paca_hpu.load_adapter`) and
            neither ``target_modules`` nor ``init_indices`` is consulted. Without it, the columns come from
            ``config.init_indices`` (``"random"`` / ``"weight_norm"``; see :mod:`paca_hpu.selection`).
        index_dtype: ``torch.int32`` / ``torch.int64`` for the gather; default int32 on HPU, int64 elsewhere.

    Returns:
        The same ``model`` object; ``model.paca_config`` holds ``config``.

    Raises:
        TypeError: ``model`` is no ``nn.Module`` (e.g. a path string) or ``config`` no :class:`PaCAConfig`.
        ValueError: nothing matches (names the patterns), ``r`` exceeds a layer's ``in_features`` (names the
            layer), a target is not a supported type, a target's weight is tied to another module's, a target's
            weight is sharded by FSDP, the model is already wrapped by a data-parallel engine
            (:func:`paca_hpu.distributed.wrapping_engine`), a name in ``indices`` is missing from the model or its
            indices break :func:`paca_hpu.selection.check_indices` (names the layer), or
            ``config.init_indices`` needs calibration data and no ``indices`` are given (the message names
            :func:`calibrate_indices`), ``modules_to_save`` matches nothing or overlaps a PaCA target, or a
            bitsandbytes 4-bit layer was already repacked for CPU inference
            (:func:`paca_hpu.quantized.prevent_cpu_repack`, which runs here on every ``Linear4bit`` of the model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_paca expects a torch.nn.Module (e.g. AutoModelForCausalLM.from_pretrained(path)), got "
                        f"{type(model).__name__}; load the model first")
    if not isinstance(config, PaCAConfig):
        raise TypeError(f"apply_paca expects a PaCAConfig, got {type(config).__name__}")
    engine = wrapping_engine(model)
    if engine is not None:
        raise ValueError(f"the model is already wrapped by {engine}, which registered its parameters before PaCA's "
                         "deltas existed: they would not be synchronised across ranks, sharded or optimised by it. "
                         "Apply PaCA (apply_paca / load_adapter) to the plain model, then wrap it (DDP, FSDP, "
                         "fully_shard, deepspeed.initialize, a Trainer)")
    planned = _plan(model, config, _target_names(model, config, indices), indices)

    # checked before anything changes: a failed apply_paca leaves the model untouched
    to_save = find_modules_to_save(model, config, [name for name, _, _ in planned])
    prevent_cpu_repack(model)  # 4-bit layers: refused if repacked, never repacked from here on

    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, idx in planned:
        with gathered([module.weight]):  # ZeRO-3 placeholders: whole once, to capture original_columns
            layer = _to_paca(name, module, idx, config.scaling, index_dtype)
        layer.paca_name = name  # for error messages only
        _set_submodule(model, name, layer)
    keep_originals(model, to_save)
    model.paca_config = config
    install_step_hook()
    return model


def calibrate_indices(model: nn.Module, config: PaCAConfig, batches=None) -> Dict[str, torch.Tensor]:
    """The columns :func:`apply_paca` should train in each targeted layer, chosen by ``config.init_indices``; pass
    the result as ``apply_paca(model, config, indices=...)``. (peft's analogue: ``get_eva_state_dict``.)

    ``"activation_norm"`` runs ``model`` (the base model, before conversion) over ``batches`` once, with forward
    pre-hooks on the targeted layers, and keeps the ``r`` input channels of largest L2 norm per layer
    (:func:`paca_hpu.selection.activation_norms`); ``"random"`` and ``"weight_norm"`` need no data and give what
    :func:`apply_paca` alone would. Deterministic given the model and the batches; ties go to the lower index.

    Under an initialised ``torch.distributed`` group every rank gets rank 0's indices (a broadcast), so ranks that
    calibrated on different shards still train the same columns; call it on every rank. Selection happens here,
    before training: the training step keeps its static shapes.

    Args:
        model: the un-converted model (e.g. a transformers ``PreTrainedModel``).
        config: :class:`PaCAConfig`.
        batches: iterable of dicts for ``model(**batch)`` (``input_ids``, ``attention_mask``, ...; padding where
            ``attention_mask`` is 0 is left out) or tensors for ``model(batch)``; a few training batches suffice.
            Moved to the device of the model's first parameter.

    Returns:
        ``{qualified_name: int64 CPU tensor (r,)}``, unique, sorted ascending, in ``find_target_modules`` order.

    Raises:
        ValueError: ``"activation_norm"`` without batches (names the fix), no target matches, ``r`` out of range,
            a targeted layer never ran during the pass, or a bitsandbytes 4-bit layer was already repacked for CPU
            inference (:func:`paca_hpu.quantized.prevent_cpu_repack`, which runs here first).
    """
    names = find_target_modules(model, config)
    modules = dict(model.named_modules())
    prevent_cpu_repack(model)  # the eval-mode pass below must not repack bitsandbytes 4-bit layers
    if config.init_indices in DATA_AWARE_INIT_INDICES:
        if batches is None:
            raise ValueError(f"PaCAConfig(init_indices={config.init_indices!r}) needs calibration data: pass a few "
                             "training batches, calibrate_indices(model, config, batches), or use "
                             "init_indices='random' / 'weight_norm'")
        norms = activation_norms(model, names, batches)
        chosen = {n: top_r(norms[n], config.r, n) for n in names}
    else:
        chosen = {n: _initial_indices(n, modules[n], config) for n in names}
    return agree_across_ranks(chosen)


def paca_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The trainable PaCA tensors of ``model``: every layer's ``delta`` (``(out_features, r)``, float32), in module
    order; empty for a model without PaCA layers. What an optimizer must hold for the write-back hook to fire."""
    return [layer.delta for _, layer in paca_layers(model)]


def sync_paca(model: nn.Module) -> nn.Module:
    """Write ``original_columns + scaling * delta`` into the merged weight of every PaCA layer, now.

    Never needed for correct outputs (the optimizer hook and each layer's forward keep the weights fresh); call it
    before reading ``layer.weight`` directly after changing ``delta`` outside an optimizer step. Returns ``model``."""
    return write_back_model(model)  # the 4-bit layers read delta in every forward: nothing to write


@contextlib.contextmanager
def disable_paca(model: nn.Module):
    """Context manager: inside, every PaCA layer of ``model`` computes exactly the base model's output
    ``x @ W0.T + b`` (bit for bit), as peft's ``disable_adapter()``.

    Nothing is written: the base weight is formed out of place per call (``weight.index_copy(1, idx,
    original_columns)``), so it is safe between a policy forward and its backward (TRL ``DPOTrainer`` with
    ``ref_model=None``); ``delta`` receives no gradient from outputs computed inside. Nests; restores each layer's
    previous state on exit.

    ``modules_to_save`` are the base model's too: each such module computes with the frozen original of its
    parameters (switched in for the block, as peft's ``ModulesToSaveWrapper`` under ``disable_adapter()``), not with
    the trained copy.

    Raises:
        RuntimeError: the model has ``modules_to_save`` and FSDP, FSDP2 or DeepSpeed ZeRO-3 shards its parameters
            (they re-install a module's parameters at each forward, so the originals cannot be switched in)."""
    with _layers_set(model, "_paca_enabled", False), originals_in_place(model):
        yield model


@contextlib.contextmanager
def functional_paca(model: nn.Module):
    """Context manager: inside, every PaCA layer of ``model`` computes ``F.linear(x, W)`` with the merged weight
    ``W = weight.index_copy(1, idx, original_columns + scaling * delta)`` formed out of place by plain autograd ops.

    Same outputs as the fused path; use it for what the fused autograd function cannot do: double backward
    (``torch.autograd.grad(..., create_graph=True)``, gradient penalties) and ``torch.func`` transforms. Costs a
    weight-sized copy per layer call and saves the full input for backward (as LoRA does)."""
    with _layers_set(model, "_functional", True):
        yield model


@contextlib.contextmanager
def _layers_set(model: nn.Module, attr: str, value) -> Iterator[None]:
    """Set ``attr`` of every PaCA layer of ``model`` to ``value`` for the block; each layer's own previous value
    comes back on exit (also on an exception), so the contexts nest."""
    layers = [layer for _, layer in paca_layers(model)]
    prior = [getattr(layer, attr) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, attr, value)
        yield
    finally:
        for layer, was in zip(layers, prior):
            setattr(layer, attr, was)


def _replace_all(model: nn.Module, merged: bool) -> nn.Module:
    for name, layer in list(paca_layers(model)):
        _set_submodule(model, name, layer.merged_layer() if merged else layer.unloaded())
    settle_originals(model, keep_copies=merged)
    if merged:
        clear_quantization_markers(model)
    if hasattr(model, "paca_config"):
        del model.paca_config
    return model


def merge_paca(model: nn.Module) -> nn.Module:
    """Replace every :class:`PaCALinear` by its original layer type (``nn.Linear`` or ``Conv1D``) carrying the
    merged weight ``W0`` with ``W0[:, idx] + scaling * delta``. Nothing PaCA-specific remains; outputs are
    identical to the PaCA model's. In place; returns ``model``. (peft: ``merge_and_unload``.) ``modules_to_save``
    keep their trained copies (tied weights stay tied); their originals are dropped.

    A 4-bit :class:`PaCALinear4bit` becomes a plain float ``nn.Linear`` holding ``dequantize(Wq)`` with the merged
    columns, computed in float32 and rounded once to the dtype the weights had before quantization (see
    :meth:`PaCALinear4bit.merged_weight`); when no bitsandbytes layer is left, transformers' quantization markers
    are dropped so ``save_pretrained`` writes a plain checkpoint.

    Raises:
        ValueError: ``model`` has no PaCA layer (nothing to merge; as peft, whose layer-status helpers raise "No
            adapter layers found in the model" and whose base models have no ``merge_and_unload``)."""
    if next(paca_layers(model), None) is None:
        raise ValueError(f"no PaCA layers in this {type(model).__name__}: nothing to merge; apply_paca(model, config) "
                         "or load_adapter(model, path) first")
    return _replace_all(model, merged=True)


def unload_paca(model: nn.Module) -> nn.Module:
    """Replace every :class:`PaCALinear` by its original layer type with the ORIGINAL weights (bit-for-bit the
    base model; a 4-bit layer gets its very ``Linear4bit`` object back, never modified); the adaptation is
    discarded, ``modules_to_save`` included (their original parameter objects come back; peft's ``unload`` keeps
    the trained copies instead). In place; returns ``model``. (peft: ``unload``.)

    Raises:
        ValueError: ``model`` has no PaCA layer (nothing to unload; see :func:`merge_paca`)."""
    if next(paca_layers(model), None) is None:
        raise ValueError(f"no PaCA layers in this {type(model).__name__}: nothing to unload; apply_paca(model, config) "
                         "or load_adapter(model, path) first")
    return _replace_all(model, merged=False)


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts (elements) of ``model``; tied / shared parameters are counted once
    (``nn.Module.parameters()`` yields each Parameter once); a bitsandbytes 4-bit weight counts its
    ``out x in`` weights, not its packed bytes (peft's ``print_trainable_parameters`` does the same). The frozen
    originals that ``modules_to_save`` keep beside their trained copies count in ``total``, as peft counts its
    ``ModulesToSaveWrapper``'s ``original_module``."""
    trainable = total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: count the weights, not the packed bytes
        n = int(torch.Size(qs.shape).numel()) if qs is not None and getattr(qs, "shape", None) else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total

