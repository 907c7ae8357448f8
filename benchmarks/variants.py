"""The benchmark's training variants, built identically from one base model.

Variants (same model, same data, same targets -- the 7 projections of every LLaMA decoder layer -- and r = 8):

* ``floor``: every weight frozen; the input embeddings' output is made to require grad
  (``PreTrainedModel.enable_input_require_grads``), so backward runs through every layer computing input
  gradients only and there is no optimizer step. The cost floor of any adapter method that trains every layer.
* ``lora``: peft ``LoraConfig(r, lora_alpha=alpha, lora_dropout=0, bias="none")`` on the same targets.
* ``paca``: :func:`paca_hpu.apply_paca` with ``PaCAConfig(r, paca_alpha=alpha)`` on the same targets.
* ``peft_paca``: upstream peft's own PaCA tuner (``peft.PacaConfig(r, paca_alpha=alpha)``, peft's main branch; not
  in peft <= 0.21 on PyPI), used only when the installed peft has it (:func:`peft_paca_unavailable`). It swaps the
  adapted columns into the weight around every GEMM in forward and backward.
* ``full``: full fine-tuning (every parameter trainable, tied embeddings included).

The quality section also trains named settings of a method (:func:`parse_quality_variant`): ``paca-req`` (PaCA at
the r whose trainable-parameter count matches LoRA r's, :func:`paca_r_matching_lora`), ``paca-r16``,
``paca-weight_norm`` / ``paca-activation_norm`` (column selection strategies, ``PaCAConfig.init_indices``), and
combinations such as ``paca-req-activation_norm``; ``lora-r16``.

Precision modes (identical for every variant):

* ``fp32``: model parameters float32, no autocast.
* ``bf16``: model parameters bfloat16 (the paper trains in bf16), no autocast. What stays float32 is each method's
  own choice and is part of what is measured: peft keeps LoRA's A/B in float32 (``autocast_adapter_dtype``) and
  casts each targeted layer's input to float32 for the adapter branch; PaCA's ``delta`` is float32 and its gradient
  is accumulated in float32 from float32 copies of ``grad_y`` and ``x[..., idx]``; ``full`` trains bf16
  parameters in place (no float32 master copy).

The optimizer is ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8, weight decay 0) for every trainable variant.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from paca_hpu import trainable_parameters

__all__ = [
    "VARIANTS",
    "LLAMA_TARGETS",
    "peft_paca_unavailable",
    "DTYPES",
    "ModelSpec",
    "Variant",
    "tiny_llama_config",
    "load_base_model",
    "build_variant",
    "make_optimizer",
    "QUALITY_METHODS",
    "QualityVariant",
    "parse_quality_variant",
    "paca_r_matching_lora",
]

VARIANTS = ("floor", "lora", "paca", "peft_paca", "full")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny_llama_config(**overrides: Any):
    """The ``--tiny`` model: a 2-layer LLaMA (hidden 64, 4 heads / 2 KV heads, vocab 260 = bytes + 2 specials), built in-process
    with random weights; tied embeddings like SmolLM2."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=260,  # benchmarks.inputs.BYTE_VOCAB_SIZE: 256 bytes + <|im_start|> + <|im_end|>
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        initializer_range=0.05,
        pad_token_id=257,
        bos_token_id=256,
        eos_token_id=257,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def peft_paca_unavailable() -> Optional[str]:
    """``None`` when the installed peft has its own PaCA tuner (``peft.PacaConfig``), else a one-line reason naming
    the installed peft version and how to get a peft that has it."""
    try:
        import peft
    except ImportError:
        return "peft is not installed"
    if getattr(peft, "PacaConfig", None) is None:
        return (f"the installed peft {peft.__version__} has no PaCA tuner (peft.PacaConfig; peft <= 0.21 on PyPI has "
                "none): install peft from its main branch in a separate environment to measure it")
    return None


