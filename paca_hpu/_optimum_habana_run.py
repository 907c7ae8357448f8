"""Workarounds 5, 10 and 11 of :mod:`paca_hpu._optimum_habana` (described there, with the upstream code each works
around): what ``GaudiTrainer``'s CPU path needs around a run, each scoped to the call it wraps. The Gaudi-only
generation-config attributes (:func:`gaudi_generation_fields`, :func:`hidden_generation_fields`), a CPU-only device
map of a bitsandbytes model hidden (:func:`hidden_cpu_device_map`), and ``DistributedDataParallel`` on several CPU
processes (:func:`wrap_ddp_on_multi_cpu`). Import them from :mod:`paca_hpu._optimum_habana`."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List

import torch

logger = logging.getLogger(__name__)

#: Attributes ``_get_input_update_settings`` reads from ``model.generation_config`` (workaround 5).
GAUDI_GENERATION_FIELDS = (
    "attn_softmax_bf16",
    "use_flash_attention",
    "flash_attention_recompute",
    "flash_attention_causal_mask",
)


def _find_generation_config(model):
    if model is None:
        return None
    try:
        gc = getattr(model, "generation_config", None)  # PeftModel forwards to the base model
    except Exception:
        gc = None
    if gc is not None:
        return gc
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        gc = model.__dict__.get("generation_config") if hasattr(model, "__dict__") else None
        if gc is not None:
            return gc
        # unwrap peft (base_model.model), DDP / compile (module, _orig_mod)
        nxt = None
        for attr in ("base_model", "model", "module", "_orig_mod"):
            try:
                cand = getattr(model, attr)
            except AttributeError:
                continue
            if cand is not model and cand is not None:
                nxt = cand
                break
        model = nxt
    return None


@contextlib.contextmanager
def gaudi_generation_fields(model) -> Iterator[List[str]]:
    """Give ``model.generation_config`` the Gaudi-only attributes for the duration (workaround 5).

    Only missing attributes are added (as ``False``) and only those are removed on exit; an existing
    value (e.g. a ``GaudiGenerationConfig`` on HPU, or a user's ``attn_softmax_bf16=True``) is kept.
    Yields the names that were added.  Re-entrant.
    """
    gc = _find_generation_config(model)
    added: List[str] = []
    if gc is not None:
        for name in GAUDI_GENERATION_FIELDS:
            if not hasattr(gc, name):
                setattr(gc, name, False)
                added.append(name)
    try:
        yield added
    finally:
        for name in added:
            gc.__dict__.pop(name, None)


@contextlib.contextmanager
def hidden_generation_fields(model, names) -> Iterator[None]:
    """Temporarily remove ``names`` (added by :func:`gaudi_generation_fields`) from the generation config.

    Used around ``save_pretrained`` inside a training run, so checkpoints keep a clean
    ``generation_config.json``.
    """
    gc = _find_generation_config(model)
    removed = {}
    if gc is not None:
        for name in names:
            if name in gc.__dict__:
                removed[name] = gc.__dict__.pop(name)
    try:
        yield
    finally:
        if gc is not None:
            gc.__dict__.update(removed)


def wrap_ddp_on_multi_cpu(accelerator) -> None:
    """Make ``accelerator`` (a ``GaudiAccelerator``) wrap trainable models in ``DistributedDataParallel`` when it
    runs several CPU processes (accelerate's ``DistributedType.MULTI_CPU``), as upstream does on several HPUs
    (workaround 10).  Patches only this instance's ``prepare_model``; evaluation-mode preparation, frozen models,
    models already wrapped, ``distribution_strategy="fast_ddp"`` (which all-reduces the gradients itself) and every
    other distributed type are left to upstream.
    """
    from accelerate.utils import DistributedType

    upstream = accelerator.prepare_model

    def prepare_model(model, device_placement=None, evaluation_mode=False):
        model = upstream(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        if (evaluation_mode or accelerator.distributed_type != DistributedType.MULTI_CPU
                or getattr(accelerator, "distribution_strategy", "ddp") == "fast_ddp"  # reduces gradients itself
                or isinstance(model, torch.nn.parallel.DistributedDataParallel)
                or not any(p.requires_grad for p in model.parameters())):
            return model
        handler = accelerator.ddp_handler
        model = torch.nn.parallel.DistributedDataParallel(model, **(handler.to_kwargs() if handler else {}))
        if handler is not None:
            handler.register_comm_hook(model)
        logger.info("GaudiTrainer on %d CPU processes: model wrapped in DistributedDataParallel",
                    accelerator.num_processes)
        return model

    accelerator.prepare_model = prepare_model


@contextlib.contextmanager
def hidden_cpu_device_map(model) -> Iterator[bool]:
    """Remove a bitsandbytes-quantized model's ``hf_device_map`` for the duration when every entry is ``"cpu"``
    (workaround 11); yields whether it did. ``model`` may be a wrapper (peft ``PeftModel``): the module that owns
    the attribute is found among ``model.modules()``."""
    owner = None
    if model is not None:
        for module in model.modules():
            dm = module.__dict__.get("hf_device_map")
            if dm and (getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_loaded_in_8bit", False)):
                if {str(v) for v in dm.values()} == {"cpu"}:
                    owner = module
                break
    if owner is None:
        yield False
        return
    saved = owner.__dict__.pop("hf_device_map")
    try:
        yield True
    finally:
        owner.hf_device_map = saved

