"""The model side of training: making a model trainable with PaCA, LoRA or full fine-tuning, and exporting it.

:func:`prepare_model` (PaCA through :func:`paca_hpu.apply_paca`, LoRA through peft ``get_peft_model``, or every
parameter trainable), :func:`paca_config` (the :class:`paca_hpu.PaCAConfig` for command-line style arguments),
:func:`is_paca_model`, :func:`save_merged_model` (a plain transformers checkpoint with the adapter merged in) and
:func:`_fp32_delta_gradients` (PaCA's float32 delta gradients all-reduced in float32 under DeepSpeed).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

PEFT_TYPES = ("paca", "lora", "none")


# --------------------------------------------------------------------------- models


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed engine / torch.compile wrappers (:func:`paca_hpu.distributed.unwrap`)."""
    from ..distributed import unwrap

    return unwrap(model)


def is_paca_model(model: Optional[nn.Module]) -> bool:
    """``model`` carries PaCA layers."""
    from .. import paca_parameters

    if model is None:
        return False
    return bool(paca_parameters(_unwrap(model)))


def _as_target(value: Union[str, Sequence[str], None]) -> Union[str, List[str], None]:
    """``["all-linear"]`` / a one-element regex list from the command line -> the string form."""
    if value is None or isinstance(value, str):
        return value
    value = list(value)
    if len(value) == 1 and (value[0] == "all-linear" or any(c in value[0] for c in "*[]()|^$\\+?")):
        return value[0]
    return value


def paca_config(
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Union[str, Sequence[str], None] = "all-linear",
    exclude_modules: Union[str, Sequence[str], None] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    random_seed: int = 0,
    init_indices: str = "random",
):
    """The :class:`paca_hpu.PaCAConfig` that :func:`prepare_model` applies for these command-line style arguments
    (``target_modules`` / ``exclude_modules``: ``"all-linear"``, one name or regex, a list of names, or None).

    Raises:
        ValueError: invalid field (from :class:`paca_hpu.PaCAConfig`).
    """
    from .. import PaCAConfig

    return PaCAConfig(r=r, paca_alpha=alpha, target_modules=_as_target(target_modules),
                      exclude_modules=_as_target(exclude_modules), random_seed=random_seed,
                      modules_to_save=list(modules_to_save) if modules_to_save else None, init_indices=init_indices)


def _spec_of(config, *given) -> tuple:
    """``config``'s ``(r, paca_alpha, target_modules, exclude_modules, modules_to_save, random_seed, init_indices)``
    for :func:`prepare_model`, which takes a config or these arguments (``given``, in that order), not both;
    ``given`` itself when ``config`` is None.

    Raises:
        ValueError: naming the arguments passed beside ``config`` (not at their defaults).
    """
    if config is None:
        return given
    names = ("r", "alpha", "target_modules", "exclude_modules", "modules_to_save", "random_seed", "init_indices")
    defaults = inspect.signature(prepare_model).parameters
    clash = [n for n, v in zip(names, given) if v != defaults[n].default]
    if clash:
        raise ValueError(f"prepare_model: pass {', '.join(clash)} in config, not beside it")
    return (config.r, config.paca_alpha, config.target_modules, config.exclude_modules, config.modules_to_save,
            config.random_seed, config.init_indices)



