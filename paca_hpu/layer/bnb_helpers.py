"""The bitsandbytes side of QPaCA (:mod:`paca_hpu.layer.quantized4bit`): recognising bitsandbytes layers, their 4-bit
quantization state and its dequantization, keeping bitsandbytes' CPU inference repack off, and the quantization
markers of a merged model.

bitsandbytes is imported only when a model already holds its layers; importing this module does not import it.
``from paca_hpu.layer.quantized4bit import is_linear4bit, prevent_cpu_repack, ...`` (and ``paca_hpu.quantized``)
keep working.
"""

from __future__ import annotations

import copy
import sys
from typing import Optional

import torch
from torch import nn

__all__ = ["is_linear4bit", "unsupported_reason", "linear_features", "checked_quant_state", "dequantized",
           "prevent_cpu_repack", "clear_quantization_markers"]


def _bnb_nn():
    """``bitsandbytes.nn`` if bitsandbytes is already imported (never imports it: a model cannot hold its layers
    otherwise)."""
    return sys.modules.get("bitsandbytes.nn")


def is_linear4bit(module: nn.Module) -> bool:
    """``module`` is a ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4, also ``LinearNF4`` / ``LinearFP4``)."""
    bnn = _bnb_nn()
    return bnn is not None and isinstance(module, bnn.Linear4bit)


def unsupported_reason(name: str, module: nn.Module) -> Optional[str]:
    """Why PaCA cannot adapt ``module`` although it is an ``nn.Linear`` subclass, or None.

    bitsandbytes' 8-bit ``Linear8bitLt`` (and any other ``nn.Linear`` subclass whose weight is not a float
    ``(out_features, in_features)`` tensor) is refused: 4-bit (``Linear4bit``) is the supported quantized mode."""
    if is_linear4bit(module) or not isinstance(module, nn.Linear):
        return None
    w = module.weight
    shape = tuple(getattr(w, "ds_shape", None) or w.shape)  # a DeepSpeed ZeRO-3 placeholder has shape (0,)
    bnn = _bnb_nn()
    if bnn is not None and isinstance(module, getattr(bnn, "Linear8bitLt", ())):
        kind = "a bitsandbytes 8-bit Linear8bitLt"
    elif w.is_floating_point() and w.dim() == 1 and shape != (module.out_features, module.in_features):
        return (f"the weight of layer '{name}' is a flat shard of shape {tuple(w.shape)} (FSDP): apply_paca / "
                "load_adapter must run on the whole model, before wrapping it with FSDP or fully_shard")
    elif not (w.is_floating_point() and shape == (module.out_features, module.in_features)):
        kind = f"a {type(module).__name__} with a {w.dtype} weight of shape {tuple(w.shape)}"
    else:
        return None
    return (f"layer '{name}' is {kind}; PaCA adapts plain float nn.Linear / Conv1D layers and bitsandbytes 4-bit "
            "Linear4bit layers. Load the model with BitsAndBytesConfig(load_in_4bit=True) (NF4 or FP4) instead of "
            "8-bit, or exclude the layer (exclude_modules)")


def linear_features(module: nn.Module):
    """``(in_features, out_features)`` of an ``nn.Linear``, a bitsandbytes ``Linear4bit`` (whose packed weight has
    shape ``(out*in/2, 1)``) or a transformers ``Conv1D`` (weight ``(in, out)``)."""
    if is_linear4bit(module):
        return int(module.in_features), int(module.out_features)
    w = module.weight
    if isinstance(module, nn.Linear):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


def _repacked_message(name: str) -> str:
    return (f"bitsandbytes layer '{name}' has been repacked for bitsandbytes' CPU inference kernel (what its "
            "eval-mode forward without gradients does on a CPU with AVX-512 BF16, e.g. an evaluation or a generation "
            "before PaCA was applied); the repack rounds the block scales (absmax) to bfloat16, which a fresh load of "
            "the checkpoint does not give, and bitsandbytes computes no input gradient through a repacked layer. "
            "Reload the model and apply PaCA (apply_paca / load_adapter) before evaluating or generating with it; "
            "evaluate the base model afterwards inside paca_hpu.disable_paca(model)")


def checked_quant_state(base: nn.Module, name: str = ""):
    """The layer's bitsandbytes ``QuantState`` in bitsandbytes' standard packing.

    Raises:
        ValueError: the layer is not quantized yet (bitsandbytes quantizes on ``.to(device)``), or bitsandbytes
            repacked it for its CPU inference kernel (see :func:`prevent_cpu_repack`).
    """
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None or not getattr(w, "bnb_quantized", True):
        raise ValueError(f"Linear4bit '{name}' is not quantized yet (bitsandbytes quantizes when the layer is moved to "
                         "its device: .to('cpu') / .to('cuda') / .to('hpu')); move the model first")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError(_repacked_message(name))
    return qs


def _linear4bit_layers(model: nn.Module):
    """``(name, module)`` of every bitsandbytes ``Linear4bit`` in ``model`` (those inside PaCA layers included)."""
    return [(n, m) for n, m in model.named_modules() if is_linear4bit(m)]


def prevent_cpu_repack(model: nn.Module) -> None:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` in bitsandbytes' standard 4-bit layout for good.

    bitsandbytes (>= 0.50, CPU) repacks a ``Linear4bit`` weight for its AVX-512 BF16 inference kernel at the
    layer's first eval-mode forward without gradients (``support_avx512bf16_for_cpu``, hosts with AVX-512 BF16 only):
    the block scales are rounded to bfloat16 and transposed, double quantization is dropped, later forwards run a
    kernel without autograd (no gradient reaches the layer's input, silently, also in training mode), and
    bitsandbytes' private inverse leaves ``absmax`` transposed when there was no double quantization. Called on the
    whole model, targeted layers or not, by :func:`paca_hpu.apply_paca` (so ``load_adapter``),
    :func:`paca_hpu.calibrate_indices`, :func:`paca_hpu.trainer.prepare_model` before peft LoRA (QLoRA) and the
    benchmark's 4-bit base: the layers then always compute on bitsandbytes' standard 4-bit path (as on AVX2 hosts,
    in training and on other devices). Not undone by ``unload_paca`` / ``merge_paca``. A no-op for a model without
    bitsandbytes layers.

    Raises:
        ValueError: a layer was already repacked (names it, the cause and the fix: reload the model and convert it
            before evaluating or generating); nothing is changed then.
    """
    layers = _linear4bit_layers(model)
    for name, module in layers:
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise ValueError(_repacked_message(name))
    for _, module in layers:
        module.support_avx512bf16_for_cpu = False


def dequantized(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_4bit(weight)`` as a fresh ``(out, in)`` tensor of ``dtype`` (float32 / bf16 / fp16); the values
    are the float32 products code * absmax rounded once to ``dtype``, as bitsandbytes' GEMM uses them."""
    import bitsandbytes.functional as bnbF

    if quant_state.dtype != dtype:
        quant_state = copy.copy(quant_state)  # shallow: shares absmax / code, only the output dtype differs
        quant_state.dtype = dtype
    return bnbF.dequantize_4bit(weight, quant_state)


def clear_quantization_markers(model: nn.Module) -> bool:
    """After merging: make ``save_pretrained`` write a checkpoint that ``from_pretrained`` loads as this model.

    If ``model`` was quantized by transformers' bitsandbytes integration and no bitsandbytes layer is left, its
    quantization markers are dropped (``hf_quantizer``, ``config.quantization_config``, ``is_quantized``..., through
    transformers' ``HfQuantizer.remove_quantization_config``): a plain checkpoint. If some are left (only some layers
    were adapted, e.g. ``q_proj`` / ``v_proj``), the markers stay and every float ``nn.Linear`` / ``Conv1D`` of the
    model (the merged layers, and those never quantized such as ``lm_head``) is listed by its qualified name in
    ``quantization_config.llm_int8_skip_modules`` (transformers' list of layers not to quantize, 4-bit included): the
    reload keeps the merged layers float with their saved weights and the other layers 4-bit with their saved
    quantization states, instead of looking for quantization states of the merged layers. (peft instead re-quantizes
    merged layers to 4 bits, which changes them.) Returns whether the markers were dropped."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not hasattr(quantizer, "remove_quantization_config"):
        return False
    bnn = _bnb_nn()
    if bnn is not None:
        kinds = tuple(k for k in (getattr(bnn, "Linear4bit", None), getattr(bnn, "Linear8bitLt", None)) if k)
        if any(isinstance(m, kinds) for m in model.modules()):
            _skip_float_layers(model, quantizer, kinds)
            return False
    quantizer.remove_quantization_config(model)
    return True


def _skip_float_layers(model: nn.Module, quantizer, quantized_kinds: tuple) -> None:
    """List every float ``nn.Linear`` / ``Conv1D`` of ``model`` in ``llm_int8_skip_modules`` of its quantization
    config(s) (see :func:`clear_quantization_markers`)."""
    from transformers.pytorch_utils import Conv1D

    names = sorted(n for n, m in model.named_modules()
                   if n and isinstance(m, (nn.Linear, Conv1D)) and not isinstance(m, quantized_kinds))
    configs = [getattr(model.config, "quantization_config", None), getattr(quantizer, "quantization_config", None)]
    for qc in {id(c): c for c in configs if c is not None}.values():
        if isinstance(qc, dict):
            qc["llm_int8_skip_modules"] = names
        else:
            qc.llm_int8_skip_modules = names
    if isinstance(getattr(quantizer, "modules_to_not_convert", None), list):
        quantizer.modules_to_not_convert = sorted(set(quantizer.modules_to_not_convert) | set(names))