@dataclass
class ModelSpec:
    """Which model to benchmark.

    ``kind``: ``"embedded"`` (SmolLM2-135M-Instruct from :func:`paca_hpu.embedded.embedded_model_path`),
    ``"path"`` (a transformers checkpoint directory or Hub id in ``path``), ``"tiny"`` (see
    :func:`tiny_llama_config`, random weights, byte-level data) or ``"config"`` (a ``LlamaConfig`` JSON file in
    ``path``, random weights, byte-level data unless its vocabulary is larger).
    """

    kind: str = "embedded"
    path: Optional[str] = None
    seed: int = 0
    attn_implementation: str = "sdpa"

    @property
    def random_init(self) -> bool:
        return self.kind in ("tiny", "config")

    def resolved_path(self) -> Optional[str]:
        if self.kind == "embedded":
            from paca_hpu.embedded import embedded_model_path

            return embedded_model_path()
        return self.path

    def describe(self) -> str:
        if self.kind == "embedded":
            return "SmolLM2-135M-Instruct (embedded, real weights)"
        if self.kind == "tiny":
            return "tiny LLaMA (2 layers, hidden 64, random weights)"
        if self.kind == "config":
            return f"LLaMA from config {os.path.basename(self.path or '')} (random weights)"
        return f"{self.path}"

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "seed": self.seed,
                "attn_implementation": self.attn_implementation}


def load_base_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The base ``LlamaForCausalLM`` in ``dtype`` on ``device``, in train mode, every parameter frozen."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec.kind in ("tiny", "config"):
        if spec.kind == "tiny":
            cfg = tiny_llama_config()
        else:
            with open(spec.path, encoding="utf-8") as f:
                cfg = LlamaConfig(**json.load(f))
        cfg._attn_implementation = spec.attn_implementation
        # random init on CUDA itself: a 1B model initialises in seconds there, in tens of seconds on the host
        on_cuda = torch.device(device).type == "cuda"
        with torch.random.fork_rng(devices=[torch.device(device).index or 0] if on_cuda else []):
            torch.manual_seed(spec.seed)
            with torch.device(device if on_cuda else "cpu"):
                model = LlamaForCausalLM(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec.resolved_path(), torch_dtype=dtype, attn_implementation=spec.attn_implementation
        )
    model.to(device=device, dtype=dtype)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    return model


@dataclass
class Variant:
    """A ready-to-train variant: ``model`` (forward takes ``input_ids``/``attention_mask``/``labels``),
    ``params`` (what the optimizer trains; empty for ``floor``), ``trainable`` element count."""

    name: str
    model: nn.Module
    params: List[nn.Parameter] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    note: str = ""