def prepare_model(
    model: nn.Module,
    peft_type: str = "paca",
    *,
    r: int = 8,
    alpha: float = 16,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    exclude_modules: Union[str, Sequence[str], None] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    random_seed: int = 0,
    lora_dropout: float = 0.0,
    gradient_checkpointing: bool = False,
    init_indices: str = "random",
    calibration_data: Optional[Iterable] = None,
    lora_dtype: Optional[torch.dtype] = None,
    config=None,
) -> nn.Module:
    """Make ``model`` trainable with ``peft_type`` and return the model to hand to the trainer.

    ``config`` (a :class:`paca_hpu.PaCAConfig`, e.g. the training script's one per run) replaces ``r`` to
    ``init_indices``, which then stay at their defaults (LoRA takes its r, paca_alpha, targets, modules_to_save).

    * ``"paca"``: :func:`paca_hpu.apply_paca` with ``PaCAConfig(r, paca_alpha=alpha, ..., init_indices)`` (in
      place). With ``calibration_data`` (a few training batches, dicts for ``model(**batch)``; needed by a
      data-aware ``init_indices`` such as ``"activation_norm"``) the columns come from
      :func:`paca_hpu.calibrate_indices` over those batches, rank 0's choice broadcast under ``torch.distributed``.
    * ``"lora"``: peft ``get_peft_model`` with ``LoraConfig(r, lora_alpha=alpha, lora_dropout, target_modules,
      exclude_modules, modules_to_save, bias="none", task_type="CAUSAL_LM")``; returns the ``PeftModel``. With
      ``lora_dtype`` the whole ``PeftModel`` is then cast to it (``model.to(lora_dtype)``), as optimum-habana's
      ``run_lora_clm.py`` does with ``--bf16`` (``lora_model.to(torch.bfloat16)``): the LoRA factors, which peft
      creates in float32, and their optimizer state in bf16. PaCA's ``delta`` always stays float32.
    * ``"none"``: every parameter trainable (full fine-tuning).

    With ``gradient_checkpointing`` and a frozen base, the input embeddings are made to require grad
    (``enable_input_require_grads``) so that reentrant checkpointing still back-propagates into the adapters.

    A bitsandbytes 4-bit base (QPaCA, QLoRA) is kept out of bitsandbytes' CPU inference repack
    (:func:`paca_hpu.layer.quantized4bit.prevent_cpu_repack`).

    Raises:
        ValueError: unknown ``peft_type``; no module matches ``target_modules`` (message from apply_paca / peft);
            unknown ``init_indices``, or a data-aware one without ``calibration_data``; a 4-bit layer that
            bitsandbytes already repacked for CPU inference; ``config`` and one of the arguments it replaces.
    """
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"peft_type must be one of {', '.join(PEFT_TYPES)}, got {peft_type!r}")
    r, alpha, target_modules, exclude_modules, modules_to_save, random_seed, init_indices = _spec_of(
        config, r, alpha, target_modules, exclude_modules, modules_to_save, random_seed, init_indices)
    if peft_type == "paca":
        from .. import apply_paca, calibrate_indices

        if config is None:
            config = paca_config(r, alpha, target_modules, exclude_modules, modules_to_save, random_seed, init_indices)
        indices = None if calibration_data is None else calibrate_indices(model, config, calibration_data)
        model = apply_paca(model, config, indices=indices)
    elif peft_type == "lora":
        model = _lora_model(model, r, alpha, lora_dropout, target_modules, exclude_modules, modules_to_save, lora_dtype)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if gradient_checkpointing and peft_type != "none" and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def _lora_model(model: nn.Module, r: int, alpha: float, lora_dropout: float,
                target_modules: Union[str, Sequence[str], None], exclude_modules: Union[str, Sequence[str], None],
                modules_to_save: Optional[Sequence[str]], lora_dtype: Optional[torch.dtype]) -> nn.Module:
    """:func:`prepare_model`'s ``"lora"`` case: the peft ``PeftModel`` over ``model`` (cast to ``lora_dtype`` if
    given), a bitsandbytes 4-bit base kept out of bitsandbytes' CPU repack first.

    Raises:
        ImportError: peft is not installed.
        ValueError: no module matches ``target_modules`` (message from peft).
    """
    target = _as_target(target_modules)
    exclude = _as_target(exclude_modules)
    mts = list(modules_to_save) if modules_to_save else None
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a test/demo dependency
        raise ImportError("peft_type 'lora' needs peft: pip install peft==0.21.2") from err
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=lora_dropout,
        target_modules=target,
        exclude_modules=exclude,
        modules_to_save=mts,
        bias="none",
        task_type="CAUSAL_LM",
    )
    from ..layer.quantized4bit import prevent_cpu_repack

    prevent_cpu_repack(model)  # a repacked bitsandbytes layer passes no gradient to its input (QLoRA's base)
    model = get_peft_model(model, lora_config)
    if lora_dtype is not None:
        model = model.to(lora_dtype)
    return model


def _fp32_delta_gradients(model: Optional[nn.Module], args) -> None:
    """Under DeepSpeed in bf16 or fp16 mode, have PaCA's float32 ``delta`` gradients reduced in float32.

    DeepSpeed communicates gradients in its half-precision dtype unless the config names a
    ``communication_data_type`` (DeepSpeed 0.19.8 ``DeepSpeedEngine.communication_data_type``), so the float32 delta
    gradients were rounded to bf16 before the all-reduce (2 CPU ranks, ZeRO-2, 3 AdamW steps: deltas 5 % apart from
    one process; with float32 communication they are equal). For a PaCA model under a DeepSpeed config that names
    none, ``communication_data_type`` is set to ``"fp32"`` in the config the engine will be built from (the deltas
    are small: ``r / in_features`` of the weights). A config that names one is left as it is."""
    ds = getattr(args, "hf_deepspeed_config", None)
    if not getattr(args, "deepspeed", None) or ds is None or not is_paca_model(model):
        return
    config = ds.config
    half = any(isinstance(config.get(k), dict) and config[k].get("enabled") is True for k in ("bf16", "fp16"))
    if half and "communication_data_type" not in config:
        config["communication_data_type"] = "fp32"
        logger.info("DeepSpeed config: communication_data_type fp32 (PaCA's float32 delta gradients are all-reduced "
                    "in float32, not rounded to bf16 first)")


def save_merged_model(
    model: nn.Module, output_dir: str, tokenizer=None, *, inplace: bool = False, safe_serialization: bool = True
) -> str:
    """Write a plain transformers checkpoint (``AutoModelForCausalLM.from_pretrained`` loads it) with the adapter
    merged in.  Returns ``output_dir``.

    PaCA: :func:`paca_hpu.merge_paca`; LoRA: peft ``merge_and_unload``; full fine-tuning: the model as is.
    ``inplace=False`` (default) merges a deep copy and leaves ``model`` untouched (twice the weight memory for a
    moment); ``inplace=True`` merges ``model`` itself (for the end of a run), after which ``model`` is a plain
    model without adapters.
    """
    model = _unwrap(model)
    if is_paca_model(model):
        from .. import merge_paca

        merged = merge_paca(model if inplace else copy.deepcopy(model))
    elif hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        merged = (model if inplace else copy.deepcopy(model)).merge_and_unload()
    else:
        merged = model
    merged.__dict__.pop("paca_config", None)  # not part of a plain transformers model
    os.makedirs(output_dir, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=safe_serialization)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir
