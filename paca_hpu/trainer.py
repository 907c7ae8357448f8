"""Trainer integration: the right Hugging Face trainer for the device, with adapter-only PaCA checkpoints.

Device -> trainer (the device is decided by :mod:`paca_hpu.device`):

* HPU  -> optimum-habana ``GaudiTrainer`` + ``GaudiTrainingArguments(use_habana=True, use_lazy_mode=...)`` +
  ``GaudiConfig(use_fused_adam=True, use_fused_clip_norm=True)``.
* CPU  -> where optimum-habana is installed (the ``gaudi`` extra), the same ``GaudiTrainer`` with ``use_cpu=True,
  use_habana=False, use_lazy_mode=False`` (optimum-habana's CPU path: it runs the Gaudi training loop without an
  HPU; see :mod:`paca_hpu._optimum_habana` for what that takes); elsewhere (e.g. transformers 5.x, which
  optimum-habana 1.21 does not support) plain ``transformers.Trainer``.
* CUDA -> plain ``transformers.Trainer`` (``GaudiTrainer`` has no CUDA path).

The same code runs three fine-tuning methods (``peft_type``): ``"paca"`` (this package), ``"lora"`` (peft
0.21.2 ``LoraConfig``, same rank / alpha / target modules, dropout 0 by default) and ``"none"`` (full fine-tuning).

With PaCA the trainer writes adapter-only checkpoints through the base class's ``_save``, which calls the model's
own ``save_pretrained`` (:func:`paca_hpu.adapter.save_pretrained`: the adapter files plus ``model.safetensors``, the
same bytes), so a checkpoint holds the files a plain ``model.save_pretrained`` writes, plus the usual trainer /
optimizer / scheduler / RNG state, never the base weights.  Resuming (``trainer.train(resume_from_checkpoint=...)``)
and ``load_best_model_at_end`` load the adapter into the adapted model with :func:`paca_hpu.load_adapter`, the
reader of :func:`paca_hpu.from_pretrained` (in place: the ``delta`` Parameters the optimizer holds are kept, the
merged weight columns rewritten), so training continues exactly where it stopped.

Of PaCA itself this module uses the package's public API (``PaCAConfig``, ``apply_paca``, ``calibrate_indices``,
``paca_parameters``, ``sync_paca``, ``load_adapter``, ``merge_paca``) plus
:func:`paca_hpu.adapter.adapter_state_dict_keys`, :func:`paca_hpu.distributed.unwrap` and
:func:`paca_hpu.quantized.prevent_cpu_repack`; besides, it imports
:mod:`paca_hpu.checkpoints`, :mod:`paca_hpu.device` and :mod:`paca_hpu._optimum_habana`. After the optimizer steps
that PaCA's global write-back hook does not see, :class:`_WriteBackGuard` asks :mod:`paca_hpu.writeback` to write
back (:func:`~paca_hpu.writeback.hook_covers`, :func:`~paca_hpu.writeback.write_back_model`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import inspect
import logging
import os
import shutil
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import checkpoints as _ckpt
from . import device as _device
from . import writeback as _wb
from . import _optimum_habana as _oh

logger = logging.getLogger(__name__)

__all__ = [
    "PEFT_TYPES",
    "is_paca_model",
    "prepare_model",
    "build_training_arguments",
    "make_trainer",
    "check_engine",
    "check_hpu_graphs_args",
    "weight_partitioning_engine",
    "start_deepspeed_comm",
    "zero3_before_training",
    "trainer_class",
    "PaCATrainerMixin",
    "save_merged_model",
    "resolve_checkpoint",
    "ThroughputCallback",
    "side_seconds",
]

PEFT_TYPES = ("paca", "lora", "none")


# --------------------------------------------------------------------------- models


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed engine / torch.compile wrappers (:func:`paca_hpu.distributed.unwrap`)."""
    from .distributed import unwrap

    return unwrap(model)


def is_paca_model(model: Optional[nn.Module]) -> bool:
    """``model`` carries PaCA layers."""
    from . import paca_parameters

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
    from . import PaCAConfig

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
    target = _as_target(target_modules)
    exclude = _as_target(exclude_modules)
    mts = list(modules_to_save) if modules_to_save else None
    if peft_type == "paca":
        from . import apply_paca, calibrate_indices

        if config is None:
            config = paca_config(r, alpha, target_modules, exclude_modules, modules_to_save, random_seed, init_indices)
        indices = None if calibration_data is None else calibrate_indices(model, config, calibration_data)
        model = apply_paca(model, config, indices=indices)
    elif peft_type == "lora":
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
        from .layer.quantized4bit import prevent_cpu_repack

        prevent_cpu_repack(model)  # a repacked bitsandbytes layer passes no gradient to its input (QLoRA's base)
        model = get_peft_model(model, lora_config)
        if lora_dtype is not None:
            model = model.to(lora_dtype)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if gradient_checkpointing and peft_type != "none" and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


# --------------------------------------------------------------------------- training arguments


def _training_args_classes():
    """``(GaudiTrainingArguments or None, transformers.TrainingArguments)``."""
    from transformers import TrainingArguments

    gta = None
    if _oh.is_optimum_habana_installed():
        _, gta, _ = _oh.gaudi_classes()
    return gta, TrainingArguments


