"""An adapter as tensors of a model, no files: which tensors make it (:func:`adapter_state_dict_keys`), a copy of them
(:func:`adapter_state_dict`), the checks a set of them passes before anything is written into a model (``check_*``),
and writing them in (:func:`write_into`), also as ``model.load_state_dict`` of an adapter state dict
(:func:`load_state_dict_pre_hook` / :func:`load_state_dict_post_hook`, which :func:`paca_hpu.adapter.attach`
registers).

The keys, names as in the unwrapped model: ``<name>.delta`` float32 ``(out_features, r)`` and ``<name>.indices`` int64
``(r,)`` of every PaCA layer, and the ``modules_to_save`` parameters (trained copies); in an adapter file these carry
the prefix :data:`MTS_PREFIX`. The files themselves are :mod:`paca_hpu.adapter`, which builds on this
module (:func:`paca_hpu.adapter.save_adapter` writes :func:`adapter_state_dict`, :func:`paca_hpu.adapter.load_adapter`
checks and writes in with the functions here, as ``load_state_dict`` does).
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import device as _device
from . import distributed as _dist
from .config import PaCAConfig
from .layer import PaCALayerBase, is_dtensor
from .modules_to_save import ORIGINAL_PREFIX, keep_originals, originals
from .selection import check_indices
from .targets import find_target_modules, is_supported, name_matches, paca_layers, weight_shape

__all__ = ["adapter_state_dict", "adapter_state_dict_keys", "check_finite", "check_complete", "check_layers_fit",
           "check_modules_to_save", "write_into", "load_state_dict_pre_hook", "load_state_dict_post_hook",
           "MTS_PREFIX"]

#: Prefix of the ``modules_to_save`` parameters in an adapter file: ``modules_to_save.<param_name>``.
MTS_PREFIX = "modules_to_save."
_LOADING = "_paca_loading_adapter"


def _whole_copy(own: torch.Tensor, key: str, shape: Optional[Tuple[int, ...]],
                state_dict: Optional[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """A contiguous CPU copy of ``own`` (an FSDP2 ``DTensor`` made whole), or of ``state_dict[key]`` where ``own``
    is partitioned on this rank (DeepSpeed ZeRO-3 placeholder, FSDP1 flat shard) and a gathered state dict is
    given (the Trainer passes the one DeepSpeed / FSDP gathered; without it ``own`` is whole inside
    :func:`paca_hpu.distributed.whole_parameters`, or a ``DTensor`` gathered here)."""
    partitioned = _dist.is_partitioned(own, shape) if shape is not None else (own.numel() == 0 and own.dim() <= 1)
    if partitioned and (state_dict is not None or not is_dtensor(own)):
        value = None if state_dict is None else state_dict.get(key)
        if value is None or (shape is not None and tuple(value.shape) != tuple(shape)):
            raise ValueError(
                f"'{key}' is partitioned on this rank ({tuple(own.shape)}) and no gathered state dict holds it whole: "
                "call save_adapter on every rank without state_dict (it gathers), or pass a gathered one (DeepSpeed "
                "ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true; FSDP a FULL_STATE_DICT)")
        own = value
    return _dist.whole_tensor(own).detach().to("cpu").contiguous().clone()


def _modules_to_save_parameters(model: nn.Module):
    """``[(name, parameter)]`` of the (trained copies of the) parameters of ``paca_config.modules_to_save`` (names
    without wrapper segments; the frozen originals kept beside the copies are not part of the adapter)."""
    config = getattr(model, "paca_config", None)
    if config is None or not config.modules_to_save:
        return []
    return [(_dist.clean_name(f"{mname}.{pname}"), p) for mname, module in model.named_modules()
            if mname and name_matches(_dist.clean_name(mname), config.modules_to_save)
            for pname, p in module.named_parameters() if not pname.rpartition(".")[2].startswith(ORIGINAL_PREFIX)]


def adapter_state_dict_keys(model: nn.Module) -> set:
    """The keys of a ``model.state_dict()``-style mapping that :func:`adapter_state_dict` reads: ``<name>.delta``
    and ``<name>.indices`` of every PaCA layer and the ``modules_to_save`` parameters (trained copies), names as in
    the unwrapped model. A gathered state dict (DeepSpeed, FSDP) can be cut down to these before it is handed on."""
    model = _dist.unwrap(model)
    keys = {f"{_dist.clean_name(n)}.{t}" for n, _ in paca_layers(model) for t in ("delta", "indices")}
    return keys | {key for key, _ in _modules_to_save_parameters(model)}


def adapter_state_dict(model: nn.Module,
                       state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The tensors :func:`paca_hpu.adapter.save_adapter` writes (contiguous CPU copies): ``<name>.delta`` float32
    ``(out_features, r)``, ``<name>.indices`` int64 ``(r,)`` and ``modules_to_save.<param>``; names as in the
    unwrapped model (DDP, DeepSpeed engine and FSDP wrappers removed).

    Args:
        model: a model with PaCA layers, possibly wrapped by a data-parallel engine.
        state_dict: optional ``model.state_dict()``-style mapping of the unwrapped model (e.g. one DeepSpeed ZeRO-3
            or FSDP gathered) to take tensors from that are partitioned on this rank. Without it, partitioned
            tensors are gathered (ZeRO-3, FSDP, FSDP2): a collective that every rank must call.

    Raises:
        ValueError: the model has no PaCA layers, or a tensor is partitioned and ``state_dict`` lacks it whole.
    """
    model = _dist.unwrap(model)
    layers = [(_dist.clean_name(n), layer) for n, layer in paca_layers(model)]
    if not layers:
        raise ValueError("the model has no PaCA layers; call apply_paca(model, config) before save_adapter")
    extra = _modules_to_save_parameters(model)
    gather = (_dist.whole_parameters(model, [layer.delta for _, layer in layers] + [p for _, p in extra])
              if state_dict is None else contextlib.nullcontext())
    state: Dict[str, torch.Tensor] = {}
    with gather:
        for name, layer in layers:
            delta = _whole_copy(layer.delta, f"{name}.delta", (layer.out_features, layer.r), state_dict)
            state[f"{name}.delta"] = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
            state[f"{name}.indices"] = _whole_copy(layer.indices, f"{name}.indices", (layer.r,),
                                                   state_dict).to(torch.int64)
        for key, p in extra:
            state[f"{MTS_PREFIX}{key}"] = _whole_copy(p, key, None, state_dict)
    return state


