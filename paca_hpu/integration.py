"""A PaCA model inside Hugging Face tooling: adapter-only saves and resumes in ``transformers.Trainer``, TRL's
trainers and ``accelerator.unwrap_model(model).save_pretrained``, with no paca_hpu trainer class; one call that
loads a trained adapter onto its base model (:func:`from_pretrained`).

Mechanism (why this one: docs/integration.md). :func:`paca_hpu.apply_paca` calls :func:`attach` on the model, which
sets two things on that model instance, nothing on its class and nothing in any library:

* ``model.save_pretrained``: writes the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, see
  :mod:`paca_hpu.adapter`) and ``model.safetensors``, a hard link to (or, where links fail, a copy of)
  ``adapter_model.safetensors``. ``transformers.Trainer._save`` (4.x and 5.x; TRL's trainers inherit it) calls
  ``model.save_pretrained`` for every checkpoint and final save. The Trainer restores a model that is no
  ``PeftModel`` (resume, ``load_best_model_at_end``) only from ``model.safetensors`` through
  ``model.load_state_dict(state_dict, strict=False)``: hence the second name for the same bytes.
* ``load_state_dict`` hooks on the root module (``register_load_state_dict_pre_hook`` / ``_post_hook``): a state
  dict that holds PaCA ``delta`` / ``indices`` but no PaCA ``weight`` is an adapter. Its ``modules_to_save.`` keys
  are mapped to the parameters and the frozen base tensors it does not hold are not reported as missing (so
  ``strict=True`` works and the Trainer logs no list of "missing keys"); a partial adapter still is. Each
  ``PaCALinear`` re-captures its base columns under the loaded indices and rewrites its merged columns
  (``PaCALinear._load_from_state_dict``). ``delta`` is copied in place, so an optimizer holding it stays valid.
  Any other state dict (e.g. pretrained weights loaded after ``apply_paca``) is the base model's: where it holds a
  ``modules_to_save`` parameter but not its frozen original (``paca_original_<name>``), the value goes into both.

A directory such an instance writes never holds ``config.json``; one that already does is refused (transformers 5
would load the ``model.safetensors`` there as a complete model).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, Union

from torch import nn

from . import model as _model
from .adapter import ADAPTER_WEIGHTS_NAME, _MTS_PREFIX, load_adapter, read_adapter, save_adapter
from .atomic import write_atomic
from .model import ORIGINAL_PREFIX, _originals, name_matches, paca_layers, paca_parameters

__all__ = ["attach", "from_pretrained", "STATE_DICT_ALIAS"]


#: The file name under which the Trainer looks for the weights of a model that is no PeftModel.
STATE_DICT_ALIAS = "model.safetensors"
_ATTACHED = "_paca_integration_attached"
_LOADING = "_paca_loading_adapter"


class _AdapterSavePretrained:
    """``model.save_pretrained`` of a PaCA model: the adapter, never the base weights.

    ``save_pretrained(save_directory, *, state_dict=None, is_main_process=True, **ignored)`` (the arguments
    ``transformers.Trainer._save`` passes in 4.x and 5.x). ``state_dict`` serves only to fill DeepSpeed ZeRO-3
    placeholders; ``safe_serialization`` and other options of ``PreTrainedModel.save_pretrained`` are ignored (the
    adapter is always safetensors). Once the model has no PaCA layers (after ``merge_paca`` / ``unload_paca``) the
    class's own ``save_pretrained`` runs.

    Raises:
        ValueError: ``save_directory`` holds a ``config.json`` (a full model); ``push_to_hub=True``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model  # a strong reference: deepcopy / pickle of the model map it to the copy

    def __call__(self, save_directory: Union[str, os.PathLike], *args, state_dict=None, is_main_process: bool = True,
                 **kwargs):
        model = self.model
        if not paca_parameters(model):
            base = getattr(type(model), "save_pretrained", None)
            if base is None:
                raise AttributeError(f"{type(model).__name__} has no save_pretrained")
            return base(model, save_directory, *args, state_dict=state_dict, is_main_process=is_main_process,
                        **kwargs)
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) is not supported for a PaCA adapter; save it, then "
                             "upload the directory with huggingface_hub.upload_folder")
        if not is_main_process:
            return None
        path = Path(save_directory)
        if (path / "config.json").exists():
            raise ValueError(f"'{path}' holds a full model (config.json); a PaCA adapter saved there would make "
                             "transformers load its model.safetensors as that model. Save into another directory")
        save_adapter(model, path, state_dict=state_dict)
        _write_alias(path)
        return None


