"""PaCA adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's layout).

``adapter_model.safetensors`` holds, for every PaCA layer ``<name>``:

* ``<name>.delta``   float32 ``(out_features, r)``
* ``<name>.indices`` int64 ``(r,)`` -- always stored, so loading needs no seed and every process agrees;

and ``modules_to_save.<param_name>`` for the parameters of ``modules_to_save``.
``adapter_config.json`` holds the :class:`PaCAConfig` plus ``format``, ``format_version``, ``peft_type`` and
``base_model_name_or_path`` (when the model knows it; a local folder as its absolute path).

``peft_type`` is :data:`PEFT_TYPE`, a sentence rather than a peft method name: transformers hands every directory
with an ``adapter_config.json`` to peft (``AutoModelForCausalLM.from_pretrained(dir)``, ``PeftModel.from_pretrained``),
and peft looks the ``peft_type`` up in its table of methods. With this value the lookup fails with an error that
names the right call, and no peft version (upstream peft has its own ``"PACA"`` tuner with other tensor names)
can mistake the file for one of its adapters and load it half-way. Files written before (``"PACA"``) still load.

This module is the one writer and the one reader of that format, each under two names: :func:`save_adapter` and
``model.save_pretrained`` (:func:`save_pretrained`, which also writes ``model.safetensors``, the same bytes, for
transformers' resume), :func:`load_adapter` and ``model.load_state_dict`` of an adapter state dict; :func:`attach`
sets the second names on a model instance. Every trainer (``transformers.Trainer``, TRL's, paca_hpu's
``PaCATrainerMixin``) saves through ``save_pretrained``; both readers check and write with the same code, that of
:mod:`paca_hpu.adapter_state` (the adapter as tensors of a model: which, copied out, checked, written in, and the
``load_state_dict`` hooks :func:`attach` registers), whose public names are importable from here as before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from . import atomic as _atomic
from . import distributed as _dist
from .adapter_state import (MTS_PREFIX, adapter_state_dict, adapter_state_dict_keys, check_complete,
                            check_finite, check_layers_fit, check_modules_to_save, load_state_dict_post_hook,
                            load_state_dict_pre_hook, write_into)
from .config import PaCAConfig
from .hub import one_line
from .model import apply_paca
from .targets import paca_layers

logger = logging.getLogger(__name__)

__all__ = ["save_adapter", "load_adapter", "read_adapter", "save_pretrained", "attach", "adapter_state_dict_keys",
           "is_paca_adapter_config", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "STATE_DICT_ALIAS",
           "FORMAT_VERSION", "PEFT_TYPE"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: The file name under which the Trainer looks for the weights of a model that is no PeftModel.
STATE_DICT_ALIAS = "model.safetensors"
FORMAT_NAME = "paca_hpu"
FORMAT_VERSION = 1
#: ``peft_type`` written into ``adapter_config.json`` (see the module docstring); ``"PACA"`` in older files.
PEFT_TYPE = ("PACA_HPU (a paca_hpu adapter, not a peft one: load it with paca_hpu.from_pretrained(adapter_dir), or "
             "convert it with python -m paca_hpu export adapter_dir --to lora)")
_OLD_PEFT_TYPES = ("PACA",)

_ATTACHED = "_paca_integration_attached"


def is_paca_adapter_config(meta: Dict) -> bool:
    """Whether ``meta`` (a parsed ``adapter_config.json``) describes a paca_hpu adapter (any format version)."""
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME and (
        meta.get("peft_type") in (PEFT_TYPE, *_OLD_PEFT_TYPES))


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], *,
                 state_dict: Optional[Dict[str, torch.Tensor]] = None,
                 is_main_process: Optional[bool] = None) -> bool:
    """Save the PaCA adapter of ``model`` into directory ``path`` (created if missing).

    Files are written atomically one by one (weights first, config last), so an interrupted save never leaves a
    half-written file; other files in ``path`` (e.g. a Trainer checkpoint's optimizer state) are left alone.

    Data-parallel runs (``model`` may be wrapped: DDP, a DeepSpeed engine, FSDP, FSDP2): when an engine partitions
    the deltas (ZeRO-3, FSDP, FSDP2) every rank must call this (the deltas are gathered with collectives). With
    ``state_dict`` (see :func:`adapter_state_dict`: a gathered state dict, as DeepSpeed ZeRO-3 or FSDP hand to a
    Trainer's save; ``{}`` where the model's own tensors are whole) partitioned tensors come from it and nothing is
    gathered: a partitioned tensor it lacks is an error, never a collective on one rank.

    Args:
        is_main_process: whether this process writes; default: global rank 0 without ``state_dict``, the calling
            process with one (the caller chose it).

    Returns:
        Whether this process wrote the files.

    Raises:
        ValueError: ``model`` has no PaCA layers, or ``state_dict`` lacks a layer's tensors.
        NotADirectoryError: ``path`` exists and is a file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"save_adapter: '{path}' is a file; pass a directory path")
    state = adapter_state_dict(model, state_dict)  # on every rank: it may gather
    if is_main_process is None:
        is_main_process = state_dict is not None or _dist.is_main_process()
    if not is_main_process:
        return False
    model = _dist.unwrap(model)
    config: Optional[PaCAConfig] = getattr(model, "paca_config", None)
    if config is None:  # PaCA layers were built by hand: record what they use
        first = next(layer for _, layer in paca_layers(model))
        config = PaCAConfig(r=first.r, paca_alpha=first.scaling * first.r,
                            target_modules=[_dist.clean_name(n) for n, _ in paca_layers(model)])
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": _base_model_record(model),
        **config.to_dict(),
    }
    _atomic.write_atomic(path / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic.write_json_atomic(path / ADAPTER_CONFIG_NAME, meta, indent=2, sort_keys=True)
    return True


def _base_model_record(model: nn.Module) -> Optional[str]:
    """``model.config._name_or_path`` as the adapter records it: a local folder as its absolute path (so that the
    adapter reloads from any working directory; transformers keeps the path as given, e.g. ``./my-llama``), a Hub
    id as it is; None when the model does not know where it came from."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return os.path.abspath(name) if isinstance(name, str) and os.path.isdir(name) else name


def _garbled(path: Path, err: BaseException) -> ValueError:
    return ValueError(f"adapter file '{path}' is truncated or garbled ({one_line(err)}); save the adapter again or "
                      "restore the file")


def read_adapter(path: Union[str, os.PathLike]):
    """``(PaCAConfig, metadata dict, tensors dict)`` read from an adapter directory.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing (names it).
        ValueError: a file is truncated or garbled (not JSON / not a safetensors file; names it), a tensor holds NaN
            or infinity (names it and its layer), the files are not a paca_hpu adapter, or come from a newer format
            version.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / ADAPTER_CONFIG_NAME, path / ADAPTER_WEIGHTS_NAME
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"PaCA adapter file '{f}' not found; pass the directory written by "
                                    "save_adapter (it holds adapter_config.json and adapter_model.safetensors)")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _garbled(cfg_file, err) from err
    if not isinstance(meta, dict):
        raise _garbled(cfg_file, TypeError(f"a JSON {type(meta).__name__}, not an object"))
    if not is_paca_adapter_config(meta):
        kind = f"a peft {meta.get('peft_type')} adapter" if meta.get("peft_type") else "no paca_hpu adapter"
        raise ValueError(f"'{cfg_file}' is {kind}, not a paca_hpu adapter (format={meta.get('format')!r}); pass a "
                         "directory written by paca_hpu (save_adapter, save_pretrained or a Trainer checkpoint of a "
                         "PaCA model)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"'{cfg_file}' has format_version {meta['format_version']}, newer than this paca_hpu "
                         f"supports ({FORMAT_VERSION}); upgrade paca_hpu")
    try:
        config = PaCAConfig.from_dict(meta)
    except (TypeError, ValueError) as err:
        raise _garbled(cfg_file, err) from err
    try:
        tensors = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _garbled(w_file, err) from err
    check_finite(tensors, f"adapter file '{w_file}'")
    return config, meta, tensors