def check_finite(tensors: Dict[str, torch.Tensor], where: str) -> None:
    """Every floating-point tensor of the file (deltas, ``modules_to_save`` parameters) is finite.

    Raises:
        ValueError: naming the first tensor (and for a delta its layer) that holds NaN or infinity: a data section
            garbled with the header intact reads as such values, and so does the save of a diverged run.
    """
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            what = (f"layer '{key[: -len('.delta')]}' ('{key}')" if key.endswith(".delta")
                    and not key.startswith(MTS_PREFIX) else f"'{key}'")
            raise ValueError(f"{where}: {bad} of {value.numel()} values of {what} are not finite "
                             "(NaN or inf); the file is garbled, or it was saved from a run whose training diverged: "
                             "restore the file, or save the adapter again from a model with finite values")


def check_complete(model: nn.Module, config: PaCAConfig, names, path) -> None:
    """Every layer ``config`` targets in the un-adapted ``model`` must have a saved delta.

    Raises:
        ValueError: naming the first targeted layer (``named_modules`` order) without ``<name>.delta`` in the file.
    """
    try:
        expected = find_target_modules(model, config)
    except ValueError as err:
        raise ValueError(f"adapter at '{path}' does not fit {type(model).__name__}: {err}") from err
    have = set(names)
    missing = [n for n in expected if n not in have]
    if missing:
        raise ValueError(f"adapter at '{path}' lacks '{missing[0]}.delta' ({len(missing)} of {len(expected)} layers "
                         f"that its target_modules={config.target_modules!r} selects in this model are missing); the "
                         f"file is incomplete, or the adapter was trained on a different model")


