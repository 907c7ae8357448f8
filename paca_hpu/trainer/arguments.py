"""Training arguments per device, following optimum-habana's ``GaudiTrainingArguments`` / transformers'
``TrainingArguments`` split.

:func:`arguments_class` picks the dataclass for the device, :func:`adjust_for_device` rewrites the values for it
(HPU: lazy mode, compile backend, static batch shapes; elsewhere every HPU-only flag turned off with one warning, the
CPU emulation of ``GaudiTrainer``), :func:`build_training_arguments` builds them.  Checks that need the arguments:
:func:`check_engine` (an engine the trainer cannot honour on this device), :func:`check_hpu_graphs_args`,
:func:`weight_partitioning_engine`; :func:`start_deepspeed_comm` prepares DeepSpeed on CPU processes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Optional

from .. import device as _device
from .. import _optimum_habana as _oh

logger = logging.getLogger(__name__)


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