def _same_name(a: str, b: str) -> bool:
    if a == b:
        return True
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def _warn_other_base(model: nn.Module, meta: dict, path) -> None:
    saved = meta.get("base_model_name_or_path")
    current = getattr(getattr(model, "config", None), "_name_or_path", None)
    if saved and current and not _same_name(str(saved), str(current)):
        logger.warning("adapter at '%s' was trained on base model '%s' but is loaded onto '%s'; unless both are the "
                       "same weights, the result is a different model", path, saved, current)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], *,
                 index_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a PaCA adapter saved by :func:`save_adapter` into ``model`` and return it.

    ``model`` is normally the UN-adapted base model: PaCA is applied to exactly the saved layers with the saved
    indices (no seed needed), the deltas are loaded and the merged weights refreshed, so the logits equal the
    trained model's. If ``model`` already carries PaCA layers with the same names (e.g. a Trainer resuming), they
    are updated in place (their ``delta`` Parameter objects are kept, so an optimizer holding them stays valid).
    Saved ``modules_to_save`` parameters go into trainable copies, the base values kept beside them
    (:func:`paca_hpu.modules_to_save.keep_originals`), so :func:`paca_hpu.disable_paca` still gives the base model.

    Args:
        model: base model (or a PaCA model with the same layers).
        path: adapter directory.
        index_dtype: gather index dtype for new layers (default: int32 on HPU, int64 elsewhere).

    A base model other than the one the adapter records (``base_model_name_or_path``, compared with
    ``model.config._name_or_path``) is loaded onto with a warning naming both. The model returned saves and loads
    its adapter through ``save_pretrained`` / ``load_state_dict`` too (:func:`attach`).

    Raises:
        FileNotFoundError / ValueError: see :func:`read_adapter` (a truncated or garbled file is named; a delta with
            NaN or infinity names its layer).
        ValueError: a saved module is missing from ``model``, is not a linear layer, or has other shapes; a layer
            that the adapter's ``target_modules`` selects in the un-adapted ``model`` has no saved delta; a saved
            ``modules_to_save`` parameter is missing, has another shape or lies in a PaCA layer; the message names
            the first such module.
    """
    config, meta, tensors = read_adapter(path)
    names = [k[: -len(".delta")] for k in tensors if k.endswith(".delta") and not k.startswith(MTS_PREFIX)]
    if not names:
        raise ValueError(f"adapter file '{Path(path) / ADAPTER_WEIGHTS_NAME}' holds no '<layer>.delta' tensor; it "
                         "is not a PaCA adapter or it is incomplete")
    check_layers_fit(model, config, tensors, names)  # everything is validated before the model is touched
    mts = {k[len(MTS_PREFIX):]: v for k, v in tensors.items() if k.startswith(MTS_PREFIX)}
    check_modules_to_save(model, mts, names)
    existing = dict(paca_layers(model))
    if not existing:
        check_complete(model, config, names, path)
    _warn_other_base(model, meta, path)
    if existing:
        extra = sorted(set(existing) - set(names))
        if extra:
            raise ValueError(f"model has PaCA layer '{extra[0]}' that the adapter at '{path}' does not contain; load "
                             "onto the un-adapted base model or a model adapted with the same targets")
    new_names = [n for n in names if n not in existing]
    if new_names:
        apply_paca(model, config, indices={n: tensors[f"{n}.indices"] for n in new_names}, index_dtype=index_dtype)
    model.paca_config = config
    write_into(model, tensors, names, mts, config.scaling)
    return attach(model)


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], *args, state_dict=None,
                    is_main_process: bool = True, **kwargs) -> None:
    """``model.save_pretrained`` of a PaCA model (:func:`attach`): the adapter (:func:`save_adapter`) plus
    ``model.safetensors`` (:data:`STATE_DICT_ALIAS`, the same bytes), never the base weights.

    The arguments are those ``transformers.Trainer._save`` passes (4.x and 5.x; TRL's trainers inherit it).
    ``state_dict`` is as in :func:`save_adapter` (None: gathered here, so every rank of a partitioned model calls
    this, and of the processes with ``is_main_process`` only global rank 0 writes; the Trainer passes the one
    DeepSpeed / FSDP gathered, and paca_hpu's trainer ``{}`` otherwise: then ``is_main_process`` decides). ``safe_serialization`` and the other options of
    ``PreTrainedModel.save_pretrained`` are ignored (the adapter is always safetensors). Once the model has no PaCA
    layers (after ``merge_paca`` / ``unload_paca``) the class's own ``save_pretrained`` runs.

    Raises:
        ValueError: ``save_directory`` holds a ``config.json`` (a full model); ``push_to_hub=True``; see
            :func:`save_adapter`.
    """
    if next(paca_layers(model), None) is None:
        base = getattr(type(model), "save_pretrained", None)
        if base is None:
            raise AttributeError(f"{type(model).__name__} has no save_pretrained")
        return base(model, save_directory, *args, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for a PaCA adapter; save it, then "
                         "upload the directory with huggingface_hub.upload_folder")
    path = Path(save_directory)
    # gathering here (no state_dict): every rank calls this, global rank 0 writes, as save_adapter does
    writes = is_main_process and (state_dict is not None or _dist.is_main_process())
    if writes and (path / "config.json").exists():
        raise ValueError(f"'{path}' holds a full model (config.json); a PaCA adapter saved there would make "
                         "transformers load its model.safetensors as that model. Save into another directory")
    if save_adapter(model, path, state_dict=state_dict, is_main_process=writes):
        _write_alias(path)
    return None


class _AdapterSavePretrained:
    """The bound ``save_pretrained`` :func:`attach` sets on a model instance."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model  # a strong reference: deepcopy / pickle of the model map it to the copy

    def __call__(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        return save_pretrained(self.model, save_directory, *args, **kwargs)


def _write_alias(path: Path) -> None:
    """``model.safetensors`` = ``adapter_model.safetensors`` (hard link, else copy), replaced atomically."""
    def link_or_copy(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(path / ADAPTER_WEIGHTS_NAME, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(path / ADAPTER_WEIGHTS_NAME, tmp)

    _atomic.write_atomic(path / STATE_DICT_ALIAS, link_or_copy)


def attach(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` and ``model.load_state_dict`` of ``model`` (a PaCA model) this module's
    writer and reader, on this instance only (nothing on its class, nothing in any library); idempotent. Returns
    ``model``. :func:`paca_hpu.apply_paca` and :func:`load_adapter` call it.

    * ``save_pretrained``: :func:`save_pretrained`.
    * ``load_state_dict`` (hooks on the root module): a state dict that holds PaCA ``delta`` / ``indices`` but no
      PaCA ``weight`` is an adapter. Its ``modules_to_save.`` keys are mapped to the parameters; its tensors are
      checked and written in as :func:`load_adapter` writes them (other columns re-selected, ``delta`` copied in
      place, so an optimizer holding it stays valid), and the frozen base tensors it does not hold are not reported
      as missing (``strict=True`` works, the Trainer logs no list of "missing keys"); a partial adapter's absent
      layers still are. Any other state dict (e.g. pretrained weights loaded after ``apply_paca``) is the base
      model's, loaded by torch and the layers (``PaCALinear._load_from_state_dict``): where it holds a
      ``modules_to_save`` parameter but not its frozen original (``paca_original_<name>``), the value goes into both.
    """
    if model.__dict__.get(_ATTACHED):
        return model
    model.save_pretrained = _AdapterSavePretrained(model)
    if hasattr(model, "register_load_state_dict_pre_hook"):
        model.register_load_state_dict_pre_hook(load_state_dict_pre_hook)
    else:  # torch < 2.5: the same hook through the older spelling
        model._register_load_state_dict_pre_hook(load_state_dict_pre_hook, with_module=True)
    model.register_load_state_dict_post_hook(load_state_dict_post_hook)
    model.__dict__[_ATTACHED] = True
    return model