def check_layers_fit(model: nn.Module, config: PaCAConfig, tensors: Dict[str, torch.Tensor], names) -> None:
    """Every saved layer ``name`` (``<name>.delta`` ``(out_features, r)``, ``<name>.indices`` ``(r,)``, distinct, in
    ``[0, in_features)``) exists in ``model`` as a linear layer (or a PaCA layer with the same ``r``) of that shape.

    Raises:
        ValueError: naming the first saved layer that does not fit, and why.
    """
    modules = dict(model.named_modules())
    for name in names:
        delta, idx = tensors[f"{name}.delta"], tensors.get(f"{name}.indices")
        module = modules.get(name)
        if idx is None:
            raise ValueError(f"adapter file lacks '{name}.indices'; the file is corrupt")
        if module is None:
            raise ValueError(f"adapter module '{name}' does not exist in {type(model).__name__}; the adapter was "
                             "trained on a different model")
        if isinstance(module, PaCALayerBase):
            out_f, in_f = module.out_features, module.in_features
            if module.r != config.r:
                raise ValueError(f"PaCA layer '{name}' has r={module.r}, the adapter r={config.r}; load onto the "
                                 "un-adapted base model instead")
        elif is_supported(module):
            out_f, in_f = weight_shape(name, module)  # ZeRO-3 placeholders: ds_shape
        else:
            raise ValueError(f"adapter module '{name}' is a {type(module).__name__} in this model, not a linear layer")
        if delta.dim() != 2 or delta.shape[0] != out_f or delta.shape[1] != config.r:
            raise ValueError(
                f"adapter module '{name}' does not fit this model: adapter delta {tuple(delta.shape)} (r={config.r}), "
                f"model layer has out_features={out_f}, in_features={in_f}; the adapter was trained on a different "
                "model")
        try:
            check_indices(idx, in_f, config.r, what=f"the indices of adapter module '{name}'")
        except ValueError as err:
            raise ValueError(f"{err}; the model layer has in_features={in_f}: the adapter was trained on a different "
                             "model, or its file is corrupt") from None


def check_modules_to_save(model: nn.Module, mts: Dict[str, torch.Tensor], names) -> None:
    """Every saved ``modules_to_save`` parameter exists in ``model`` with that shape, outside the PaCA layers.

    Raises:
        ValueError: naming the first parameter that does not fit.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    adapted = set(names)
    for key, value in mts.items():
        module, _, pname = key.rpartition(".")
        if key not in params or not module or pname.startswith(ORIGINAL_PREFIX):
            raise ValueError(f"adapter modules_to_save parameter '{key}' does not exist in this model")
        if module in adapted:
            raise ValueError(f"adapter modules_to_save parameter '{key}' belongs to the PaCA layer '{module}'; the "
                             "adapter file is corrupt")
        if params[key].shape != value.shape:
            raise ValueError(f"adapter modules_to_save parameter '{key}' has shape {tuple(value.shape)}, "
                             f"model has {tuple(params[key].shape)}")


def write_into(model: nn.Module, tensors: Dict[str, torch.Tensor], names: List[str],
               mts: Dict[str, torch.Tensor], scaling: Optional[float]) -> None:
    """Write validated adapter tensors into the PaCA layers ``names`` of ``model`` (``<name>.indices``: other columns
    re-selected, :meth:`PaCALayerBase.set_indices`; ``<name>.delta`` copied in place, so an optimizer holding it
    stays valid; merged columns rewritten) and the ``modules_to_save`` parameters ``mts`` into trainable copies
    beside their frozen originals (:func:`paca_hpu.modules_to_save.keep_originals`, as ``apply_paca`` makes them);
    then the queued work runs (``mark_step`` on HPU, not inside the first training graph). ``scaling`` (None: kept)
    is set on each layer. :func:`paca_hpu.adapter.load_adapter` and ``load_state_dict`` of an adapter
    (:func:`paca_hpu.adapter.attach`) both end here."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            layer, idx = modules[name], tensors[f"{name}.indices"].to("cpu", torch.int64)
            if not torch.equal(layer.indices.to("cpu", torch.int64), idx):
                layer.set_indices(idx)
            if scaling is not None:
                layer.scaling = scaling
            layer.delta.copy_(tensors[f"{name}.delta"].to(layer.delta.dtype))
            layer.sync()
        if mts:
            keep_originals(model, [modules[key.rpartition(".")[0]] for key in mts])
            params = dict(model.named_parameters(remove_duplicate=False))
            for key, value in mts.items():
                params[key].copy_(value.to(params[key].dtype))
                params[key].requires_grad_(True)
    _device.mark_step()


