"""The public entry points that tie PaCA's conversion to its adapter files: :func:`apply_paca` and
:func:`from_pretrained` (peft's ``AutoPeftModelForCausalLM.from_pretrained`` for PaCA).

:func:`apply_paca` is :func:`paca_hpu.model.apply_paca` (the conversion, which knows nothing of files) followed by
:func:`paca_hpu.adapter.attach`, which makes that model instance's ``save_pretrained`` and ``load_state_dict`` the
adapter writer and reader of :mod:`paca_hpu.adapter`. That is all ``transformers.Trainer``, TRL's trainers and
``accelerator.unwrap_model(model).save_pretrained`` need for adapter-only checkpoints and exact resumes, with no
paca_hpu trainer class; :class:`paca_hpu.trainer.PaCATrainerMixin` saves through the same ``save_pretrained``. Why
instance hooks: docs/integration.md. The imports run one way: targets, modules_to_save <- model, adapter_state <- adapter
<- integration.
"""

from __future__ import annotations

import os
from typing import Union

from torch import nn

from . import model as _model
from .adapter import attach, load_adapter, read_adapter

__all__ = ["apply_paca", "from_pretrained"]


def apply_paca(model: nn.Module, config, *, indices=None, index_dtype=None) -> nn.Module:
    return attach(_model.apply_paca(model, config, indices=indices, index_dtype=index_dtype))


apply_paca.__doc__ = (_model.apply_paca.__doc__ or "") + """
    The model returned saves and loads its adapter through ``save_pretrained`` / ``load_state_dict``
    (:func:`paca_hpu.adapter.attach`); :func:`paca_hpu.model.apply_paca` is the conversion alone.
    """



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

        from .hub import base_model_source, dtype_kwargs, from_pretrained_cache_first

        source = base_model_source(str(base), None if base_model is not None else str(adapter_dir), fix)
        model = from_pretrained_cache_first(AutoModelForCausalLM.from_pretrained, source,
                                            **dtype_kwargs(torch_dtype), **model_kwargs)
    load_adapter(model, adapter_dir)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model