def _write_alias(path: Path) -> None:
    """``model.safetensors`` = ``adapter_model.safetensors`` (hard link, else copy), replaced atomically."""
    def link_or_copy(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(path / ADAPTER_WEIGHTS_NAME, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(path / ADAPTER_WEIGHTS_NAME, tmp)

    write_atomic(path / STATE_DICT_ALIAS, link_or_copy)


def _adapter_keys(module: nn.Module, prefix: str) -> set:
    """``model.state_dict()`` keys an adapter of ``module`` holds (with ``prefix``)."""
    keys = set()
    for name, _ in paca_layers(module):
        keys.update((f"{prefix}{name}.delta", f"{prefix}{name}.indices"))
    config = getattr(module, "paca_config", None)
    if config is not None and config.modules_to_save:
        for mname, sub in module.named_modules():
            if mname and name_matches(mname, config.modules_to_save):
                keys.update(f"{prefix}{mname}.{pname}" for pname, _ in sub.named_parameters()
                            if not pname.rpartition(".")[2].startswith(ORIGINAL_PREFIX))
    return keys


def _fill_originals(module: nn.Module, state_dict, prefix: str) -> None:
    """A full state dict without the ``modules_to_save`` originals (pretrained weights loaded after ``apply_paca``)
    is the base model: its value of such a parameter goes into the frozen original too, not only into the copy."""
    names = {id(m): n for n, m in module.named_modules()}
    for holder, pname in _originals(module):
        path = f"{prefix}{names[id(holder)]}." if names[id(holder)] else prefix
        if path + pname in state_dict and path + ORIGINAL_PREFIX + pname not in state_dict:
            state_dict[path + ORIGINAL_PREFIX + pname] = state_dict[path + pname]


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    layers = dict(paca_layers(module))
    if not layers:
        return
    mts_prefix = prefix + _MTS_PREFIX
    for key in [k for k in state_dict if k.startswith(mts_prefix)]:
        state_dict[prefix + key[len(mts_prefix):]] = state_dict.pop(key)
    if not any(f"{prefix}{n}.delta" in state_dict for n in layers) or any(
            f"{prefix}{n}.weight" in state_dict for n in layers):
        _fill_originals(module, state_dict, prefix)
        return  # not an adapter state dict (e.g. a full one): plain torch semantics
    # each PaCALinear re-captures its base columns under the loaded indices and rewrites its merged columns itself
    setattr(module, _LOADING, (prefix, _adapter_keys(module, prefix)))


def _load_post_hook(module, incompatible_keys):
    loading = module.__dict__.pop(_LOADING, None)
    if loading is None:
        return
    prefix, expected = loading
    # this module's frozen base tensors are not part of an adapter: they keep their values and are not missing
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if k in expected or not k.startswith(prefix)]


def attach(model: nn.Module) -> nn.Module:
    """Give ``model`` (a PaCA model) the adapter-only ``save_pretrained`` and the adapter-aware ``load_state_dict``
    described in the module docstring; idempotent. :func:`paca_hpu.apply_paca` calls it. Returns ``model``."""
    if model.__dict__.get(_ATTACHED):
        return model
    model.save_pretrained = _AdapterSavePretrained(model)
    if hasattr(model, "register_load_state_dict_pre_hook"):
        model.register_load_state_dict_pre_hook(_load_pre_hook)
    else:  # torch < 2.5: the same hook through the older spelling
        model._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
    model.register_load_state_dict_post_hook(_load_post_hook)
    model.__dict__[_ATTACHED] = True
    return model


_model.APPLY_CALLBACKS.append(attach)


def _dtype_kwargs(dtype) -> Dict[str, object]:
    """``{"dtype": ...}`` for transformers >= 4.56 (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def from_pretrained(adapter_dir: Union[str, os.PathLike], base_model: Union[str, os.PathLike, nn.Module, None] = None,
                    *, torch_dtype=None, is_trainable: bool = False, **model_kwargs) -> nn.Module:
    """Load a trained PaCA adapter onto its base model for inference (or further training): peft's
    ``AutoPeftModelForCausalLM.from_pretrained`` for PaCA.

    Args:
        adapter_dir: a directory written by ``save_adapter`` / ``save_pretrained`` / a Trainer (final output or
            ``checkpoint-N``).
        base_model: a local checkpoint directory or hub name, or an already loaded model (used as is, adapted in
            place); default: ``base_model_name_or_path`` recorded in the adapter.
        torch_dtype: dtype of the base weights (e.g. ``torch.bfloat16``, ``"auto"``); default transformers'
            (float32). ``delta`` stays float32 (float64 for a float64 model).
        is_trainable: False (default): every parameter frozen, ``eval()`` mode, like peft's inference mode.
        **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``device_map``, ``revision``, ...).

    Returns:
        The base model with the adapter's PaCA layers, merged weights refreshed: its logits equal the trained
        model's.

    A base model path (given or recorded) that is no Hub id is loaded from that folder only, never looked up on the
    Hub; a Hub id is loaded from the local Hugging Face cache when it is there (no network), else from the Hub
    (:func:`paca_hpu.hub.from_pretrained_cache_first`).

    Raises:
        FileNotFoundError / ValueError: ``adapter_dir`` is no paca_hpu adapter (see :func:`paca_hpu.load_adapter`);
            no ``base_model`` given and none recorded; the adapter does not fit the base model.
        paca_hpu.hub.ModelSourceError (a ValueError): the base model is a local path that does not exist (or holds
            no model), or a Hub id that is neither cached nor reachable; one line naming it.
    """
    _, meta, _ = read_adapter(adapter_dir)
    base = base_model if base_model is not None else meta.get("base_model_name_or_path")
    fix = "pass paca_hpu.from_pretrained(adapter_dir, base_model=PATH_OR_NAME)"
    if base is None:
        raise ValueError(f"the adapter in '{adapter_dir}' records no base model; {fix}")
    if isinstance(base, nn.Module):
        model = base
    else:
        from transformers import AutoModelForCausalLM

        from .hub import base_model_source, from_pretrained_cache_first

        source = base_model_source(str(base), None if base_model is not None else str(adapter_dir), fix)
        model = from_pretrained_cache_first(AutoModelForCausalLM.from_pretrained, source,
                                            **_dtype_kwargs(torch_dtype), **model_kwargs)
    load_adapter(model, adapter_dir)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model