def arguments_class(device_type: Optional[str] = None, deepspeed: bool = False):
    """The training-arguments dataclass a run on ``device_type`` uses (for ``HfArgumentParser``).

    HPU and CPU: ``GaudiTrainingArguments`` (CPU falls back to ``TrainingArguments`` when optimum-habana is not
    installed); CUDA: ``transformers.TrainingArguments``.  CPU with ``deepspeed``: ``transformers.TrainingArguments``
    (the ``transformers.Trainer`` path), because ``GaudiTrainingArguments`` refuse DeepSpeed without an HPU ("This
    version of DeepSpeed must be run on HPUs": optimum-habana expects Habana's DeepSpeed fork on Gaudi), while
    ``transformers.Trainer`` runs stock DeepSpeed on its CPU accelerator.
    """
    device_type = device_type or _device.device_type()
    gta, ta = _training_args_classes()
    if device_type == "hpu":
        if gta is None:
            raise ImportError("Training on HPU needs optimum-habana: pip install optimum-habana==1.21.2")
        return gta
    if device_type == "cpu" and gta is not None and not deepspeed:
        return gta
    return ta


def start_deepspeed_comm(args) -> None:
    """Prepare DeepSpeed's communication on CPU processes before the model is built, when ``args`` (training
    arguments) run DeepSpeed there; a no-op without DeepSpeed or off CPU.

    * DeepSpeed's shared-memory all-reduce op (``deepspeed_shm_comm``) is switched off. Its CPU communication
      backend JIT-compiles that C++ op when it starts (about 3 minutes on 2 cores, needs a C++ toolchain, and a lock
      file left by an interrupted build makes every later start wait forever), yet the op serves only
      ``inference_all_reduce`` (tensor-parallel inference); training collectives go through gloo either way
      (DeepSpeed 0.19.8 ``deepspeed/comm/torch.py``).
    * With several processes, DeepSpeed's backend is started: with ``use_cpu=True`` transformers' argument set-up
      starts torch.distributed (gloo) but not DeepSpeed's backend (it does that only for accelerators), so a ZeRO-3
      ``from_pretrained`` (``deepspeed.zero.Init``) reads a world size of 1 and fails its batch-size check
      ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
      ``deepspeed.init_distributed`` reuses the process group already there.
    """
    if not getattr(args, "deepspeed", None) or args.device.type != "cpu":
        return
    import deepspeed

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
    if args.world_size > 1:
        deepspeed.init_distributed(dist_backend="gloo")


def weight_partitioning_engine(args) -> Optional[str]:
    """``"DeepSpeed ZeRO-3"`` or ``"FSDP"`` when ``args`` (training arguments) select an engine that partitions the
    model's weights across the ranks (``--deepspeed`` with a stage-3 config, ``--fsdp`` with any strategy but
    ``no_shard``), else ``None``."""
    ds = getattr(args, "hf_deepspeed_config", None)
    if getattr(args, "deepspeed", None) and ds is not None and ds.is_zero3():
        return "DeepSpeed ZeRO-3"
    fsdp = getattr(args, "fsdp", None) or []
    options = fsdp.split() if isinstance(fsdp, str) else [str(getattr(o, "value", o)) for o in fsdp]
    if options and "no_shard" not in options:
        return "FSDP"
    return None


def check_engine(args, device_type: Optional[str] = None) -> None:
    """Refuse a distributed engine in ``args`` (training arguments) that the trainer cannot honour on
    ``device_type`` (default: this machine's), before a model is wrapped.

    Refused: ``--fsdp`` on CPU. accelerate's FSDP needs an accelerator device ("There are currently no available
    devices found" from both ``transformers.Trainer`` and ``GaudiTrainer``); torch's own FSDP runs on CPU processes
    and is tested through the torch API (README, "Multiple devices").

    Raises:
        ValueError: naming the engine and what to use instead.
    """
    device_type = device_type or _device.device_type()
    if getattr(args, "fsdp", None) and device_type == "cpu":
        raise ValueError(
            "--fsdp needs CUDA or HPU devices: accelerate's FSDP does not run on CPU processes. On CPU, run "
            "data-parallel without --fsdp (torchrun --nproc_per_node N ...), or shard with DeepSpeed "
            "(--deepspeed scripts/ds_zero3.json partitions the weights like FSDP full_shard)")