def _targets(model: nn.Module, targets: Sequence[str]) -> List[str]:
    """Qualified names of the targeted linear layers (suffix match), checking every layer has all of them."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no nn.Linear named {list(targets)} in {type(model).__name__}")
    return names


def build_variant(
    name: str,
    base: nn.Module,
    *,
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = LLAMA_TARGETS,
    copy_base: bool = True,
    paca_seed: int = 0,
    init_indices: str = "random",
    calibration_batches: Optional[Sequence[Dict[str, torch.Tensor]]] = None,
) -> Variant:
    """Build variant ``name`` from ``base`` (deep-copied unless ``copy_base=False``).

    ``paca`` chooses its columns with ``init_indices`` (``PaCAConfig.init_indices``); ``"activation_norm"`` runs
    :func:`paca_hpu.calibrate_indices` over ``calibration_batches`` on the copy before converting it.

    Raises:
        ValueError: unknown variant name, unknown ``init_indices``, a data-aware one without batches, or
            ``peft_paca`` with a peft that has no PaCA tuner.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if name == "peft_paca" and peft_paca_unavailable():
        raise ValueError(f"variant peft_paca: {peft_paca_unavailable()}")
    model = copy.deepcopy(base) if copy_base else base
    for p in model.parameters():
        p.requires_grad_(False)
    target_names = _targets(model, targets)
    note = ""
    if name == "floor":
        model.enable_input_require_grads()
        note = "all weights frozen; embedding output requires grad"
    elif name == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none",
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        note = f"peft LoRA r={r} alpha={alpha:g} dropout=0 on {len(target_names)} layers"
    elif name == "paca":
        from paca_hpu import PaCAConfig, apply_paca, calibrate_indices

        cfg = PaCAConfig(r=r, paca_alpha=alpha, target_modules=list(targets), random_seed=paca_seed,
                         init_indices=init_indices)
        indices = calibrate_indices(model, cfg, calibration_batches) if calibration_batches is not None else None
        model = apply_paca(model, cfg, indices=indices)
        note = f"paca_hpu PaCA r={r} paca_alpha={alpha:g} init_indices={init_indices} on {len(target_names)} layers"
    elif name == "peft_paca":
        import peft
        from peft import PacaConfig, get_peft_model

        cfg = PacaConfig(r=r, paca_alpha=alpha, target_modules=list(targets), random_seed=paca_seed,
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        note = f"upstream peft {peft.__version__} PaCA r={r} paca_alpha={alpha:g} on {len(target_names)} layers"
    else:  # full
        for p in model.parameters():
            p.requires_grad_(True)
        note = "every parameter trainable"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = trainable_parameters(model)
    if name == "floor":
        params, trainable = [], 0
    return Variant(name=name, model=model, params=params, trainable=trainable, total=total, note=note)


def make_optimizer(variant: Variant, lr: float, foreach: Optional[bool] = None) -> Optional[torch.optim.Optimizer]:
    """AdamW over the variant's trainable parameters (``None`` for ``floor``)."""
    if not variant.params:
        return None
    return torch.optim.AdamW(variant.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                             foreach=foreach)


# --------------------------------------------------------------------------- quality-section settings

#: Methods the quality section trains (``floor`` trains nothing).
QUALITY_METHODS = ("lora", "paca", "full")


@dataclass(frozen=True)
class QualityVariant:
    """A quality-section setting: ``method`` (lora / paca / full), ``r`` (an int, ``"eq"`` for PaCA at LoRA's
    parameter count, or None for the run's ``--r``) and PaCA's ``init_indices``."""

    spec: str
    method: str
    r: Any = None
    init_indices: str = "random"


def parse_quality_variant(spec: str) -> QualityVariant:
    """``"<method>[-<setting>...]"`` -> :class:`QualityVariant`. Settings: ``r<N>`` (lora, paca), ``req`` (paca at
    the r matching LoRA's trainable-parameter count) and a column selection strategy (paca:
    ``paca_hpu.INIT_INDICES``). Examples: ``paca``, ``paca-req``, ``paca-weight_norm``, ``paca-r16-activation_norm``,
    ``lora-r16``, ``full``.

    Raises:
        ValueError: a malformed spec; the message shows the grammar.
    """
    from paca_hpu.selection import INIT_INDICES

    grammar = (f"expected <method>[-<setting>...] with method one of {', '.join(QUALITY_METHODS)} and settings "
               f"r<N> (lora, paca), req (paca) or a column selection strategy (paca: {', '.join(INIT_INDICES)}), "
               "e.g. paca-req-activation_norm")
    method, *settings = spec.strip().split("-")
    r, init = None, "random"
    if method not in QUALITY_METHODS or (method == "full" and settings) or len(set(settings)) != len(settings):
        raise ValueError(f"quality variant {spec!r}: {grammar}")
    for item in settings:
        if item == "req" and method == "paca" and r is None:
            r = "eq"
        elif item[:1] == "r" and item[1:].isdigit() and int(item[1:]) >= 1 and r is None:
            r = int(item[1:])
        elif item in INIT_INDICES and method == "paca" and init == "random":
            init = item
        else:
            raise ValueError(f"quality variant {spec!r}: setting {item!r} not understood; {grammar}")
    return QualityVariant(spec=spec.strip(), method=method, r=r, init_indices=init)


def paca_r_matching_lora(model: nn.Module, lora_r: int, targets: Sequence[str] = LLAMA_TARGETS) -> int:
    """The PaCA r whose trainable-parameter count matches LoRA r = ``lora_r`` on the targeted layers.

    LoRA adds ``r * (in_features + out_features)`` parameters per layer (A and B), PaCA ``out_features * r``
    (``delta``), so ``r_eq = round(lora_r * sum(in + out) / sum(out))`` over the targeted ``nn.Linear`` layers
    (SmolLM2-135M, 7 projections: ``round(8 * 10176 / 5184) = 16``; Python's ``round``).

    Raises:
        ValueError: that r exceeds the smallest targeted ``in_features`` (PaCA cannot match LoRA there).
    """
    names = set(_targets(model, targets))
    layers = [m for n, m in model.named_modules() if n in names]
    total_in_out = sum(m.in_features + m.out_features for m in layers)
    total_out = sum(m.out_features for m in layers)
    r_eq = int(round(lora_r * total_in_out / total_out))
    smallest = min(m.in_features for m in layers)
    if r_eq > smallest:
        raise ValueError(f"PaCA r matching LoRA r={lora_r} would be {r_eq}, above the smallest targeted in_features "
                         f"({smallest}); lower --r")
    return r_eq
