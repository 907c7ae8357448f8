"""Which layers PaCA adapts: target selection and the layer types it supports (peft's ``check_target_module_exists`` /
``_maybe_include_all_linear_layers``).

* :func:`name_matches`: peft's rule by which ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` select
  module names; :func:`find_target_modules`: the layers :func:`paca_hpu.model.apply_paca` converts (``"all-linear"``
  without the output head and layers tied to the input embedding).
* :func:`is_supported`: ``nn.Linear`` or transformers' ``Conv1D`` (bitsandbytes 4-bit layers are recognised by
  :mod:`paca_hpu.layer.quantized4bit`); :func:`weight_shape`: a target's ``(out_features, in_features)``, refusing a
  weight FSDP already sharded.
* :func:`paca_layers`: the layers already converted.

Imported by :mod:`paca_hpu.model` (conversion), :mod:`paca_hpu.modules_to_save`, :mod:`paca_hpu.adapter_state` and
:mod:`paca_hpu.export`; it imports only the config and the layers.
"""

from __future__ import annotations

import re
import sys
from typing import Iterator, List, Sequence, Tuple, Union

from torch import nn

from .config import PaCAConfig
from .layer import PaCALayerBase, is_dtensor
from .layer.quantized4bit import is_linear4bit, linear_features, unsupported_reason

__all__ = ["name_matches", "find_target_modules", "is_supported", "weight_shape", "paca_layers"]


def _conv1d_class():
    """transformers' GPT-2 style ``Conv1D`` if transformers is already imported (never imports it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_supported(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))

def name_matches(name: str, patterns: Union[str, Sequence[str]]) -> bool:
    """Whether the qualified module name ``name`` is selected by ``patterns``, as ``PaCAConfig.target_modules`` /
    ``exclude_modules`` / ``modules_to_save`` select (peft's rule): a string is a regular expression that must match
    the whole name; a list selects names equal to an entry or ending with ``"." + entry``. (``"all-linear"`` is no
    pattern: :func:`find_target_modules` resolves it.)"""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_head_names(model: nn.Module) -> set:
    """Names of the output head and of every layer whose weight is the input embedding's weight."""
    heads = set()
    tied_ids = set()
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = out = None
    try:
        emb = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        emb = None
    try:
        out = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        out = None
    if emb is not None and getattr(emb, "weight", None) is not None:
        tied_ids.add(id(emb.weight))
    for module in model.modules():  # models without get_input_embeddings: any embedding table counts
        if isinstance(module, nn.Embedding):
            tied_ids.add(id(module.weight))
    for name, module in model.named_modules():
        if module is out or name.split(".")[-1] == "lm_head":
            heads.add(name)
        w = getattr(module, "weight", None)
        if w is not None and id(w) in tied_ids and is_supported(module):
            heads.add(name)
    return heads


def find_target_modules(model: nn.Module, config: PaCAConfig) -> List[str]:
    """Qualified names of the layers :func:`apply_paca` would convert, in ``named_modules`` order.

    Raises:
        ValueError: nothing matches (names the patterns and shows some linear layers), or a matched module is
            not an ``nn.Linear`` / ``Conv1D`` (names it), or a match is already a PaCA layer.
    """
    for name, module in model.named_modules():
        if isinstance(module, PaCALayerBase):
            raise ValueError(f"module '{name}' is already a PaCALinear: the model already has PaCA applied; "
                             "call unload_paca(model) or merge_paca(model) first")
    heads = _output_head_names(model) if config.target_modules == "all-linear" else set()
    names: List[str] = []
    linear_names: List[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if is_supported(module):
            linear_names.append(name)
        if config.target_modules == "all-linear":
            matched = is_supported(module) and name not in heads
        else:
            matched = name_matches(name, config.target_modules)
        if not matched or (config.exclude_modules is not None and name_matches(name, config.exclude_modules)):
            continue
        if isinstance(module, PaCALayerBase):
            raise ValueError(f"module '{name}' is already a PaCALinear: the model already has PaCA applied; "
                             "call unload_paca(model) or merge_paca(model) first")
        reason = unsupported_reason(name, module)
        if reason:
            raise ValueError(reason)
        if not is_supported(module):
            raise ValueError(
                f"target module '{name}' is a {type(module).__name__}, which PaCA does not support; PaCA adapts "
                "torch.nn.Linear, transformers Conv1D and bitsandbytes 4-bit Linear4bit layers. Narrow target_modules "
                "to the linear layers (e.g. ['q_proj', 'v_proj'] or 'all-linear')"
            )
        names.append(name)
    if not names:
        shown = ", ".join(linear_names[:8]) + (" ..." if len(linear_names) > 8 else "")
        raise ValueError(
            f"PaCA target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matched "
            f"no layer of {type(model).__name__}. Linear layers in this model: {shown or 'none'}. "
            "Use 'all-linear' or names from that list."
        )
    return names

def weight_shape(name: str, module: nn.Module) -> Tuple[int, int]:
    """``(out_features, in_features)`` of a target layer's base weight. A DeepSpeed ZeRO-3 parameter built under
    ``deepspeed.zero.Init`` is a shape-``(0,)`` placeholder whose real shape is ``ds_shape``.

    Raises:
        ValueError: the weight is already sharded by FSDP / FSDP2 (PaCA must be applied before wrapping).
    """
    if is_linear4bit(module):
        in_features, out_features = linear_features(module)
        return out_features, in_features
    w = module.weight
    shape = tuple(getattr(w, "ds_shape", None) or w.shape)
    expected = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else None
    if is_dtensor(w) or len(shape) != 2 or (expected is not None and shape != expected):
        raise ValueError(f"the weight of layer '{name}' is sharded ({type(w).__name__} of shape {tuple(w.shape)}): "
                         "apply_paca / load_adapter must run on the whole model, before wrapping it with FSDP or "
                         "fully_shard")
    return shape if isinstance(module, nn.Linear) else (shape[1], shape[0])

def paca_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(qualified_name, layer)`` for every PaCA layer in ``model``: every :class:`paca_hpu.layer.PaCALayerBase`
    (dense :class:`PaCALinear`, 4-bit :class:`PaCALinear4bit`), in ``named_modules`` order."""
    for name, module in model.named_modules():
        if isinstance(module, PaCALayerBase):
            yield name, module