def _ignore_gaudi_only(v: Dict[str, Any], explicit: Optional[set], info: _device.DeviceInfo, cls) -> None:
    """Off HPU, in ``v`` (training-argument values): every HPU-only flag
    (:data:`paca_hpu._optimum_habana.HPU_ONLY_FIELDS`) is set to the value that asks for nothing, or dropped where
    ``cls`` has no such field, and so is every GaudiTrainer option ``cls`` lacks (``GAUDI_TRAINER_FIELDS``). One
    warning for each of them that was given (``explicit``: the names given; None: every key of ``v``) with a value that
    asks for something."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}

    def given(name, off):
        return name in v and (explicit is None or name in explicit) and v[name] != off

    for name, (off, why) in _oh.HPU_ONLY_FIELDS.items():
        if given(name, off):
            logger.warning("--%s has no effect without Gaudi (HPU), and this run is on %s: ignored (%s).", name,
                           info.type, why)
        if name in defaults:
            v[name] = defaults[name] if off is None else off
        else:
            v.pop(name, None)
    for name, (off, why) in _oh.GAUDI_TRAINER_FIELDS.items():
        if name in defaults:
            continue
        if given(name, off):
            logger.warning("--%s is an option of optimum-habana's GaudiTrainer; %s has none: ignored (%s).", name,
                           cls.__name__, why)
        v.pop(name, None)


def check_hpu_graphs_args(args) -> None:
    """Refuse HPU graphs for training (``use_hpu_graphs_for_training``) together with gradient checkpointing;
    ``args``: training arguments or a dict of their values.

    A checkpointed block recomputes its forward inside the backward, in Python, which a graph replay does not run;
    optimum-habana's own examples switch HPU graphs off for gradient checkpointing after core dumps
    (huggingface/optimum-habana#646).

    Raises:
        ValueError: both are on; the message says to drop one of the two flags.
    """
    get = args.get if isinstance(args, dict) else lambda name: getattr(args, name, None)
    if get("use_hpu_graphs_for_training") and get("gradient_checkpointing"):
        raise ValueError("--use_hpu_graphs_for_training cannot be combined with --gradient_checkpointing (a graph "
                         "replay skips the recomputation the checkpointed blocks run in Python during backward; "
                         "optimum-habana turns HPU graphs off for it too): drop one of the two flags")


def _adjust_for_hpu(v: Dict[str, Any], info: _device.DeviceInfo, explicit: Optional[set]) -> Dict[str, Any]:
    """:func:`adjust_for_device` on an HPU."""
    v["use_habana"] = True
    v["use_cpu"] = False
    if v.get("use_lazy_mode", True) and not info.lazy_mode:
        logger.info("PT_HPU_LAZY_MODE=0: running HPU in eager / torch.compile mode (use_lazy_mode=False).")
        v["use_lazy_mode"] = False
    if v.get("torch_compile") or v.get("torch_compile_backend"):
        if v.get("use_lazy_mode", True):
            # optimum-habana asserts that the two are mutually exclusive; say how to get torch.compile
            raise ValueError("--torch_compile needs the HPU in eager mode, but lazy mode is on: start Python "
                             "with PT_HPU_LAZY_MODE=0 (and --use_lazy_mode False), or drop --torch_compile")
        v["torch_compile"] = True
        v["torch_compile_backend"] = _oh.compile_backend_for("hpu", v.get("torch_compile_backend"))
    check_hpu_graphs_args(v)
    if "dataloader_drop_last" not in (v if explicit is None else explicit):
        v["dataloader_drop_last"] = True  # a ragged last batch is a new shape: one more graph compilation
    if v.get("include_num_input_tokens_seen") and (explicit is None or "include_num_input_tokens_seen" in explicit):
        logger.warning("--include_num_input_tokens_seen makes GaudiTrainer gather a device tensor over all cards and "
                       "read it on the host after every micro-batch (a host synchronisation each time); the "
                       "throughput summary counts tokens on the host without it")
    return v


def adjust_for_device(values: Dict[str, Any], info: Optional[_device.DeviceInfo] = None, cls=None,
                      explicit: Optional[set] = None) -> Dict[str, Any]:
    """Rewrite training-argument ``values`` (field -> value) for the device before the dataclass is built.

    HPU: ``use_habana=True``, lazy mode only if ``PT_HPU_LAZY_MODE`` allows it, ``torch.compile`` backend
    ``hpu_backend`` by default, ``dataloader_drop_last=True`` unless given (static batch shapes), and a warning
    for an explicit ``include_num_input_tokens_seen`` (a host synchronisation per micro-batch).  Elsewhere every
    HPU-only flag is set to the value that asks for nothing (or dropped
    where ``cls`` lacks it), with one warning for each one given (``explicit``: the names the user gave; default:
    every key of ``values``) that asked for something (workaround 12 in :mod:`paca_hpu._optimum_habana`).  CPU (the
    GaudiTrainer emulation path): ``use_cpu=True``, ``half_precision_backend="cpu_amp"`` and an ``aot_eager`` compile
    backend (workarounds 3, 4 and 8).  ``transformers.TrainingArguments`` (CUDA, CPU without optimum-habana):
    GaudiTrainer options it lacks are dropped, with a warning for each one given.

    Raises:
        ValueError: ``--torch_compile`` with lazy mode on HPU; HPU graphs for training with gradient checkpointing
            (:func:`check_hpu_graphs_args`).
    """
    info = info or _device.get_device_info()
    cls = cls or arguments_class(info.type)
    v = dict(values)
    is_gaudi_args = any(f.name == "use_habana" for f in dataclasses.fields(cls))
    if info.type == "hpu":
        return _adjust_for_hpu(v, info, explicit)
    _ignore_gaudi_only(v, explicit, info, cls)
    if info.type == "cpu" and is_gaudi_args:
        v["use_cpu"] = True
        if v.get("bf16"):
            v["half_precision_backend"] = "cpu_amp"
        if v.get("torch_compile") or v.get("torch_compile_backend"):
            v["torch_compile"] = True
            v["torch_compile_backend"] = _oh.compile_backend_for("cpu", v.get("torch_compile_backend"))
        return v
    # CUDA, or CPU without optimum-habana: transformers.TrainingArguments
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in [k for k in v if k not in names]:
        del v[key]  # e.g. throughput_warmup_steps, which run_paca_clm.py's summary honours itself
    if info.type == "cpu":
        v["use_cpu"] = True
        if v.get("torch_compile") or v.get("torch_compile_backend"):  # as on GaudiTrainer's CPU path: aot_eager
            v["torch_compile"] = True
            v["torch_compile_backend"] = _oh.compile_backend_for("cpu", v.get("torch_compile_backend"))
    if v.get("torch_compile_backend") == "hpu_backend":
        v["torch_compile_backend"] = _oh.compile_backend_for(info.type, "hpu_backend")
    return v


def build_training_arguments(info: Optional[_device.DeviceInfo] = None, **values):
    """Training arguments for the device (see :func:`adjust_for_device`); ``values`` are dataclass fields.

    Example (CPU, tests)::

        args = build_training_arguments(output_dir=tmp, max_steps=4, per_device_train_batch_size=2)
    """
    info = info or _device.get_device_info()
    cls = arguments_class(info.type)
    v = adjust_for_device(values, info, cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(v) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    return cls(**v)


# --------------------------------------------------------------------------- trainers


def resolve_checkpoint(resume_from_checkpoint: Union[str, bool, None], output_dir: str) -> Optional[str]:
    """``True`` / ``"true"`` / ``"last"`` -> the newest complete checkpoint of the latest run in ``output_dir``; a
    path is checked and kept (see :func:`paca_hpu.checkpoints.resolve_checkpoint`).

    Raises:
        FileNotFoundError: asked for the last checkpoint but there is none, the path does not exist, or it is no
            complete Trainer checkpoint (no ``trainer_state.json``).
    """
    return _ckpt.resolve_checkpoint(resume_from_checkpoint, output_dir)


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def _drop_empty_param_groups(optimizer) -> None:
    """Remove parameter groups without parameters from a freshly built ``torch.optim.Optimizer`` (in place; before
    its first step nothing refers to a group by position). Other objects are left alone."""
    if isinstance(optimizer, torch.optim.Optimizer) and not optimizer.state:
        kept = [g for g in optimizer.param_groups if g["params"]]
        if kept and len(kept) < len(optimizer.param_groups):
            optimizer.param_groups[:] = kept


@contextlib.contextmanager
def _plain_cpu_device(args):
    """While inside, ``args.device`` is ``torch.device("cpu")`` if it is an indexed CPU device (``cpu:0``); restored
    on exit. ``TrainingArguments.device`` returns ``_setup_devices``, a transformers ``cached_property`` that keeps
    its value in the attribute ``__cached__setup_devices``."""
    device = args.device
    cache = "__cached__setup_devices"
    if device.type != "cpu" or device.index is None or getattr(args, cache, None) is not device:
        yield
        return
    setattr(args, cache, torch.device("cpu"))
    try:
        yield
    finally:
        setattr(args, cache, device)


def zero3_before_training(trainer) -> bool:
    """Whether ``trainer`` runs DeepSpeed ZeRO-3 and has no engine yet (nothing trained or evaluated so far)."""
    if not (getattr(trainer, "is_deepspeed_enabled", False) and getattr(trainer, "deepspeed", None) is None):
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def _without_deepspeed_before_training(trainer):
    """Evaluation before ``train()`` under DeepSpeed: ZeRO stage 1 or 2 runs on the plain model; ZeRO-3 is noted.

    ``transformers.Trainer.evaluation_loop`` starts a DeepSpeed inference engine when no training engine exists yet,
    and DeepSpeed refuses that below stage 3 ("ZeRO inference only makes sense with ZeRO Stage 3"), so the held-out
    loss before training (what ``run_paca_clm`` reports) could not be measured. Below stage 3 every rank holds the
    whole model, so evaluating it without an engine gives the same loss. The model the evaluation registered with the
    accelerator is unregistered again, so the training engine built later is the accelerator's only model.
    Under ZeRO-3 the inference engine stays (the parameters are partitioned; only an engine can run them), and
    ``train()`` would reuse it and fail without a training engine (transformers 4.55: ``'NoneType' object has no
    attribute 'backward'``): :meth:`PaCATrainerMixin.train` refuses that with the fix (``eval_on_start``).
    """
    if not (getattr(trainer, "is_deepspeed_enabled", False) and getattr(trainer, "deepspeed", None) is None):
        yield
        return
    if zero3_before_training(trainer):
        trainer._paca_zero3_inference_engine = True
        yield
        return
    known = list(trainer.accelerator._models)
    trainer.is_deepspeed_enabled = False
    try:
        yield
    finally:
        trainer.is_deepspeed_enabled = True
        trainer.accelerator._models[:] = known


class _WriteBackGuard(_callback_base()):
    """Writes back PaCA's merged columns (:func:`paca_hpu.writeback.write_back_model`) after each optimizer step that
    the global post-hook does not cover (:func:`paca_hpu.writeback.hook_covers`); a no-op with ordinary torch
    optimizers, so no double write-back."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._needed = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._needed = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = _unwrap(self.trainer.model)
        if self._needed is None:
            self._needed = not _wb.hook_covers(self.trainer.optimizer, model)
            if self._needed:
                logger.info("optimizer %s is not covered by PaCA's step hook: syncing PaCA weights after each step",
                            type(self.trainer.optimizer).__name__)
        if self._needed:
            _wb.write_back_model(model)


_MISSING = object()


@contextlib.contextmanager
def _quantized_base_accepted(model: Optional[nn.Module]):
    """transformers' ``Trainer.__init__`` refuses a quantized model (``model.is_quantized``) unless it is a peft
    ``PeftModel`` or carries adapters loaded through transformers' peft integration (``_hf_peft_config_loaded``)
    ("You cannot perform fine-tuning on purely quantized models"). A PaCA model on a 4-bit base (QPaCA) has trainable
    adapters, so for the duration of ``__init__`` only it is marked as such; the mark is removed again (it also
    changes what ``save_pretrained`` writes)."""
    inner = _unwrap(model) if model is not None else None
    mark = (inner is not None and getattr(inner, "is_quantized", False) and is_paca_model(inner)
            and not getattr(inner, "_hf_peft_config_loaded", False))
    saved = inner.__dict__.get("_hf_peft_config_loaded", _MISSING) if mark else _MISSING
    if mark:
        inner._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if mark:
            if saved is _MISSING:
                del inner.__dict__["_hf_peft_config_loaded"]
            else:
                inner._hf_peft_config_loaded = saved


class PaCATrainerMixin:
    """Adds to a ``transformers.Trainer`` subclass (``GaudiTrainer`` or ``Trainer``):

    * adapter-only checkpoints for PaCA models: ``_save`` through the model's own ``save_pretrained`` (the files a
      plain ``model.save_pretrained`` writes; :func:`_paca_save_state_dict`), resume (``_load_from_checkpoint``)
      and ``load_best_model_at_end`` (``_load_best_model``) through ``load_adapter``;
    * a PaCA write-back after every optimizer step that PaCA's global step hook does not see (DeepSpeed ZeRO style
      optimizers; see :class:`_WriteBackGuard`);
    * the Gaudi-only ``generation_config`` fields for the duration of ``train`` / ``evaluate`` / ``predict``
      (workaround 5 in :mod:`paca_hpu._optimum_habana`), hidden again while a checkpoint is written;
    * schedule-free optimizers (``optim="schedule_free_*"``, package ``schedulefree``) switched to train mode for
      each training step and to eval mode for evaluation / prediction, as ``transformers.Trainer`` does
      (optimum-habana 1.21's ``GaudiTrainer`` has those calls commented out, so ``step()`` raised "Optimizer was
      not in train mode"); the switches are idempotent, so ``transformers.Trainer``'s own calls are harmless;
    * atomic checkpoints for every method (:mod:`paca_hpu.checkpoints`): checkpoint ``N`` is written into
      ``tmp-checkpoint-N/`` and renamed to ``checkpoint-N`` when complete; a full disk raises
      :class:`paca_hpu.checkpoints.CheckpointWriteError` ("no space left on ...") and leaves no checkpoint folder;
    * run lineage: ``paca_run_id`` (the resumed checkpoint's, else a new one) is recorded in ``output_dir`` and in
      every checkpoint, and ``save_total_limit`` rotation and ``train(resume_from_checkpoint=True)`` consider only
      this run's checkpoints (an earlier run's ``checkpoint-N`` in the same ``output_dir`` is left alone).
    * PaCA on a bitsandbytes 4-bit base (QPaCA) passes transformers' "purely quantized model" check
      (:func:`_quantized_base_accepted`); on the CPU ``GaudiTrainer`` a bitsandbytes model's CPU-only
      ``hf_device_map`` is hidden during ``train`` / ``evaluate`` / ``predict`` (workaround 11 in
      :mod:`paca_hpu._optimum_habana`).

    LoRA (``PeftModel``) and full fine-tuning keep the base class's behaviour otherwise.
    """

    _paca_gen_fields_added: Tuple[str, ...] = ()
    _paca_staging: Optional[str] = None
    #: Id of the run this trainer trains (set by ``train``); only the saving process's value is ever written.
    paca_run_id: Optional[str] = None

    def __init__(self, *args, **kwargs):
        with _quantized_base_accepted(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)
        self.add_callback(_WriteBackGuard(self))

    # -- optimizer train / eval mode (schedule-free optimizers) -----------------------------------
    def _optimizer_mode(self, mode: str) -> None:
        switch = getattr(self.optimizer, mode, None)  # AcceleratedOptimizer forwards train() / eval()
        if callable(switch):
            switch()

    def training_step(self, model, inputs, *args, **kwargs):
        self._optimizer_mode("train")
        self._paca_tokens = getattr(self, "_paca_tokens", 0) + _host_token_count(self.model, inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        self._optimizer_mode("eval")
        return super().evaluation_loop(*args, **kwargs)

    def prediction_loop(self, *args, **kwargs):
        self._optimizer_mode("eval")
        return super().prediction_loop(*args, **kwargs)

    def create_optimizer(self):
        """The base class's optimizer without empty parameter groups.

        ``transformers.Trainer.create_optimizer`` always builds a weight-decay and a no-decay group; with adapters
        (PaCA ``delta``, LoRA ``lora_A``/``lora_B``: no biases or norms trainable) the no-decay group is empty.
        DeepSpeed ZeRO drops empty groups from the optimizer it wraps, while the LR scheduler built on the trainer's
        optimizer keeps one learning rate per original group, so the first ``lr_scheduler.step()`` fails with
        ``zip() argument 2 is longer than argument 1`` (transformers 4.55, torch 2.13). ``GaudiTrainer`` already
        filters empty groups (for its FusedAdamW); this does the same for ``transformers.Trainer``.
        """
        optimizer = super().create_optimizer()
        _drop_empty_param_groups(optimizer)
        return optimizer

    # -- generation_config fields (workaround 5) --------------------------------------------------
    def _with_gen_fields(self, fn, *args, **kwargs):
        cpu_gaudi = hasattr(self.args, "use_habana") and not self.args.use_habana
        with _oh.gaudi_generation_fields(self.model) as added, \
                (_oh.hidden_cpu_device_map(self.model) if cpu_gaudi else contextlib.nullcontext()):
            outer = self._paca_gen_fields_added
            if added:
                self._paca_gen_fields_added = tuple(added)
            try:
                return fn(*args, **kwargs)
            finally:
                self._paca_gen_fields_added = outer

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if getattr(self, "_paca_zero3_inference_engine", False):
            raise RuntimeError(
                "this trainer evaluated before training under DeepSpeed ZeRO-3, which left it a DeepSpeed inference "
                "engine that train() cannot train with (transformers 4.55 fails with \"'NoneType' object has no "
                "attribute 'backward'\"): evaluate before training with TrainingArguments(eval_on_start=True) "
                "instead, or build a new trainer for training")
        resume_from_checkpoint = self._begin_run(resume_from_checkpoint)
        return self._with_gen_fields(super().train, resume_from_checkpoint, *args, **kwargs)

    # -- run lineage and atomic checkpoints (paca_hpu.checkpoints) ---------------------------------
    def _begin_run(self, resume_from_checkpoint):
        """Resolve ``True`` to this output_dir's latest run's newest complete checkpoint, take over the run id of
        the checkpoint resumed (else a new one), detach that run's checkpoints beyond the one resumed
        (:func:`paca_hpu.checkpoints.detach_abandoned`), record the run id in ``output_dir`` and clear staging folders
        left by a killed save.  Returns the checkpoint to resume from (or None)."""
        out = self.args.output_dir
        if resume_from_checkpoint is True:
            resume_from_checkpoint = _ckpt.last_checkpoint(out) if os.path.isdir(out) else None
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({out})")
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        inherited = _ckpt.read_run_id(resume_from_checkpoint) if resume_from_checkpoint else None
        self.paca_run_id = inherited or _ckpt.new_run_id()
        if self.args.should_save:
            os.makedirs(out, exist_ok=True)
            for _step, staging in _ckpt.staging_dirs_in(out):
                shutil.rmtree(staging, ignore_errors=True)
            if inherited:
                for path in _ckpt.detach_abandoned(out, inherited, resume_from_checkpoint):
                    logger.warning("'%s' was trained past the checkpoint this run resumes from; it is kept, but is "
                                   "no longer part of this run ('last' will not resume it, rotation will not delete "
                                   "it)", path)
            _ckpt.write_run_id(out, self.paca_run_id)
        return resume_from_checkpoint

    def _get_output_dir(self, trial):
        if self._paca_staging is not None:  # inside _save_checkpoint: the base class writes into the staging folder
            return self._paca_staging
        return super()._get_output_dir(trial)

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        # transformers <= 4.x rotates through this method (transformers 5 through trainer_utils.rotate_checkpoints,
        # which then only sees the staging folder): this run's checkpoints only, after the new one is in place
        if self._paca_staging is None:
            _ckpt.rotate(output_dir or self.args.output_dir, self.paca_run_id, self.args.save_total_limit,
                         self.state.best_model_checkpoint)

    def _sorted_checkpoints(self, output_dir=None, checkpoint_prefix="checkpoint", use_mtime=False):
        found = super()._sorted_checkpoints(output_dir=output_dir, checkpoint_prefix=checkpoint_prefix,
                                            use_mtime=use_mtime)
        if self.paca_run_id is None:
            return found
        return [path for path in found if _ckpt.read_run_id(path) == self.paca_run_id]

    def _save_checkpoint_atomic(self, model, trial, *args, **kwargs):
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        staging = _ckpt.staging_dir(final)
        if self.paca_run_id is None:
            self.paca_run_id = _ckpt.new_run_id()
        if self.args.should_save and os.path.lexists(staging):
            shutil.rmtree(staging)
        self._paca_staging = staging
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
            self._paca_staging = None
            self._publish_checkpoint(staging, final, run_dir)
        except BaseException as err:
            self._paca_staging = None
            full = _ckpt.is_disk_full(err, run_dir)  # before the cleanup frees the space again
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise _ckpt.CheckpointWriteError(
                    errno.ENOSPC, f"no space left on {run_dir} while writing {os.path.basename(final)} (the partial "
                                  "checkpoint was removed); free some space or pass an --output_dir on another "
                                  "disk") from err
            raise

    def _publish_checkpoint(self, staging: str, final: str, run_dir: str) -> None:
        """Rename the finished ``staging/checkpoint-N`` to ``final`` (saving process only, after all ranks wrote),
        then rotate this run's checkpoints."""
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
        if self.args.should_save:
            inner = os.path.join(staging, os.path.basename(final))
            best = self.state.best_model_checkpoint
            if best and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
                # the base class saw the checkpoint under its staging name: record its final name
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                if _ckpt.is_complete(inner):
                    self.state.save_to_json(os.path.join(inner, _ckpt.TRAINER_STATE_NAME))
            _ckpt.write_run_id(inner, self.paca_run_id)
            _ckpt.publish(staging, final)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _ckpt.rotate(run_dir, self.paca_run_id, self.args.save_total_limit, self.state.best_model_checkpoint)

    def evaluate(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            with _without_deepspeed_before_training(self):
                return self._with_gen_fields(super().evaluate, *args, **kwargs)
        finally:
            self._paca_eval_seconds = getattr(self, "_paca_eval_seconds", 0.0) + time.perf_counter() - t0
            self._paca_evals = getattr(self, "_paca_evals", 0) + 1

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._save_checkpoint_atomic(model, trial, *args, **kwargs)
        finally:
            self._paca_checkpoint_seconds = getattr(self, "_paca_checkpoint_seconds", 0.0) + time.perf_counter() - t0

    def predict(self, *args, **kwargs):
        return self._with_gen_fields(super().predict, *args, **kwargs)

    # -- saving ----------------------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        model = _unwrap(self.model)
        if is_paca_model(model):
            state_dict = _paca_save_state_dict(model, state_dict)
        with _oh.hidden_generation_fields(model, self._paca_gen_fields_added):
            return super()._save(output_dir, state_dict=state_dict)

    # -- loading ---------------------------------------------------------------------------------
    def _load_optimizer_and_scheduler(self, checkpoint):
        """Upstream's, with ``args.device`` read as plain ``cpu`` while it runs on CPU processes.

        Under ``torchrun`` on CPU ``args.device`` is ``cpu:0``, and both ``transformers.Trainer`` and ``GaudiTrainer``
        load the optimizer state with ``torch.load(..., map_location=args.device)`` in multi-process runs, which torch
        2.13 rejects (``don't know how to restore data location ... (tagged with cpu:0)``), so no multi-process CPU
        run could resume. Upstream: ``_load_optimizer_and_scheduler`` of both trainers.
        """
        with _plain_cpu_device(self.args):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        if is_paca_model(target):
            from . import load_adapter

            logger.info("Resuming PaCA adapter from %s", resume_from_checkpoint)
            load_adapter(_unwrap(target), resume_from_checkpoint)  # in place: the optimizer's deltas are kept
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _load_best_model(self):
        if is_paca_model(self.model) and self.state.best_model_checkpoint:
            from . import load_adapter

            logger.info("Loading best PaCA adapter from %s", self.state.best_model_checkpoint)
            load_adapter(_unwrap(self.model), self.state.best_model_checkpoint)
            return None
        return super()._load_best_model()


def _paca_save_state_dict(model: nn.Module, state_dict):
    """What ``PaCATrainerMixin._save`` hands the base class's ``_save`` as ``state_dict`` for a PaCA model, whose
    ``save_pretrained`` (:func:`paca_hpu.adapter.save_pretrained`) the base class then calls: of a state dict
    DeepSpeed / FSDP gathered, only the adapter's tensors (``GaudiTrainer._save`` copies every tensor it is given
    to the CPU); without one, ``{}``: ``_save`` runs on the saving process only, so nothing may be gathered there
    (a collective would wait for the other ranks forever), and with ``{}`` a partitioned tensor is an error instead
    (a ``None`` would also make ``GaudiTrainer._save`` copy the whole ``model.state_dict()``).

    Raises:
        TypeError: ``model`` is no transformers ``PreTrainedModel``: the base class would save its state dict itself,
            not through ``save_pretrained``.
    """
    from transformers import PreTrainedModel

    from .adapter import adapter_state_dict_keys

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"a PaCA {type(model).__name__} is no transformers PreTrainedModel: the Trainer would save its "
                        "whole state dict instead of the adapter; train a transformers model (AutoModelForCausalLM), "
                        "or save with paca_hpu.save_adapter yourself")
    if state_dict is None:
        return {}
    keys = adapter_state_dict_keys(model)
    return {k: v for k, v in state_dict.items() if k in keys}


def side_seconds(trainer) -> Dict[str, float]:
    """Time a trainer with :class:`PaCATrainerMixin` spent off the optimizer steps so far (wall seconds, since it was
    built): ``{"evaluation": s, "evaluations": count of evaluate() calls, "checkpoint": s}``; zeros for any other
    trainer or ``None``."""
    return {"evaluation": float(getattr(trainer, "_paca_eval_seconds", 0.0)),
            "evaluations": int(getattr(trainer, "_paca_evals", 0)),
            "checkpoint": float(getattr(trainer, "_paca_checkpoint_seconds", 0.0))}


def _host_token_count(model, inputs) -> int:
    """Tokens of one micro-batch, padding included, read from the shape of its main input (``input_ids``): host-side
    metadata, no device synchronisation (0 when the batch has no such tensor)."""
    name = getattr(_unwrap(model), "main_input_name", "input_ids") if model is not None else "input_ids"
    value = inputs.get(name) if hasattr(inputs, "get") else None
    return int(value.numel()) if isinstance(value, torch.Tensor) else 0


def _sum_over_ranks(trainer, value: int) -> int:
    """``value`` summed over the data-parallel ranks of ``trainer`` (one collective; the value itself when alone)."""
    args = getattr(trainer, "args", None)
    if args is None or getattr(args, "world_size", 1) <= 1:
        return int(value)
    total = trainer.accelerator.gather(torch.tensor([int(value)], dtype=torch.int64, device=args.device))
    return int(total.sum().item())


class ThroughputCallback(_callback_base()):
    """Training throughput without warm-up, evaluation and checkpoint time.

    Counts input tokens (padding included) on the host, from the shape of each micro-batch that
    :class:`PaCATrainerMixin` trains on (summed over the data-parallel ranks once, at the end), from the end of the
    first ``warmup_steps`` optimizer steps of this ``train()`` call (graph compilation on HPU) to its end; time spent
    in ``evaluate`` and ``_save_checkpoint`` meanwhile is subtracted (tracked by :class:`PaCATrainerMixin`). Other
    trainers: ``state.num_input_tokens_seen`` (``include_num_input_tokens_seen=True``, which ``GaudiTrainer``
    counts with a device all-gather and a host read after every micro-batch). The device is synchronised at both
    marks (queued device work belongs to the steps before the mark).  After training: ``tokens``, ``seconds``,
    ``steps``, ``tokens_per_second`` (``None`` when nothing was measured).
    """

    def __init__(self, trainer=None, warmup_steps: int = 0):
        self.trainer = trainer
        self.warmup_steps = max(0, int(warmup_steps))
        self.tokens = self.seconds = self.steps = self.tokens_per_second = None
        self._mark = None

    def _tokens(self, state) -> int:
        if isinstance(self.trainer, PaCATrainerMixin):
            return int(getattr(self.trainer, "_paca_tokens", 0))
        return int(state.num_input_tokens_seen)

    def _now(self, state):
        _device.synchronize()
        side = side_seconds(self.trainer)
        off_steps = side["evaluation"] + side["checkpoint"]
        return time.perf_counter(), off_steps, self._tokens(state), state.global_step

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_step = state.global_step
        self._mark = self._now(state) if self.warmup_steps == 0 else None

    def on_step_end(self, args, state, control, **kwargs):
        if self._mark is None and state.global_step - self._start_step >= self.warmup_steps:
            self._mark = self._now(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self._mark is None:
            return
        t1, side1, tok1, step1 = self._now(state)
        t0, side0, tok0, step0 = self._mark
        self.seconds = max(1e-9, (t1 - t0) - (side1 - side0))
        local = int(tok1 - tok0)
        self.tokens = _sum_over_ranks(self.trainer, local) if isinstance(self.trainer, PaCATrainerMixin) else local
        self.steps = int(step1 - step0)
        self.tokens_per_second = self.tokens / self.seconds if self.steps > 0 and self.tokens > 0 else None


_TRAINER_CLASSES: Dict[str, type] = {}


def trainer_class(kind: str) -> type:
    """``"gaudi"`` -> ``PaCAGaudiTrainer`` (optimum-habana ``GaudiTrainer`` + mixin); ``"hf"`` -> ``PaCATrainer``."""
    if kind in _TRAINER_CLASSES:
        return _TRAINER_CLASSES[kind]
    if kind == "gaudi":
        GaudiTrainer, _, _ = _oh.gaudi_classes()

        class PaCAGaudiTrainer(PaCATrainerMixin, GaudiTrainer):
            """``GaudiTrainer`` with adapter-only PaCA checkpoints; also runs without an HPU (``use_cpu=True``), on
            several CPU processes data-parallel (workaround 10 in :mod:`paca_hpu._optimum_habana`)."""

            def create_accelerator_and_postprocess(self):
                super().create_accelerator_and_postprocess()
                _oh.wrap_ddp_on_multi_cpu(self.accelerator)

            def train(self, *args, **kwargs):
                # before upstream's train() swaps in its lazy-mode checkpoint function process-wide
                check_hpu_graphs_args(self.args)
                return super().train(*args, **kwargs)

            def _wrap_model(self, model, training=True, dataloader=None):
                # HPU graphs for training: upstream wraps the model with ModuleCacher here; the guard
                # (paca_hpu.hpu_graphs) then runs before every call, outside the replayed graph
                wrapped = super()._wrap_model(model, training=training, dataloader=dataloader)
                if training and getattr(self.args, "use_hpu_graphs_for_training", False):
                    from .hpu_graphs import guard_hpu_graphs

                    guard_hpu_graphs(model)
                return wrapped

            def log(self, logs: Dict[str, float], start_time: Optional[float] = None, end_time: Optional[float] = None):
                # Workaround 6: upstream GaudiTrainer.log() calls get_hpu_memory_stats(), which imports
                # habana_frameworks; off HPU do the same bookkeeping with paca_hpu.device's memory numbers.
                if self.args.use_habana:
                    return super().log(logs, start_time=start_time, end_time=end_time)
                if self.state.epoch is not None:
                    logs["epoch"] = self.state.epoch
                if self.args.include_num_input_tokens_seen:
                    logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
                    if start_time is not None and end_time is not None:
                        from optimum.habana.utils import speed_metrics

                        logs.update(
                            speed_metrics("train", start_time, end_time, num_tokens=self.state.num_input_tokens_seen)
                        )
                logs.update(_device.memory_stats(self.args.device.type))
                output = {**logs, **{"step": self.state.global_step}}
                self.state.log_history.append(output)
                self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

        cls = PaCAGaudiTrainer
    elif kind == "hf":
        from transformers import Trainer

        class PaCATrainer(PaCATrainerMixin, Trainer):
            """``transformers.Trainer`` with adapter-only PaCA checkpoints (CUDA, or CPU without optimum-habana)."""

        cls = PaCATrainer
    else:
        raise ValueError(f"trainer kind must be 'gaudi' or 'hf', got {kind!r}")
    _TRAINER_CLASSES[kind] = cls
    return cls


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


def make_trainer(
    model: nn.Module,
    args,
    *,
    train_dataset=None,
    eval_dataset=None,
    data_collator=None,
    processing_class=None,
    callbacks=None,
    gaudi_config=None,
    **kwargs,
):
    """The trainer for ``args``: ``GaudiTrainingArguments`` -> ``PaCAGaudiTrainer`` (with an explicit
    ``GaudiConfig``: ``--gaudi_config_name`` on HPU if given, else fused AdamW + fused clip-norm on HPU and neither
    off HPU), otherwise ``PaCATrainer``.

    Under DeepSpeed in bf16 / fp16 mode a PaCA model's delta gradients are all-reduced in float32
    (:func:`_fp32_delta_gradients`).

    Raises:
        ValueError: an engine the trainer cannot honour on this device (see :func:`check_engine`).
    """
    check_engine(args, args.device.type)
    _fp32_delta_gradients(model, args)
    is_gaudi = hasattr(args, "use_habana")
    common = dict(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=processing_class,
        callbacks=callbacks,
        **kwargs,
    )
    if is_gaudi:
        if gaudi_config is None and args.use_habana and getattr(args, "gaudi_config_name", None):
            _, _, GaudiConfig = _oh.gaudi_classes()
            gaudi_config = GaudiConfig.from_pretrained(args.gaudi_config_name)  # the user's choice, on HPU
        if gaudi_config is None:
            gaudi_config = _oh.make_gaudi_config(use_habana=bool(args.use_habana))
        return trainer_class("gaudi")(gaudi_config=gaudi_config, **common)
    return trainer_class("hf")(**common)


# --------------------------------------------------------------------------- merged export


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
        from . import merge_paca

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