def _fill_originals(module: nn.Module, state_dict, prefix: str) -> None:
    """A full state dict without the ``modules_to_save`` originals (pretrained weights loaded after ``apply_paca``)
    is the base model: its value of such a parameter goes into the frozen original too, not only into the copy."""
    names = {id(m): n for n, m in module.named_modules()}
    for holder, pname in originals(module):
        path = f"{prefix}{names[id(holder)]}." if names[id(holder)] else prefix
        if path + pname in state_dict and path + ORIGINAL_PREFIX + pname not in state_dict:
            state_dict[path + ORIGINAL_PREFIX + pname] = state_dict[path + pname]


def _load_state_dict_adapter(module: nn.Module, state_dict, prefix: str, layers: Dict[str, nn.Module]) -> set:
    """Validate the adapter tensors of ``state_dict`` (keys under ``prefix``) as :func:`paca_hpu.adapter.load_adapter`
    does and write them into ``module`` (:func:`write_into`); they are taken out of ``state_dict``. Returns the keys
    loaded.

    A layer's ``delta`` without its ``indices`` keeps the layer's columns (``strict=False`` loads of deltas only;
    under ``strict=True`` torch reports the indices missing).

    Raises:
        ValueError: a tensor is not finite, a layer's delta has another shape, its indices are out of range or
            repeated (names the layer); a ``modules_to_save`` parameter has another shape.
    """
    tensors = {k: state_dict[prefix + k] for k in adapter_state_dict_keys(module) if prefix + k in state_dict}
    names = [n for n in layers if f"{n}.delta" in tensors]
    mts = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in layers}
    tensors = {k: v for k, v in tensors.items() if k in mts or k.rpartition(".")[0] in names}
    given = set(tensors)
    for name in names:  # deltas without their indices (a partial state dict): the layer keeps its columns, as torch
        tensors.setdefault(f"{name}.indices", layers[name].indices)  # keeps any tensor a state dict lacks
    check_finite(tensors, "adapter state dict")
    first = next(iter(layers.values()))
    check_layers_fit(module, getattr(module, "paca_config", None) or PaCAConfig(r=first.r), tensors, names)
    check_modules_to_save(module, mts, names)
    write_into(module, tensors, names, mts, None)
    for key in given:
        del state_dict[prefix + key]
    return {prefix + k for k in given}


def load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                             error_msgs):
    """``load_state_dict`` pre-hook (``with_module``) of a PaCA model's root (:func:`paca_hpu.adapter.attach`): a state
    dict holding PaCA ``delta`` / ``indices`` and no PaCA ``weight`` is an adapter, checked and written in here (its
    tensors taken out of ``state_dict``); any other gets its ``modules_to_save`` originals filled in and is left to
    torch. Raises ValueError as :func:`check_layers_fit` / :func:`check_modules_to_save` / :func:`check_finite`."""
    layers = dict(paca_layers(module))
    if not layers:
        return
    mts_prefix = prefix + MTS_PREFIX
    for key in [k for k in state_dict if k.startswith(mts_prefix)]:
        state_dict[prefix + key[len(mts_prefix):]] = state_dict.pop(key)
    if not any(f"{prefix}{n}.delta" in state_dict for n in layers) or any(
            f"{prefix}{n}.weight" in state_dict for n in layers):
        _fill_originals(module, state_dict, prefix)
        return  # not an adapter state dict (e.g. a full one): plain torch semantics
    expected = {prefix + k for k in adapter_state_dict_keys(module)}
    loaded = _load_state_dict_adapter(module, state_dict, prefix, layers)
    setattr(module, _LOADING, (prefix, expected - loaded))


def load_state_dict_post_hook(module, incompatible_keys):
    """``load_state_dict`` post-hook paired with :func:`load_state_dict_pre_hook`: after an adapter state dict, only the
    adapter tensors it lacked stay in ``incompatible_keys.missing_keys`` (the frozen base tensors are no part of it)."""
    loading = module.__dict__.pop(_LOADING, None)
    if loading is None:
        return
    prefix, not_loaded = loading
    # of this module, only the adapter tensors the state dict lacked are missing: its frozen base tensors are no part
    # of an adapter (they keep their values), and the adapter tensors were loaded by the pre-hook
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if k in not_loaded or not k.startswith(prefix)]
